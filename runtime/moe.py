"""Mixture-of-experts FFN: token-choice top-k router, dropless routed experts as stacked weights
(a per-expert loop: torch._grouped_mm refuses small unaligned CPU shapes, RUNTIME_NOTES), shared
experts, the auxiliary load-balancing loss, and expert parallelism over all-to-all.

Routing: scores = softmax (Mixtral, Qwen) or sigmoid (DeepSeek-V3, Liu et al. 2024 Sec. 2.1.2)
of the router logits in fp32; each token takes its top-k experts and weights their outputs by
the top-k scores renormalised to sum 1 (Mixtral's softmax over the chosen logits; DeepSeek-V3
eq. 13).  Every token reaches its experts (dropless, Gale et al. 2023): capacity_factor > 0 is
refused by the runtime's rule (planner/rules.py `_runtime_moe_rules`).

Auxiliary loss: Switch Transformer eq. 4 (Fedus et al. 2022), aux = coef * E * sum_i f_i P_i,
f_i = share of the (token, slot) assignments routed to expert i, P_i = mean routing probability
of expert i (sigmoid scores normalised per token), taken per sequence and averaged over the
global batch (DeepSeek-V3's sequence-wise form, eqs. 17-20): it depends on no layout, so every
layout trains the same objective.  Its gradient is injected in backward without changing the
forward output (Megatron-Core's MoEAuxLossAutoScaler), so it needs no path to the loss through
pipeline stages; `aux_grad_scale` (set by the engine every step) is d(objective)/d(sum of aux).

Expert parallelism (Lepikhin et al. 2021, GShard): routed experts split over the `ep` ranks of
an expert-parallel group (each owns num_experts/ep consecutive experts); (token, slot) rows go
to their expert's rank and come back with `dist.all_to_all_single` with uneven splits, whose
backward is the reverse all-to-all (`AllToAll`)."""

import contextlib

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from planner.spec import ModelSpec

# while count_all_to_all() is active: one dict per all-to-all of token rows
_A2A_LOG: list[list] = []


@contextlib.contextmanager
def count_all_to_all():
    """Record every token-row all-to-all (forward dispatch/combine and their backward)."""
    log: list[dict] = []
    _A2A_LOG.append(log)
    try:
        yield log
    finally:
        _A2A_LOG.remove(log)


def _record(kind: str, x: torch.Tensor, in_splits: list, out_splits: list, group) -> None:
    """Bytes this rank sends (to itself included) and receives, and those to other ranks."""
    if not _A2A_LOG:
        return
    row = x.shape[-1] * x.element_size()
    me = dist.get_rank(group)
    entry = {"kind": kind, "bytes": sum(in_splits) * row, "recv_bytes": sum(out_splits) * row,
             "remote_bytes": (sum(in_splits) - in_splits[me]) * row}
    for log in _A2A_LOG:
        log.append(entry)


class AllToAll(torch.autograd.Function):
    """all_to_all_single of rows with uneven splits; backward sends the gradients back."""

    @staticmethod
    def forward(ctx, x, out_splits, in_splits, group, kind):
        ctx.splits, ctx.group, ctx.kind = (out_splits, in_splits), group, kind
        out = x.new_empty((sum(out_splits),) + tuple(x.shape[1:]))
        _record(kind, x, in_splits, out_splits, group)
        dist.all_to_all_single(out, x.contiguous(), out_splits, in_splits, group=group)
        return out

    @staticmethod
    def backward(ctx, grad):
        out_splits, in_splits = ctx.splits
        back = grad.new_empty((sum(in_splits),) + tuple(grad.shape[1:]))
        _record(ctx.kind + "_backward", grad, out_splits, in_splits, ctx.group)
        dist.all_to_all_single(back, grad.contiguous(), in_splits, out_splits, group=ctx.group)
        return back, None, None, None, None


class _AuxLossGrad(torch.autograd.Function):
    """Identity on `out`; backward gives `aux` the gradient `scale` (MoEAuxLossAutoScaler)."""

    @staticmethod
    def forward(ctx, out, aux, scale):
        ctx.scale = scale
        return out

    @staticmethod
    def backward(ctx, grad):
        return grad, torch.full((), ctx.scale, dtype=torch.float32, device=grad.device), None


