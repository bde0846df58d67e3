"""The op census of the runtime's model (runtime/model.py): every aten op one eager training
step issues, forward and backward, for the block of each family (llama, gpt, bert, with and
without linear biases and dropout, 16-bit autocast and fp32), the output layer with the loss,
the embedding, and the optimizer step (AdamW foreach and fused, with the gradient clipping),
with the FLOPs and the bytes each op reads and writes as formulas of the shapes.  The planner
holds the result as data (planner/cost/op_census_data.py) and times it op by op
(planner/cost/ops.py, planner/cost/compute.py); tests/test_op_census.py recounts it.

    python -m tests.op_census            # per-variant summary; says whether the data is current
    python -m tests.op_census --write    # re-record planner/cost/op_census_data.py

Formulas from one run: the census runs on CPU at a shape where every symbol is a distinct odd
prime (SYMBOLS), so each tensor's element count factors uniquely into the symbols; the head
dimension is 2e, so powers of two are coefficients.  A tensor-parallel rank is the same code on
local shapes (t = 3 here): q/k/v and the first MLP projections hold h/t, kv/t and ffn/t output
features, o and the last projection h/t and ffn/t input features, the output layer v rows; the
block's full hidden size is h = t*g*r*2e, so a formula with t in it is a full-width tensor.

What CPU does differently from CUDA, and how the count follows CUDA (a TorchFunctionMode):
- scaled_dot_product_attention runs with dropout_p = 0 (CPU then takes its flash kernel) and is
  recorded under the CUDA op: PyTorch's CUDA flash (16-bit) and memory-efficient (fp32) kernels
  apply attention dropout inside the one kernel, forward and backward;
- F.dropout with 0 < p < 1 in training becomes aten.native_dropout, as at::dropout does for CUDA
  tensors (one fused kernel writing the output and a 1-byte mask), not CPU's bernoulli + mul.
Bytes: every tensor an op reads or writes, counted once per distinct element it addresses (a
broadcast input once); views and allocations cost nothing; embedding reads only the gathered
rows, nll_loss one logit per token, its backward writes the whole gradient; fused AdamW only
reads the gradients.  Region: ops inside attn/mlp (and the output layer and loss) run on the
whole sequence; the other block ops (norms, residual adds, dropout) and the head's norm run on
s/t tokens under sequence parallelism (flag `sp`), as DTensor's SequenceParallel places them.
Backward ops are assigned to the module whose forward created the autograd node running them.
Counted: one micro-batch (no addition into existing .grad), the engine's scalar loss scaling
left out; the optimizer step after the first, so its state exists."""

import argparse
import json
import math
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from planner.spec import ModelSpec

DATA = Path(__file__).resolve().parents[1] / "planner" / "cost" / "op_census_data.py"
# symbol -> its value in the census run (distinct odd primes); see planner/cost/ops.py
SYMBOLS = {"b": 17, "s": 19, "S": 23, "t": 3, "g": 5, "r": 7, "e": 11, "f": 13, "v": 29}
ARCHES = ("llama", "gpt", "bert")
PRECISIONS = {"16": torch.bfloat16, "32": torch.float32}
GEMMS = {"mm", "addmm", "bmm", "baddbmm"}
SDPA_CUDA = {"16": "_scaled_dot_product_flash_attention",
             "32": "_scaled_dot_product_efficient_attention"}
FREE = {"_unsafe_view", "lift_fresh", "_local_scalar_dense"}  # views / host reads, no kernel


# --- shapes -> formulas -------------------------------------------------------------------------
def monomial(n: int) -> tuple:
    """(coefficient, symbols) with n = coefficient * prod(SYMBOLS[x] for x in symbols)."""
    syms = []
    for name, p in SYMBOLS.items():
        while n % p == 0:
            n //= p
            syms.append(name)
    if n & (n - 1):
        raise ValueError(f"element count factor {n} is not a power of two: a shape the census "
                         f"symbols do not describe")
    return n, tuple(syms)


