"""The combination step: one pipeline rank's pieces (model states, activations, per-layer times,
collective times) -> its memory and micro-batch time; the ranks' -> the step time.

Every function takes keyword-only inputs that are Python scalars or numpy arrays (one entry per
layout); estimate() calls them with one plan's numbers, the search (planner/search/scorer.py)
with whole columns.  Ranks are combined along a list, one entry per rank."""

from dataclasses import dataclass

import numpy as np

# a time in seconds: one value, or one per layout (the search's columns)
Seconds = float | np.ndarray


def activation_peak(*, inflight, rank_layers, rank_chunks, layer_bytes, holds_embedding,
                    embedding_bytes, holds_head, head_inflight, head_bytes, recomputed_layers,
                    plain_layer_bytes):
    """Peak activation bytes of a rank: `inflight` chunk forward passes of its mean chunk, the
    embedding's per chunk pass, and the output layer's micro-batches (planner.cost.pipeline).
    `recomputed_layers` of the rank's layers save `layer_bytes` (the policy's), the others
    `plain_layer_bytes` (no recompute)."""
    layers_bytes = recomputed_layers * layer_bytes + \
        (rank_layers - recomputed_layers) * plain_layer_bytes
    peak = inflight * layers_bytes / rank_chunks
    peak = peak + np.where(holds_embedding, inflight / rank_chunks * embedding_bytes, 0.0)
    return peak + np.where(holds_head, head_inflight * head_bytes, 0.0)


def rank_total_bytes(*, weights, gradients, optimizer, activations, gathered, comm_buffers,
                     context, workspace, nccl_buffers, allocator_reserve):
    """MemoryBreakdown.total_bytes of a rank: its tensors plus the memory outside them."""
    tensors = weights + gradients + optimizer + activations + gathered + comm_buffers
    return tensors + context + workspace + nccl_buffers + allocator_reserve


@dataclass(frozen=True)
class RankMicrobatch:
    """One micro-batch through all chunks of one pipeline rank, in seconds (scalars or arrays)."""
    compute_fwd_s: Seconds
    compute_bwd_s: Seconds
    recompute_s: Seconds
    tp_comm_s: Seconds
    pp_comm_s: Seconds
    wgrad_s: Seconds

    @property
    def total_s(self):
        return (self.compute_fwd_s + self.compute_bwd_s + self.recompute_s + self.tp_comm_s
                + self.pp_comm_s)


def rank_microbatch(*, rank_layers, holds_head, layer_fwd_s, layer_bwd_s, layer_wgrad_s,
                    head_fwd_s, head_bwd_s, head_wgrad_s, recompute_per_layer_s,
                    tp_exposed_per_layer_s, pp_comm_s, recomputed_layers,
                    tp_recompute_per_layer_s) -> RankMicrobatch:
    """The rank's layers times the per-layer times, plus the output layer on the last rank;
    its `recomputed_layers` add their recompute and the TP collectives it re-runs."""
    def with_head(per_layer, head):
        return rank_layers * per_layer + np.where(holds_head, head, 0.0)
    return RankMicrobatch(
        compute_fwd_s=with_head(layer_fwd_s, head_fwd_s),
        compute_bwd_s=with_head(layer_bwd_s, head_bwd_s),
        recompute_s=recomputed_layers * recompute_per_layer_s,
        tp_comm_s=rank_layers * tp_exposed_per_layer_s
        + recomputed_layers * tp_recompute_per_layer_s,
        pp_comm_s=pp_comm_s + 0.0 * rank_layers,
        wgrad_s=with_head(layer_wgrad_s, head_wgrad_s))


def bubble_chunks(*, pp, virtual_stages, zero_bubble, fwd_s, bwd_s, wgrad_s):
    """Idle time of a stage in units of one micro-batch's time on a rank: GPipe and 1F1B p-1,
    interleaved (p-1)/v, zero-bubble (p-1)(F+B-2W)/(F+B)/v (planner.cost.pipeline)."""
    fill = np.maximum(0.0, fwd_s + bwd_s - 2 * wgrad_s) / (fwd_s + bwd_s)
    out = np.where(zero_bubble, (pp - 1) * fill / virtual_stages, (pp - 1) / virtual_stages)
    return np.where(pp == 1, 0.0, out)


