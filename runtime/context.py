"""Context parallelism, the all-gather flavour (Llama 3, Dubey et al. 2024, Sec. 3.3.2), built
from plain collectives: PyTorch's experimental context_parallel does not run on CPU (its SDPA
has no DTensor sharding strategy there), so this runs everywhere gloo or NCCL does.

Each sequence of s tokens is cut into 2cp chunks; cp rank i keeps chunks i and 2cp-1-i
(load-balanced causal work, planner/cost/context.py), with their global position ids for
RoPE / learned positions.  In every attention, K and V are all-gathered over the cp group in
forward (an autograd Function whose backward reduce-scatters dK and dV), and the local queries
attend to the gathered keys through a boolean causal mask built from the position ids."""

import torch
import torch.distributed as dist
import torch.nn.functional as F


def chunk_positions(seq_len: int, cp: int, rank: int) -> torch.Tensor:
    """Global positions of cp rank `rank`'s tokens: chunks rank and 2cp-1-rank, in order."""
    if seq_len % (2 * cp):
        raise ValueError(f"seq len {seq_len} must divide into 2*cp = {2 * cp} chunks")
    c = seq_len // (2 * cp)
    first = torch.arange(rank * c, (rank + 1) * c)
    second = torch.arange((2 * cp - 1 - rank) * c, (2 * cp - rank) * c)
    return torch.cat([first, second])


class _GatherSeq(torch.autograd.Function):
    """All-gather along dim 2 (sequence of a (batch, heads, seq, dim) tensor) over `group`;
    backward reduce-scatters the gradient (each rank's keys got gradient from every rank)."""

    @staticmethod
    def forward(ctx, x, group, world):
        ctx.group, ctx.world = group, world
        flat = x.movedim(2, 0).contiguous()
        out = flat.new_empty((world * flat.shape[0],) + flat.shape[1:])
        dist.all_gather_single(out, flat, group=group)
        return out.movedim(0, 2)

    @staticmethod
    def backward(ctx, grad):
        flat = grad.movedim(2, 0).contiguous()
        out = flat.new_empty((flat.shape[0] // ctx.world,) + flat.shape[1:])
        dist.reduce_scatter_single(out, flat, group=ctx.group)
        return out.movedim(0, 2), None, None


class ContextShard:
    """One rank's part of context parallelism: its cp group, size and token positions."""

    def __init__(self, group, cp: int, rank: int, seq_len: int, device):
        self.group, self.cp, self.rank, self.seq_len = group, cp, rank, seq_len
        self.positions = chunk_positions(seq_len, cp, rank).to(device)
        every = [chunk_positions(seq_len, cp, r) for r in range(cp)]
        self.key_positions = torch.cat(every).to(device)  # the gathered order: rank-major
        # True where a query may attend to a key (its position is not later)
        self.causal_mask = self.positions[:, None] >= self.key_positions[None, :]

    def shard(self, x: torch.Tensor) -> torch.Tensor:
        """This rank's tokens of a (batch, seq, ...) tensor."""
        return x.index_select(1, self.positions)

    def attention(self, q, k, v, *, causal: bool, dropout_p: float):
        """Local queries over the all-gathered keys and values."""
        k = _GatherSeq.apply(k, self.group, self.cp)
        v = _GatherSeq.apply(v, self.group, self.cp)
        mask = self.causal_mask if causal else None
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p,
                                              enable_gqa=q.shape[1] != k.shape[1])


def set_context(parts, shard) -> None:
    """Run every attention of the model parts under `shard` (None: the whole sequence)."""
    for part in parts:
        part.cp_shard = shard
        for block in part.layers.values():
            block.attn.cp_shard = shard
