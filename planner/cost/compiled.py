"""A torch.compile'd block (Layout.compile) as numbers for one shape, from the compiled census.

planner/cost/compiled_census_data.py (recorded by `python -m tests.compiled_census --write`,
rechecked by tests/test_compiled_census.py) lists, per census variant, every kernel Inductor
generates for the runtime's block forward and backward - its fused memory-bound kernels with the
bytes each reads and writes once (a fused region's intermediates never reach memory), and the
extern GEMM and attention calls - and the bytes the block saves for backward, eager and
compiled.  The formulas are over the eager census's symbols (planner/cost/ops.py).

Under sequence parallelism the census (recorded without it) is scaled: a kernel's hidden-width
activation traffic (a term in b, s and t: h = t*g*r*2e is the full hidden width) runs on s/t
tokens, as the residual stream does; that the SP collectives split some fused regions in two is
not counted (README, torch.compile)."""

from dataclasses import dataclass
from functools import cache

from planner.cost import compiled_census_data as data
from planner.cost.ops import _poly, _value, ops, symbols, variant
from planner.spec import ModelSpec

MEMORY_KINDS = ("kernel", "extern")  # moved at HBM bandwidth; gemm/attention are timed apart


@dataclass(frozen=True)
class CompiledPass:
    """One compiled pass of a block on one rank: memory-bound kernels and their bytes, and the
    extern GEMM and attention calls."""
    memory_kernels: int
    memory_bytes: float
    gemm_kernels: int
    attention_kernels: int

    @property
    def kernels(self) -> int:
        return self.memory_kernels + self.gemm_kernels + self.attention_kernels


@cache
def _rows(key: str, part: str) -> tuple:
    return tuple((kind, n, _poly(read), _poly(write))
                 for kind, _ops, n, read, write in data.CENSUS["variants"][key][part])


def _sharded_value(poly: tuple, sym: dict, tp: int) -> float:
    """A formula's value with its hidden-width activation terms on s/t tokens."""
    total = 0.0
    for coef, names in poly:
        term = _value(((coef, names),), sym)
        total += term / tp if {"b", "s", "t"} <= set(names) else term
    return total


def compiled_pass(spec: ModelSpec, precision: str, direction: str, *, tp: int,
                  micro_batch: int, seq_len: int, sequence_parallel: bool = False) -> CompiledPass:
    """The compiled block's kernels in `direction` ('fwd', 'bwd') for one micro-batch."""
    sym = symbols(spec, tp=tp, micro_batch=micro_batch, seq_len=seq_len)
    counts = {"kernel": 0, "extern": 0, "gemm": 0, "attention": 0}
    nbytes = 0.0
    for kind, n, read, write in _rows(variant(spec, precision), f"block_{direction}"):
        counts[kind] += n
        if kind in MEMORY_KINDS:
            if sequence_parallel:
                nbytes += n * (_sharded_value(read, sym, tp) + _sharded_value(write, sym, tp))
            else:
                nbytes += n * (_value(read, sym) + _value(write, sym))
    return CompiledPass(counts["kernel"] + counts["extern"], nbytes, counts["gemm"],
                        counts["attention"])


def eager_kernels(spec: ModelSpec, precision: str, direction: str, **shape) -> int:
    """Kernels the eager block issues in `direction` (the eager census)."""
    return sum(o.count for o in ops(spec, precision, "block", direction, **shape))


def saved_bytes_saving(spec: ModelSpec, precision: str, *, tp: int, micro_batch: int,
                       seq_len: int, sequence_parallel: bool = False) -> float:
    """Bytes per layer and micro-batch the compiled block saves for backward fewer than the
    eager block (AOTAutograd's partitioner recomputes cheap pointwise ops in backward)."""
    entry = data.CENSUS["variants"][variant(spec, precision)]
    sym = symbols(spec, tp=tp, micro_batch=micro_batch, seq_len=seq_len)
    value = (lambda poly: _sharded_value(poly, sym, tp)) if sequence_parallel else \
        (lambda poly: _value(poly, sym))
    return value(_poly(entry["saved_eager"])) - value(_poly(entry["saved_compiled"]))
