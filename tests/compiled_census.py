"""The compiled census: what torch.compile (Inductor) generates for the runtime's block
(runtime/model.py Block, as `planner run` compiles each block, runtime/parallelize.py), forward
and backward, for every variant the eager census (tests/op_census.py) covers, on CPU at the
census's prime shapes: every kernel of the scheduler's final (fused) node list, with the bytes
Inductor itself counts it reading and writing (BaseSchedulerNode.get_read_write_buffer_accesses,
the numbers behind torch._inductor.metrics.num_bytes_accessed: a fused region reads its external
inputs and writes its outputs once, intermediates stay in registers), and the bytes the block
saves for backward, eager and compiled (AOTAutograd's min-cut partitioner may recompute cheap
pointwise ops in backward instead of saving them).  The planner holds it as data
(planner/cost/compiled_census_data.py) and times it (planner/cost/compiled.py).

    python -m tests.compiled_census            # summary; says whether the data is current
    python -m tests.compiled_census --write    # re-record planner/cost/compiled_census_data.py

Kernels: a fused Inductor kernel (one or more scheduler nodes: `kernel`); an extern call, the mm
(`gemm`, cuBLAS on GPU, the same aten mm on CPU: Inductor fuses nothing into it without
max-autotune templates) or the attention op (`attention`); no-op nodes (a cat written in place
by its producers) and the multi-output unpacking of an extern call launch nothing and are left
out.  As in the eager census, attention dropout is off (CUDA's flash kernel applies it inside
its one kernel) so attention is one extern kernel; the block's residual dropout is compiled
(Inductor's in-kernel random numbers, the mask saved as bools).  Backend differences (CPU C++
vs GPU Triton) are listed in README (torch.compile section)."""

import argparse
import json
import sys
from pathlib import Path

import torch
import torch._functorch.config
import torch._inductor.config

from tests.op_census import (PRECISIONS, SYMBOLS, _autocast, census_spec, formula, local_block,
                             value, variant_key, variants)

DATA = Path(__file__).resolve().parents[1] / "planner" / "cost" / "compiled_census_data.py"
VIEWS = {"permute", "reshape", "view", "slice", "split", "expand", "squeeze", "unsqueeze",
         "select", "alias", "t", "transpose", "_unsafe_view", "split_with_sizes"}
GEMMS = {"mm", "addmm", "bmm", "baddbmm"}


def _short(target) -> str:
    """'aten.mul.Tensor' -> 'mul'; 'prims.convert_element_type.default' -> 'convert'."""
    name = str(target).split(".")[1] if "." in str(target) else str(target)
    return "convert" if name == "convert_element_type" else name


def _origins(node) -> list:
    names = set()
    for sub in node.get_nodes():
        for origin in (sub.node.origins if sub.node is not None else ()):
            names.add(_short(origin.target))
    return sorted(names - VIEWS)


def _kind(node, ops: list):
    """'kernel' | 'gemm' | 'attention' | 'extern', or None for a node that launches nothing."""
    from torch._inductor import ir, scheduler
    if isinstance(node, scheduler.NopKernelSchedulerNode):
        return None
    if node.is_extern():
        if isinstance(node.node, ir.MultiOutput):
            return None
        if GEMMS & set(ops) and not any(o.startswith("_scaled_dot") for o in ops):
            return "gemm"
        return "attention" if any(o.startswith("_scaled_dot") for o in ops) else "extern"
    return "kernel"


def _terms(accesses: dict) -> list:
    """[(bytes, 1)] per buffer: formula() factors each buffer's bytes into the symbols."""
    return [(int(n), 1) for n in accesses.values() if n]


class GraphRecorder:
    """The kernels of every graph Inductor schedules while installed (Scheduler._codegen)."""

    def __init__(self):
        self.graphs = []

    def __enter__(self):
        from torch._inductor import scheduler
        self._orig = orig = scheduler.Scheduler._codegen
        recorder = self

        def codegen(sched, nodes):
            recorder.graphs.append([k for k in map(_kernel, nodes) if k is not None])
            return orig(sched, nodes)
        scheduler.Scheduler._codegen = codegen
        return self

    def __exit__(self, *exc):
        from torch._inductor import scheduler
        scheduler.Scheduler._codegen = self._orig


def _kernel(node):
    ops = _origins(node)
    kind = _kind(node, ops)
    if kind is None:
        return None
    reads = node.get_read_write_buffer_accesses(include_reads=True, include_writes=False)
    writes = node.get_read_write_buffer_accesses(include_reads=False, include_writes=True)
    if not reads and not writes:
        return None
    if kind in ("gemm", "attention"):  # timed from the eager census's shapes (compute.py)
        return {"kind": kind, "ops": ops, "read": [], "write": []}
    return {"kind": kind, "ops": ops, "read": _terms(reads), "write": _terms(writes)}


def _merge(kernels: list, raw: bool = False) -> list:
    """Identical kernels merged with a count, in first-seen order, as formulas (or, with `raw`,
    as the numbers of this run)."""
    show = value if raw else formula
    merged = {}
    for k in kernels:
        row = (k["kind"], "+".join(k["ops"]), show(k["read"]), show(k["write"]))
        merged[row] = merged.get(row, 0) + 1
    return [[kind, ops, n, read, write] for (kind, ops, read, write), n in merged.items()]


