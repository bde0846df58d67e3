"""The op census of the runtime's eager training step as numbers for one shape.

planner/cost/op_census_data.py (recorded from runtime/model.py by `python -m tests.op_census
--write`, recounted by tests/test_op_census.py) lists every aten op PyTorch issues for a block, the
output layer with the loss, and the embedding, forward and backward, per variant (family, linear
bias, dropout, 16-bit autocast or fp32), with FLOPs and bytes read and written as formulas over
these symbols; and the optimizer step's ops in bytes per parameter element:

    b  micro-batch                 s  sequence length (s/t in the sequence-parallel region)
    S  max_seq_len (position rows) t  tensor-parallel degree
    g  kv heads per TP rank        r  query heads per kv head (1 without GQA)
    e  half the head dimension     f  FFN width per TP rank
    v  vocabulary rows per TP rank
so the hidden size is h = t*g*r*2e, a rank's query width g*r*2e and key/value width g*2e.
Ops flagged `sp` (norms, residual adds, dropout, the head's norm) run on s/t tokens under sequence
parallelism; the others on the whole sequence."""

import math
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cache, lru_cache

from planner.cost import op_census_data as data
from planner.spec import ModelSpec

REGIONS = ("block", "head", "embedding")
PASSES = ("fwd", "bwd")


@dataclass(frozen=True)
class Op:
    """One census row for a shape: `count` identical kernels."""
    name: str
    module: str
    kind: str            # gemm | attention | memory
    sequence_parallel: bool
    count: int
    flops: float         # each
    read_bytes: float    # each
    write_bytes: float   # each
    mkn: tuple | None = None    # a GEMM's (m, k, n), or (batch, m, k, n)


def _poly(text: str) -> tuple:
    """'2*b*s + 4*t' -> ((2.0, ('b', 's')), (4.0, ('t',)))."""
    terms = []
    for term in text.split(" + "):
        factors = term.split("*")
        coef = float(factors[0]) if factors[0][0].isdigit() else 1.0
        terms.append((coef, tuple(f for f in factors if not f[0].isdigit())))
    return tuple(terms)


def _value(poly: tuple, sym: dict) -> float:
    return sum(c * math.prod(sym[x] for x in names) for c, names in poly)


def variant(spec: ModelSpec, precision: str) -> str:
    """The census variant of a model and training precision (fp16 runs bf16's ops)."""
    return (f"{spec.arch}/bias={int(spec.linear_bias)}/dropout={int(spec.dropout > 0)}/"
            f"{'32' if precision == 'fp32' else '16'}")


@cache
def _rows(key: str, part: str) -> tuple:
    out = []
    for row in data.CENSUS["variants"][key][part]:
        r = dict(zip(data.CENSUS["fields"], row))
        out.append((r["op"], r["module"], r["kind"], r["sp"], r["n"], _poly(r["flops"]),
                    _poly(r["read"]), _poly(r["write"]),
                    tuple(_poly(d) for d in r["mkn"]) if r["mkn"] else None))
    return tuple(out)


def symbols(spec: ModelSpec, *, tp: int, micro_batch: int, seq_len: int) -> dict:
    """The census symbols of one TP rank."""
    return {"b": micro_batch, "s": seq_len, "S": spec.max_seq_len, "t": tp,
            "g": spec.num_kv_heads / tp, "r": spec.num_heads / spec.num_kv_heads,
            "e": spec.head_dim / 2, "f": spec.ffn_hidden_size / tp,
            "v": -(-spec.vocab_size // tp)}


@lru_cache(maxsize=8192)
def ops(spec: ModelSpec, precision: str, region: str, direction: str, *, tp: int,
        micro_batch: int, seq_len: int, sequence_parallel: bool = False) -> tuple:
    """Every op of `region` ('block', 'head' = output layer + loss, 'embedding') in `direction`
    ('fwd', 'bwd') for one micro-batch on one TP rank (cached: layer times, activation bytes
    and recompute times read the same rows)."""
    sym = symbols(spec, tp=tp, micro_batch=micro_batch, seq_len=seq_len)
    sharded = {**sym, "s": seq_len / tp} if sequence_parallel else sym
    result = []
    for name, module, kind, sp, n, flops, read, write, mkn in _rows(variant(spec, precision),
                                                                    f"{region}_{direction}"):
        s = sharded if sp else sym
        result.append(Op(name, module, kind, sp, n, _value(flops, s), _value(read, s),
                         _value(write, s), tuple(_value(d, s) for d in mkn) if mkn else None))
    return tuple(result)


def optimizer_bytes_per_param(fused: bool) -> float:
    """Bytes the optimizer step (global-norm clipping + AdamW) moves per parameter, counting
    every parameter as a weight-decayed matrix (the vectors are a fraction of a per cent):
    fused AdamW 28 + clipping 12; foreach AdamW 84 + 12 (tests/op_census.py)."""
    total = 0.0
    for op in data.CENSUS["optimizer"]["fused" if fused else "foreach"]:
        if op["over"] in ("all", "decay"):
            total += op["n"] * (op["read_per_element"] + op["write_per_element"])
    return total


def summary(spec: ModelSpec, precision: str, **shape) -> dict:
    """{region_direction: (kernels, GEMM FLOPs, memory-bound bytes)} at one shape."""
    out = {}
    for region in REGIONS:
        for direction in PASSES:
            rows = ops(spec, precision, region, direction, **shape)
            out[f"{region}_{direction}"] = (
                sum(o.count for o in rows),
                sum(o.count * o.flops for o in rows if o.kind != "memory"),
                sum(o.count * (o.read_bytes + o.write_bytes) for o in rows if o.kind == "memory"))
    return out


# torchtitan's op-level selective activation checkpointing (torchtitan/models/llama3/infra/
# parallelize.py, _save_list): outputs of these ops are saved (the census names the CUDA
# attention kernels; runtime/model.py OP_POLICY_SAVE_LIST adds the CPU flash kernel), except
# every second mm, counted per forward from the block's first; everything else is recomputed.
OP_POLICY_SAVE_LIST = ("mm", "_scaled_dot_product_efficient_attention",
                       "_scaled_dot_product_flash_attention", "max")


def op_policy_saved(rows: Sequence) -> list:
    """For each op row of a block forward, how many of its `count` kernels the op-level policy
    saves the output of (mm: the 1st, 3rd, 5th, ... mm of the block)."""
    saved, mm_seen = [], 0
    for op in rows:
        if op.name == "mm":
            odd = sum(1 for i in range(op.count) if (mm_seen + i + 1) % 2 == 1)
            mm_seen += op.count
            saved.append(odd)
        else:
            saved.append(op.count if op.name in OP_POLICY_SAVE_LIST else 0)
    return saved