class Experts(nn.Module):
    """Routed experts as stacked weights [E, out, in] (nn.Linear's layout per expert), named
    as the dense MLP's projections: SwiGLU gate/up/down for Llama-style models, fc/proj with
    GELU for GPT; biases `<name>_bias` [E, out] when the model's linears have them
    (planner/cost/params.py `_moe_tensors`).  Under expert parallelism this module holds
    experts offset .. offset + local - 1 of `num_experts` (`shard`)."""

    def __init__(self, spec: ModelSpec):
        super().__init__()
        assert spec.moe is not None
        self.num_experts, self.offset = spec.moe.num_experts, 0
        self.swiglu, self.bias = spec.mlp == "swiglu", spec.linear_bias
        self.shapes = expert_shapes(spec)
        self._make(self.num_experts)

    def _make(self, local: int) -> None:
        device = next(iter(self.parameters()), torch.empty(0)).device
        for name, shape in self.shapes:
            setattr(self, name, nn.Parameter(torch.empty((local,) + shape, device=device)))

    @property
    def local_experts(self) -> int:
        return getattr(self, self.shapes[0][0]).shape[0]

    def shard(self, ep_rank: int, ep: int) -> None:
        """Keep experts ep_rank * E/ep .. (ep_rank + 1) * E/ep - 1 (before materialisation)."""
        local = self.num_experts // ep
        self.offset = ep_rank * local
        self._make(local)

    def _lin(self, x, j: int, name: str):
        bias = getattr(self, f"{name}_bias")[j].to(x.dtype) if self.bias else None
        return F.linear(x, getattr(self, name)[j].to(x.dtype), bias)

    def expert(self, j: int, x: torch.Tensor) -> torch.Tensor:
        if self.swiglu:  # Shazeer 2020
            return self._lin(F.silu(self._lin(x, j, "gate")) * self._lin(x, j, "up"), j, "down")
        return self._lin(F.gelu(self._lin(x, j, "fc"), approximate="tanh"), j, "proj")

    def forward(self, rows: torch.Tensor, counts: list) -> torch.Tensor:
        """rows grouped by local expert, counts[j] rows for expert j."""
        outs = [self.expert(j, chunk) for j, chunk in enumerate(rows.split(counts))]
        return torch.cat(outs) if outs else rows


def expert_shapes(spec: ModelSpec) -> list:
    """(name, per-expert shape) of the stacked expert tensors, in parameter order."""
    assert spec.moe is not None
    h, f = spec.hidden_size, spec.moe.expert_ffn_hidden_size
    if spec.mlp == "swiglu":
        linears = [("gate", f, h), ("up", f, h), ("down", h, f)]
    else:
        linears = [("fc", f, h), ("proj", h, f)]
    out: list[tuple[str, tuple]] = []
    for name, d_out, d_in in linears:
        out.append((name, (d_out, d_in)))
        if spec.linear_bias:
            out.append((f"{name}_bias", (d_out,)))
    return out