def _saved_terms(run, params) -> list:
    """[(bytes, 1)] of each distinct non-parameter tensor autograd saves while `run()` runs."""
    seen, terms = set(), []
    param_ptrs = {p.data_ptr() for p in params}

    def pack(x):
        key = (x.data_ptr(), x.storage_offset(), tuple(x.shape), x.dtype)
        if x.data_ptr() not in param_ptrs and key not in seen and x.numel() > 1:
            seen.add(key)
            terms.append((x.numel() * x.element_size(), 1))
        return x
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda x: x):
        out = run()
    return terms, out


def block_compiled(arch: str, bias: bool, dropout: bool, precision: str) -> dict:
    """The compiled block's kernels (forward, backward) and saved bytes (eager, compiled) at
    the census shapes, as formulas."""
    return compile_block(census_spec(arch, bias, dropout), precision)


def compile_block(spec, precision: str, t: int = SYMBOLS["t"], batch=None,
                  raw: bool = False) -> dict:
    """block_compiled for the TP rank (of t) of any spec at any (micro-batch, sequence)."""
    from runtime.model import rope_tables
    torch.manual_seed(0)
    block = local_block(spec, t)
    block.attn.dropout = 0.0  # as the eager census: CUDA's flash kernel applies it inside
    cos, sin = rope_tables(spec, "cpu")
    b, s = batch or (SYMBOLS["b"], SYMBOLS["s"])
    x = torch.randn(b, s, spec.hidden_size, dtype=PRECISIONS[precision], requires_grad=True)

    def run(module):
        with _autocast(precision):
            return module(x, cos, sin)
    eager_saved, _ = _saved_terms(lambda: run(block), block.parameters())
    torch._dynamo.reset()
    compiled = torch.compile(block)
    # no cached graphs: a cache hit would skip the scheduler this reads
    no_cache = {"fx_graph_cache": False, "fx_graph_remote_cache": False}
    with torch._inductor.config.patch(no_cache), \
            torch._functorch.config.patch(enable_autograd_cache=False), GraphRecorder() as rec:
        compiled_saved, out = _saved_terms(lambda: run(compiled), block.parameters())
        out.backward(torch.randn_like(out))
    assert len(rec.graphs) == 2, \
        f"expected one forward and one backward graph, got {len(rec.graphs)}"
    show = value if raw else formula
    return {"block_fwd": _merge(rec.graphs[0], raw), "block_bwd": _merge(rec.graphs[1], raw),
            "saved_eager": show(eager_saved), "saved_compiled": show(compiled_saved)}


def census(keys=None) -> dict:
    out = {}
    for arch, bias, dropout, precision in variants():
        key = variant_key(arch, bias, dropout, precision)
        if keys is None or key in keys:
            out[key] = block_compiled(arch, bias, dropout, precision)
    return {"torch_version": torch.__version__.split("+")[0], "symbols": dict(SYMBOLS),
            "fields": ["kind", "ops", "n", "read", "write"], "variants": out}


HEADER = '''"""Generated by `python -m tests.compiled_census --write` from runtime/model.py; do not
edit.  The kernels torch.compile (Inductor, CPU backend) generates for one block, forward and
backward, and the bytes the block saves for backward eager and compiled: tests/compiled_census.py
says how it is counted, planner/cost/compiled.py reads it.  Formulas are strings over
CENSUS["symbols"] (planner/cost/ops.py).  JSON text: it loads in a millisecond."""

import json

CENSUS = json.loads(r"""
'''


def render(data: dict) -> str:
    dumps = lambda x: json.dumps(x, separators=(", ", ": "))
    lines = [HEADER + "{" + f'"torch_version": {dumps(data["torch_version"])},',
             f' "symbols": {dumps(data["symbols"])},', f' "fields": {dumps(data["fields"])},',
             ' "variants": {']
    for i, (key, parts) in enumerate(data["variants"].items()):
        lines.append(f"  {dumps(key)}: {{")
        for region in ("block_fwd", "block_bwd"):
            lines += [f"   {dumps(region)}: [",
                      ",\n".join(f"    {dumps(r)}" for r in parts[region]), "   ],"]
        lines.append(f'   "saved_eager": {dumps(parts["saved_eager"])},')
        lines.append(f'   "saved_compiled": {dumps(parts["saved_compiled"])}')
        lines.append("  }" + ("," if i < len(data["variants"]) - 1 else ""))
    lines += [" }", "}"]
    return "\n".join(lines) + '\n""")\n'


def summary(data: dict) -> list:
    return [f"{key:28s} kernels fwd {sum(r[2] for r in p['block_fwd'])} "
            f"bwd {sum(r[2] for r in p['block_bwd'])}" for key, p in data["variants"].items()]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--write", action="store_true", help=f"re-record {DATA.name}")
    args = ap.parse_args(argv)
    data = census()
    text = render(data)
    print("compiled block kernels per micro-batch:", *summary(data), sep="\n")
    if args.write:
        DATA.write_text(text)
        print(f"wrote {DATA} ({len(text):,} bytes)")
        return 0
    current = DATA.exists() and DATA.read_text() == text
    print(f"{DATA.name} is {'current' if current else 'OUT OF DATE: run with --write'}")
    return 0 if current else 1


if __name__ == "__main__":
    sys.exit(main())