def formula(terms: list) -> str:
    """'2*b*s*t + 4*b*s' from the terms [(element count, bytes or FLOPs each), ...]."""
    poly = {}
    for n, scale in terms:
        c, k = monomial(n)
        poly[k] = poly.get(k, 0) + c * scale
    ordered = sorted(((c, k) for k, c in poly.items() if c),
                     key=lambda ck: (-len(ck[1]), ck[1], ck[0]))
    return " + ".join("*".join([f"{c:g}"] + list(k)) if c != 1 or not k else "*".join(k)
                      for c, k in ordered) or "0"


def value(terms: list) -> float:
    return float(sum(n * scale for n, scale in terms))


def _add(terms: list, n: int, scale: float = 1.0) -> None:
    terms.append((n, scale))


def _elements(x: torch.Tensor) -> int:
    """Distinct elements a strided tensor addresses (a broadcast dimension counts once)."""
    return math.prod(n for n, st in zip(x.shape, x.stride()) if st != 0)


def _tensors(tree) -> list:
    return [x for x in tree_leaves(tree) if isinstance(x, torch.Tensor)]


def _bytes(terms: list, x: torch.Tensor) -> None:
    _add(terms, _elements(x), x.element_size())


# --- recording ----------------------------------------------------------------------------------
class _CudaPaths(TorchFunctionMode):
    """Route the two calls whose CPU path differs from CUDA's to CUDA's (module docstring)."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        if func is F.scaled_dot_product_attention:
            kwargs["dropout_p"] = 0.0
        elif func is F.dropout:
            p, training = kwargs.get("p", 0.5), kwargs.get("training", True)
            if training and 0 < p < 1:
                return torch.ops.aten.native_dropout(args[0], p, True)[0]
        return func(*args, **kwargs)


class Regions:
    """Which module of a root is running: forward via hooks, backward via the autograd node
    being executed (its sequence number falls in the range its module's forward created)."""

    def __init__(self, root: nn.Module, label: str):
        self.stack, self.ranges, self.label = [label], [], label
        self.handles = []
        for name, mod in root.named_modules():
            if name:
                name = name.removeprefix("head.")  # the output layer's parts by their own name
                self.handles.append(mod.register_forward_pre_hook(self._enter(name)))
                self.handles.append(mod.register_forward_hook(self._leave(name)))

    def _enter(self, name):
        def hook(module, args):
            self.stack.append(name)
            self.ranges.append([name, torch._C._autograd._get_sequence_nr(), None])
        return hook

    def _leave(self, name):
        def hook(module, args, out):
            self.stack.pop()
            for entry in reversed(self.ranges):
                if entry[0] == name and entry[2] is None:
                    entry[2] = torch._C._autograd._get_sequence_nr()
                    break
        return hook

    def current(self) -> str:
        node = torch._C._current_autograd_node()
        if node is None:
            return self.stack[-1]
        seq, best = node._sequence_nr(), (self.label, math.inf)
        for name, lo, hi in self.ranges:
            if hi is not None and lo <= seq < hi and hi - lo < best[1]:
                best = (name, hi - lo)
        return best[0]

    def close(self):
        for h in self.handles:
            h.remove()


class Recorder(TorchDispatchMode):
    """Every kernel-launching aten op: name, module, kind, GEMM shape, FLOPs, bytes."""

    def __init__(self, regions: Regions, precision: str):
        super().__init__()
        self.regions, self.precision, self.ops = regions, precision, []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        entry = self._entry(func, args, kwargs, out)
        if entry is not None:
            self.ops.append(entry)
        return out

    def _entry(self, func, args, kwargs, out):
        name = func._schema.name.split("::")[-1]
        schema = func._schema
        ins, outs = _tensors((args, kwargs)), _tensors(out)
        mutated = [a for a, arg in zip(args, schema.arguments)
                   if arg.alias_info is not None and arg.alias_info.is_write]
        views = any(r.alias_info is not None and not r.alias_info.is_write
                    for r in schema.returns)
        if (not ins and not outs) or views or name in FREE or name.startswith(
                ("empty", "new_empty")):
            return None
        read, write, flops, mkn, batch = [], [], [], None, None
        kind = "memory"
        for x in ins:
            _bytes(read, x)
        for x in _tensors(mutated):
            _bytes(write, x)
        if not mutated:
            for x in outs:
                _bytes(write, x)
        if name in GEMMS:
            kind = "gemm"
            a, b = (args[1], args[2]) if name in ("addmm", "baddbmm") else (args[0], args[1])
            mkn = [a.shape[-2], a.shape[-1], b.shape[-1]]
            batch = a.shape[0] if a.dim() == 3 else None
            _add(flops, math.prod(mkn) * (batch or 1), 2)  # 2mkn per product
        elif name.startswith("_scaled_dot_product"):
            kind = "attention"
            q, k = args[0], args[1]
            backward = name.endswith("_backward")
            if backward:
                q, k = args[1], args[2]
            b_, n, s, d = q.shape
            # FlashAttention-2: 2 GEMM-sized products forward, 5 backward (Dao 2023, Sec. 3)
            _add(flops, b_ * n * s * k.shape[2] * d, 10 if backward else 4)
            name = SDPA_CUDA[self.precision] + ("_backward" if backward else "")
        else:
            read, write = _special_bytes(name, args, outs, read, write)
        return {"op": name, "module": self.regions.current(), "kind": kind, "mkn": mkn,
                "batch": batch, "flops": flops, "read": read, "write": write}


def _special_bytes(name, args, outs, read, write) -> tuple:
    """Ops that touch less (or more) than their arguments' full extent."""
    if name == "embedding":  # gathers one row per index
        idx = args[1]
        read = []
        _bytes(read, idx)
        _bytes(read, outs[0])
    elif name == "embedding_dense_backward":  # zero-fills the table, then adds the rows
        _bytes(write, args[0])
    elif name == "nll_loss_forward":  # one logit per token
        read = []
        _bytes(read, args[1])
        _add(read, args[1].numel(), args[0].element_size())
    elif name == "nll_loss_backward":  # writes the whole gradient, reads targets only
        read = []
        for x in (args[0], args[2], args[6]):  # grad, target, total_weight
            _bytes(read, x)
    return read, write


def _merge(ops: list, sp_of, raw: bool = False) -> list:
    """Identical ops of one module merged with a count, in first-seen order, as formulas (or,
    with `raw`, as the numbers of this run)."""
    show = value if raw else formula
    merged = {}
    for o in ops:
        dims = lambda ds: [show([(d, 1)]) for d in ds]
        entry = {"op": o["op"], "module": o["module"], "kind": o["kind"],
                 "sp": sp_of(o["module"]), "mkn": dims(o["mkn"]) if o["mkn"] else None,
                 "batch": dims([o["batch"]])[0] if o["batch"] else None,
                 "flops": show(o["flops"]), "read": show(o["read"]), "write": show(o["write"])}
        key = tuple((k, str(v)) for k, v in entry.items())
        if key in merged:
            merged[key]["n"] += 1
        else:
            merged[key] = {"n": 1, **entry}
    return [{k: v for k, v in e.items() if v is not None} for e in merged.values()]


# --- what is counted ----------------------------------------------------------------------------
def census_spec(arch: str, bias: bool, dropout: bool) -> ModelSpec:
    """The whole-model spec whose TP rank (t = SYMBOLS['t']) has the census's prime shapes."""
    p = SYMBOLS
    group = p["r"] if arch == "llama" else 1
    heads = p["t"] * p["g"] * group
    return ModelSpec(name=f"census-{arch}", arch=arch, num_layers=1,
                     hidden_size=heads * 2 * p["e"], num_heads=heads,
                     num_kv_heads=p["t"] * p["g"], ffn_hidden_size=p["t"] * p["f"],
                     vocab_size=p["t"] * p["v"], max_seq_len=p["S"], tie_embeddings=False,
                     linear_bias=bias, dropout=0.1 if dropout else 0.0)


def local_block(spec: ModelSpec, t: int):
    """runtime.model.Block with one TP rank's projections (Megatron-LM's split, as
    runtime/parallelize.py applies it with DTensor: column-parallel in, row-parallel out)."""
    from runtime.model import Block
    block = Block(spec)
    h, bias = spec.hidden_size, spec.linear_bias
    q, kv, f = h // t, spec.kv_hidden_size // t, spec.ffn_hidden_size // t
    attn, mlp = block.attn, block.mlp
    attn.q, attn.k, attn.v = nn.Linear(h, q, bias), nn.Linear(h, kv, bias), nn.Linear(h, kv, bias)
    attn.o = nn.Linear(q, h, bias)
    if mlp.swiglu:
        mlp.gate, mlp.up, mlp.down = nn.Linear(h, f, bias), nn.Linear(h, f, bias), \
            nn.Linear(f, h, bias)
    else:
        mlp.fc, mlp.proj = nn.Linear(h, f, bias), nn.Linear(f, h, bias)
    return block


def local_head(spec: ModelSpec, t: int):
    from runtime.model import Head
    head = Head(spec)
    head.output = nn.Linear(spec.hidden_size, -(-spec.vocab_size // t), bias=spec.arch == "bert")
    return head


def local_embedding(spec: ModelSpec, t: int):
    from runtime.model import Embedding
    emb = Embedding(spec)
    emb.wte = nn.Embedding(-(-spec.vocab_size // t), spec.hidden_size)
    return emb


def _autocast(precision: str):
    return torch.autocast("cpu", dtype=PRECISIONS[precision], enabled=precision != "32")


def _count(module, label, precision, forward, sp_of, raw=False) -> tuple:
    """(forward ops, backward ops) of `forward()` -> output (a loss, or a tensor given a random
    gradient)."""
    regions = Regions(module, label)
    try:
        with _CudaPaths():
            rec = Recorder(regions, precision)
            with rec:
                out = forward()
            fwd = rec.ops
            seed = None if out.dim() == 0 else torch.randn_like(out)
            rec = Recorder(regions, precision)
            with rec:
                torch.autograd.backward(out, seed)
            return _merge(fwd, sp_of, raw), _merge(rec.ops, sp_of, raw)
    finally:
        regions.close()


def block_census(spec: ModelSpec, precision: str, block=None, batch=None, raw=False) -> tuple:
    """A block's ops; its input is the 16-bit residual stream under autocast (the embedding
    casts it, runtime/model.py) or fp32."""
    from runtime.model import rope_tables
    torch.manual_seed(0)
    block = block or local_block(spec, SYMBOLS["t"])
    cos, sin = rope_tables(spec, "cpu")
    b, s = batch or (SYMBOLS["b"], SYMBOLS["s"])
    x = torch.randn(b, s, spec.hidden_size, dtype=PRECISIONS[precision], requires_grad=True)

    def forward():
        with _autocast(precision):
            return block(x, cos, sin)
    sp_of = lambda m: not m.startswith(("attn.", "mlp.")) and m not in ("attn", "mlp")
    return _count(block, "block", precision, forward, sp_of, raw)


class _HeadAndLoss(nn.Module):
    """The output layer under autocast, then the runtime's loss outside it (as the engine)."""

    def __init__(self, head, precision: str):
        super().__init__()
        self.head, self.loss, self.precision = head, _Loss(), precision

    def forward(self, x, labels):
        with _autocast(self.precision):
            logits = self.head(x)
        return self.loss(logits, labels)


class _Loss(nn.Module):
    def forward(self, logits, labels):
        from runtime.pipeline import lm_loss_sum
        return lm_loss_sum(logits, labels)


def head_census(spec: ModelSpec, precision: str, head=None, batch=None, raw=False) -> tuple:
    torch.manual_seed(0)
    model = _HeadAndLoss(head or local_head(spec, SYMBOLS["t"]), precision)
    b, s = batch or (SYMBOLS["b"], SYMBOLS["s"])
    x = torch.randn(b, s, spec.hidden_size, dtype=PRECISIONS[precision], requires_grad=True)
    labels = torch.randint(0, model.head.output.out_features, (b, s))
    sp_of = lambda m: m not in ("output", "loss")
    return _count(model, "loss", precision, lambda: model(x, labels), sp_of, raw)


def embedding_census(spec: ModelSpec, precision: str, emb=None, batch=None,
                     raw=False) -> tuple:
    torch.manual_seed(0)
    emb = emb or local_embedding(spec, SYMBOLS["t"])
    b, s = batch or (SYMBOLS["b"], SYMBOLS["s"])
    ids = torch.randint(0, emb.wte.num_embeddings, (b, s))

    def forward():
        with _autocast(precision):
            return emb(ids)
    return _count(emb, "embed", precision, forward, lambda m: False, raw)


# --- optimizer ----------------------------------------------------------------------------------
class _Ctx:
    """The one-rank context runtime.optim.clip_grad_norm asks for sizes and the device."""
    device = torch.device("cpu")
    hsdp_mesh = None  # no hybrid sharding

    def size(self, axis: str) -> int:
        return 1


def optimizer_census(fused: bool) -> list:
    """The runtime's optimizer step after the first (AdamW's state exists) on the llama census
    model: runtime.optim.clip_grad_norm (here always clipping) and AdamW, foreach (the runtime's
    choice under DTensor and FSDP2) or fused (plain CUDA parameters).  Per op: what it runs over
    ('all' parameters, the 'decay' group of matrices, 'no_decay' vectors, one value 'per_tensor'
    or 0-dim 'scalar' tensors, which AdamW keeps on the host unless fused) and its bytes per
    element of that."""
    import torch.distributed as dist

    from runtime.model import Transformer
    from runtime.optim import OptimConfig, build_adamw, clip_grad_norm
    torch.manual_seed(0)
    model = Transformer(census_spec("llama", False, False))
    params = list(model.parameters())
    for p in params:
        p.grad = torch.randn_like(p)
    opt = build_adamw(model, OptimConfig())
    for group in opt.param_groups:  # the runtime's choice on one CUDA GPU / under DTensor
        group["foreach"], group["fused"] = (False, True) if fused else (True, False)
    opt.step()  # creates the state
    totals = {sum(p.numel() for p in params): "all",
              sum(p.numel() for p in params if p.dim() >= 2): "decay",
              sum(p.numel() for p in params if p.dim() < 2): "no_decay", len(params): "per_tensor"}
    assert len(totals) == 4, "census model: the element totals must differ"
    started = not dist.is_initialized()
    if started:
        dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        rec = _OptimRecorder(totals)
        with rec:
            clip_grad_norm([(p, 1) for p in params], 1e-6, _Ctx())
            opt.step()
    finally:
        if started:
            dist.destroy_process_group()
    return rec.merged()


class _OptimRecorder(TorchDispatchMode):
    def __init__(self, totals: dict):
        super().__init__()
        self.totals, self.ops = totals, []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        name = func._schema.name.split("::")[-1]
        ins = _tensors((args, kwargs))
        if not ins or name in FREE or any(r.alias_info is not None and not r.alias_info.is_write
                                          for r in func._schema.returns):
            return out
        mutated = [a for a, arg in zip(args, func._schema.arguments)
                   if arg.alias_info is not None and arg.alias_info.is_write]
        written = _tensors(mutated) or _tensors(out)
        if name == "_fused_adamw_":  # gradients are read only (no grad scaler)
            written = _tensors([args[0], args[2], args[3]])
        first = _tensors(args[0]) or ins
        extent = sum(x.numel() for x in first if x.dim() > 0) or sum(
            x.numel() for x in _tensors(out) if x.dim() > 0)
        over = self.totals.get(extent, "scalar")
        per = lambda xs: sum(x.numel() * x.element_size() for x in xs if x.dim() > 0)
        scale = extent if over != "scalar" else 1
        self.ops.append({"op": name, "over": over,
                         "read_per_element": per(ins) / scale if over != "scalar" else 0.0,
                         "write_per_element": per(written) / scale if over != "scalar" else 0.0})
        return out

    def merged(self) -> list:
        merged = {}
        for o in self.ops:
            key = tuple(o.items())
            merged.setdefault(key, {"n": 0, **o})["n"] += 1
        return list(merged.values())


# --- the whole census ---------------------------------------------------------------------------
def variants():
    for arch in ARCHES:
        for bias in (False, True):
            for dropout in (False, True):
                for precision in PRECISIONS:
                    yield arch, bias, dropout, precision


def variant_key(arch: str, bias: bool, dropout: bool, precision: str) -> str:
    return f"{arch}/bias={int(bias)}/dropout={int(dropout)}/{precision}"


def census() -> dict:
    out = {}
    for arch, bias, dropout, precision in variants():
        spec = census_spec(arch, bias, dropout)
        parts = {}
        for region, fn in (("block", block_census), ("head", head_census),
                           ("embedding", embedding_census)):
            parts[f"{region}_fwd"], parts[f"{region}_bwd"] = fn(spec, precision)
        out[variant_key(arch, bias, dropout, precision)] = parts
    return {"torch_version": torch.__version__.split("+")[0], "symbols": dict(SYMBOLS),
            "variants": out,
            "optimizer": {"foreach": optimizer_census(False), "fused": optimizer_census(True)}}


FIELDS = ("op", "module", "kind", "sp", "n", "flops", "read", "write", "mkn")
HEADER = '''"""Generated by `python -m tests.op_census --write` from runtime/model.py; do not edit.
The op census of one eager training step: tests/op_census.py says how it is counted,
planner/cost/ops.py reads it.  CENSUS["variants"][variant][region]: one row per op, the values
of CENSUS["fields"]; formulas are strings over CENSUS["symbols"] (planner/cost/ops.py); `mkn`
is a GEMM's [m, k, n], or [batch, m, k, n].  JSON text: it loads in a millisecond."""

import json

CENSUS = json.loads(r"""
'''


def _row(o: dict) -> list:
    mkn = ([o["batch"]] if "batch" in o else []) + o["mkn"] if "mkn" in o else None
    return [o[k] for k in FIELDS[:-1]] + [mkn]


def render(data: dict) -> str:
    """The data module: JSON, one op per line."""
    dumps = lambda x: json.dumps(x, separators=(", ", ": "))
    lines = [HEADER + "{" + f'"torch_version": {dumps(data["torch_version"])},',
             f' "symbols": {dumps(data["symbols"])},', f' "fields": {dumps(list(FIELDS))},',
             ' "variants": {']
    for i, (key, parts) in enumerate(data["variants"].items()):
        lines.append(f"  {dumps(key)}: {{")
        for j, (region, ops) in enumerate(parts.items()):
            rows = [f"    {dumps(_row(o))}" for o in ops]
            lines += [f"   {dumps(region)}: [", ",\n".join(rows),
                      "   ]" + ("," if j < len(parts) - 1 else "")]
        lines.append("  }" + ("," if i < len(data["variants"]) - 1 else ""))
    lines.append(" },")
    lines.append(' "optimizer": {')
    for i, (kind, ops) in enumerate(data["optimizer"].items()):
        lines += [f"  {dumps(kind)}: [", ",\n".join(f"   {dumps(o)}" for o in ops),
                  "  ]" + ("," if i < len(data["optimizer"]) - 1 else "")]
    lines.append(" }")
    lines.append("}")
    return "\n".join(lines) + '\n""")\n'


def summary(data: dict) -> list:
    """One line per variant: kernels of each region's forward / backward."""
    lines = []
    for key, parts in data["variants"].items():
        counts = {part: sum(o["n"] for o in rows) for part, rows in parts.items()}
        lines.append(f"{key:28s} " + "  ".join(
            f"{region} {counts[region + '_fwd']}/{counts[region + '_bwd']}"
            for region in ("block", "head", "embedding")))
    return lines


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--write", action="store_true", help=f"re-record {DATA.name}")
    args = ap.parse_args(argv)
    data = census()
    text = render(data)
    print("kernels forward/backward per micro-batch:", *summary(data), sep="\n")
    if args.write:
        DATA.write_text(text)
        print(f"wrote {DATA} ({len(text):,} bytes)")
        return 0
    current = DATA.exists() and DATA.read_text() == text
    print(f"{DATA.name} is {'current' if current else 'OUT OF DATE: run with --write'}")
    return 0 if current else 1


if __name__ == "__main__":
    sys.exit(main())