class MoE(nn.Module):
    def __init__(self, spec: ModelSpec, shared_mlp=None):
        super().__init__()
        moe = spec.moe
        assert moe is not None
        self.router = nn.Linear(spec.hidden_size, moe.num_experts, bias=spec.linear_bias)
        self.experts = Experts(spec)
        self.shared = shared_mlp  # an MLP of shared_ffn_hidden_size, or None
        self.shared_gate = None   # Qwen2-MoE: sigmoid(x . g) scales the shared experts' output
        if shared_mlp is not None and getattr(moe, "shared_expert_gate", False):
            self.shared_gate = nn.Linear(spec.hidden_size, 1, bias=False)
        self.top_k, self.sigmoid = moe.experts_per_token, moe.router == "sigmoid"
        self.aux_coef = moe.aux_loss_coef
        self.aux_grad_scale = 0.0
        self.ep, self.ep_group = 1, None
        # the last forward's summed per-sequence aux loss (detached)
        self.last_aux: torch.Tensor | None = None

    def route(self, x):
        """x [b, s, h] -> (expert ids [T, k], weights [T, k], scores [b, s, E] per token)."""
        logits = self.router(x).float()
        scores = torch.sigmoid(logits) if self.sigmoid else torch.softmax(logits, dim=-1)
        top, idx = scores.flatten(0, 1).topk(self.top_k, dim=-1)
        return idx, top / top.sum(-1, keepdim=True), scores

    def aux_loss(self, scores, idx) -> torch.Tensor:
        """Sum over the sequences of Switch eq. 4 taken per sequence (module docstring)."""
        b, s, e = scores.shape
        if self.sigmoid:
            scores = scores / scores.sum(-1, keepdim=True)
        chosen = torch.zeros(b * s, e, device=scores.device).scatter_(1, idx, 1.0)
        f = chosen.view(b, s, e).sum(1) / (s * self.top_k)
        p = scores.mean(1)
        return self.aux_coef * e * (f * p).sum()

    def forward(self, x):
        b, s, h = x.shape
        idx, weights, scores = self.route(x)
        flat = idx.flatten()
        order = flat.argsort(stable=True)  # (token, slot) rows grouped by expert
        counts = torch.bincount(flat, minlength=self.experts.num_experts)
        rows = x.reshape(b * s, h).index_select(0, order // self.top_k)
        out = self._experts(rows, counts)
        out = out.index_select(0, order.argsort())  # back to (token, slot) order
        out = (out.view(b * s, self.top_k, h) * weights.to(out.dtype).unsqueeze(-1)).sum(1)
        out = out.view(b, s, h)
        if self.shared is not None:
            shared = self.shared(x)
            if self.shared_gate is not None:
                shared = torch.sigmoid(self.shared_gate(x)) * shared
            out = out + shared
        if self.aux_coef > 0 and torch.is_grad_enabled():
            aux = self.aux_loss(scores, idx)
            self.last_aux = aux.detach()
            out = _AuxLossGrad.apply(out, aux, self.aux_grad_scale)
        return out

    def _experts(self, rows, counts):
        if self.ep == 1:
            return self.experts(rows, counts.tolist())
        return self._experts_parallel(rows, counts)

    def _experts_parallel(self, rows, counts):
        """Dispatch rows to their experts' ranks, run the local experts, combine back."""
        ep, group, local = self.ep, self.ep_group, self.experts.local_experts
        recv_counts = torch.empty_like(counts)
        dist.all_to_all_single(recv_counts, counts, group=group)  # E/ep counts per peer
        recv = recv_counts.view(ep, local)  # [source rank, local expert]
        send_splits = counts.view(ep, local).sum(1).tolist()
        recv_splits = recv.sum(1).tolist()
        got = AllToAll.apply(rows, recv_splits, send_splits, group, "dispatch")
        # received [source][expert] -> [expert][source]
        expert_of = torch.arange(local, device=rows.device).repeat(ep).repeat_interleave(
            recv.flatten())
        regroup = expert_of.argsort(stable=True)
        done = self.experts(got.index_select(0, regroup), recv.sum(0).tolist())
        done = done.index_select(0, regroup.argsort())
        return AllToAll.apply(done, send_splits, recv_splits, group, "combine")


def moe_modules(model: nn.Module) -> list:
    return [m for m in model.modules() if isinstance(m, MoE)]


def aux_grad_scale(layout, global_batch: int, loss_scale: float = 1.0) -> float:
    """d(objective)/d(one rank's per-micro-batch sum of per-sequence aux losses): the objective
    averages aux over the global batch's sequences; data parallelism divides gradients by dp
    and a pipeline schedule by the micro-batch count (PipelineStage.scale_grads), gradient
    accumulation does not (the injected gradient bypasses the 1/nmb of the loss)."""
    scale = layout.dp / global_batch * loss_scale
    return scale * layout.num_microbatches if layout.pp > 1 else scale


def is_expert_param(name: str) -> bool:
    return ".mlp.experts." in f".{name}"


def check_runtime_layout(spec: ModelSpec, layout) -> None:
    """Expert-parallel layouts the runtime does not build (planner/rules.py
    `_runtime_moe_rules` says the same for plans)."""
    if spec.moe is not None and layout.sequence_parallel:
        raise ValueError(f"sequence parallel over model {spec.name}: the runtime's MoE blocks "
                         f"route whole sequences (use sequence_parallel off)")
    if layout.ep == 1 and layout.etp == 1:
        return
    if spec.moe is None:
        raise ValueError(f"ep={layout.ep} etp={layout.etp}: model {spec.name} has no experts")
    if layout.etp > 1:
        raise ValueError(f"etp={layout.etp}: expert tensor parallelism is not built in the "
                         f"runtime (use etp=1)")
    if spec.moe.num_experts % layout.ep or layout.dp % layout.ep:
        raise ValueError(f"ep={layout.ep} must divide the {spec.moe.num_experts} experts and "
                         f"dp={layout.dp} (the runtime splits experts over the dp group)")
    if layout.zero_stage == 1 and layout.dp > 1:
        raise ValueError(f"ep={layout.ep} with ZeRO-1: the sharded optimizer does not handle "
                         f"expert-parallel experts in the runtime (use ZeRO-0, 2 or 3)")


def check_runtime_moe(spec: ModelSpec) -> None:
    """What the runtime's MoE does not build (planner/rules.py `_runtime_moe_rules` too)."""
    if spec.mla is not None:
        raise ValueError(f"model {spec.name}: multi-head latent attention (mla) is not built "
                         f"in the runtime")
    if spec.moe is not None and spec.moe.capacity_factor > 0:
        raise ValueError(f"model {spec.name}: capacity_factor {spec.moe.capacity_factor}: the "
                         f"runtime's experts are dropless (capacity_factor 0)")