def dp_exposed(*, dp_total_s, grad_sync_s, num_microbatches, pace_s, rank_bwd_s,
               rank_recompute_s, sharded, deferred, overlapped, first_gather_layers,
               first_gather_s):
    """Data-parallel seconds one rank leaves on the critical path.

    Not overlapped (or a group of one): all of it.  DDP (ZeRO-0/1): the gradient all-reduce
    overlaps the last micro-batch's backward; what follows the optimizer step (ZeRO-1's
    parameter gather) is exposed.  FSDP2 (ZeRO-2/3): each micro-batch's gathers and
    reduce-scatters overlap the pipeline's pace - the slowest rank's micro-batch time, which
    every rank's micro-batch slot lasts in the steady state - plus the first block's gather
    before the first forward.  FSDP2 under pipelining (`deferred`, engines.deferred_fsdp): the
    step's one reduce-scatter follows the last backward and is exposed; the first gather is
    exposed, the other gathers overlap the step's micro-batches."""
    m = num_microbatches
    per_mb = dp_total_s / m
    first_gather = per_mb / np.maximum(1, first_gather_layers)
    fsdp = np.maximum(0.0, per_mb - pace_s) * m + first_gather
    gathers = dp_total_s - grad_sync_s
    late = grad_sync_s + first_gather_s + np.maximum(0.0, gathers - first_gather_s - m * pace_s)
    ddp = np.maximum(0.0, grad_sync_s - rank_bwd_s - rank_recompute_s) + dp_total_s - grad_sync_s
    sharded_s = np.where(deferred, late, fsdp)
    return np.where(overlapped, np.where(sharded, sharded_s, ddp), dp_total_s)


def shared_core_bubble(*, cores, ranks_per_node, step_s, bubble_s):
    """The bubble left where the ranks of a node share its cores (CPU ranks): a rank idle in the
    bubble lends its share of the cores to the busy ones, so the step shrinks towards its busy
    time, but no further than the whole step run with every rank on a core of its own."""
    if not cores:
        return bubble_s
    shrunk = np.maximum(0.0, np.minimum(bubble_s, step_s * cores / ranks_per_node
                                        - (step_s - bubble_s)))
    return np.where(ranks_per_node > cores, shrunk, bubble_s)


def _pick(per_rank: list, index):
    """Entry `index` (one per layout) of a list of per-rank values."""
    stacked = np.stack(np.broadcast_arrays(*per_rank), axis=-1)
    return np.take_along_axis(stacked, np.asarray(index)[..., None], axis=-1)[..., 0]


@dataclass(frozen=True)
class StepParts:
    """The step's parts (scalars or arrays), as TimeBreakdown reports them."""
    compute_s: Seconds
    recompute_s: Seconds
    tp_comm_s: Seconds
    pp_comm_s: Seconds
    bubble_s: Seconds
    dp_comm_exposed_s: Seconds
    optimizer_s: Seconds
    dp_comm_total_s: Seconds
    slowest: object          # index into the ranks given

    @property
    def step_s(self):
        return (self.compute_s + self.recompute_s + self.tp_comm_s + self.pp_comm_s
                + self.bubble_s + self.dp_comm_exposed_s + self.optimizer_s)


def step_parts(*, ranks: list, mean_total_s, pp, virtual_stages, zero_bubble, num_microbatches,
               dp_total_s: list, grad_sync_s: list, optimizer_s: list, first_gather_s: list,
               sharded, deferred, overlapped, first_gather_layers, cores,
               ranks_per_node) -> StepParts:
    """The step from the ranks' micro-batch times (RankMicrobatch), their data-parallel
    collective times and optimizer times.  The slowest rank sets the pipeline's pace; the fill
    and drain cost the bubble multiple of the mean rank time (Narayanan et al. 2021, Eq. 1); the
    rank with the longest exposed-DP + optimizer tail ends the step."""
    m = num_microbatches
    slow = np.argmax(np.stack(np.broadcast_arrays(*[r.total_s for r in ranks]), axis=-1), axis=-1)
    s = RankMicrobatch(**{k: _pick([getattr(r, k) for r in ranks], slow)
                          for k in RankMicrobatch.__dataclass_fields__})
    bubble = bubble_chunks(pp=pp, virtual_stages=virtual_stages, zero_bubble=zero_bubble,
                           fwd_s=s.compute_fwd_s, bwd_s=s.compute_bwd_s + s.recompute_s,
                           wgrad_s=s.wgrad_s) * mean_total_s
    exposed = [dp_exposed(dp_total_s=total, grad_sync_s=sync, num_microbatches=m,
                          pace_s=s.total_s, rank_bwd_s=r.compute_bwd_s,
                          rank_recompute_s=r.recompute_s, sharded=sharded, deferred=deferred,
                          overlapped=overlapped, first_gather_layers=first_gather_layers,
                          first_gather_s=gather)
               for r, total, sync, gather in zip(ranks, dp_total_s, grad_sync_s, first_gather_s)]
    tail = np.argmax(np.stack(np.broadcast_arrays(*[e + o for e, o in zip(exposed, optimizer_s)]),
                              axis=-1), axis=-1)
    dp_exp, opt = _pick(exposed, tail), _pick(optimizer_s, tail)
    busy = m * s.total_s
    bubble = shared_core_bubble(cores=cores, ranks_per_node=ranks_per_node,
                                step_s=busy + bubble + dp_exp + opt, bubble_s=bubble)
    return StepParts(compute_s=m * (s.compute_fwd_s + s.compute_bwd_s),
                     recompute_s=m * s.recompute_s, tp_comm_s=m * s.tp_comm_s,
                     pp_comm_s=m * s.pp_comm_s, bubble_s=bubble, dp_comm_exposed_s=dp_exp,
                     optimizer_s=opt, dp_comm_total_s=_pick(dp_total_s, tail), slowest=slow)
