"""What the simulator schedules: SimCosts, the duration of every kind of event, built from a plan
by the cost model (planner/cost/*) so that simulator and estimate share one source of truth, or
by hand (tests use uniform stages without communication)."""

from collections.abc import Sequence
from dataclasses import dataclass

from planner.cost.comm_plan import (dp_collectives, fsdp_rounds, pp_p2p_per_microbatch,
                                    tp_pass_seconds, tp_recompute_seconds)
from planner.cost import moe
from planner.cost.compute import LayerTimes, head_times, layer_times
from planner.cost.context import cp_collectives, cp_exposed, local_job
from planner.cost.fields import call, plan_fields, with_rank
from planner.cost.memory import rank_memory
from planner.cost.pipeline import recomputed
from planner.cost.time import (accumulation_seconds_per_byte, cp_recompute_seconds, exposed_tp,
                               optimizer_seconds, recompute_seconds)
from planner.cost.offload import offload_seconds
from planner.engines import DDP_STAGES, SCHEDULES, deferred_fsdp, dp_overlapped
from planner.plan import Plan

# none; DDP all-reduce; FSDP2 per micro-batch; FSDP2 under pipelining, reduced once per step
# (planner.engines.deferred_fsdp)
DP_MODES = ("none", "all_reduce", "sharded", "deferred")
MAX_BUCKETS_PER_CHUNK = 8   # DDP gradient buckets per chunk: one per layer, at most this many
_NO_HEAD = LayerTimes(0.0, 0.0, 0.0, 0.0, 0.0, 0.0)


def _tuple_of(values, name: str, n: int) -> tuple:
    values = tuple(float(x) for x in values)
    if len(values) != n:
        raise ValueError(f"{name} has {len(values)} entries; expected {n}")
    if any(x < 0 for x in values):
        raise ValueError(f"{name} must be >= 0, got {min(values)}")
    return values


@dataclass(frozen=True, kw_only=True)
class SimCosts:
    """Everything the simulator schedules, in seconds.  chunk_* are per model chunk in pipeline
    order and per micro-batch; rank_* per pipeline rank.  Build with `plan_costs(plan)` or by
    hand (tests use uniform stages without communication)."""
    schedule: str
    pp: int
    virtual_stages: int = 1
    num_microbatches: int
    chunk_fwd_s: Sequence
    chunk_bwd_s: Sequence                  # full backward, weight gradient included
    chunk_wgrad_s: Sequence = ()
    chunk_recompute_s: Sequence = ()
    chunk_tp_fwd_s: Sequence = ()          # TP collectives of the forward (all exposed)
    chunk_tp_recompute_s: Sequence = ()    # ... of a full recompute (all exposed)
    chunk_tp_bwd_s: Sequence = ()          # ... of the backward
    chunk_tp_bwd_exposed_s: Sequence = ()  # the part of chunk_tp_bwd_s not hidden by wgrad
    chunk_cp_fwd_s: Sequence = ()          # context-parallel K/V traffic of the forward
    chunk_cp_fwd_exposed_s: Sequence = ()  # ... not hidden by attention (ring; else all)
    chunk_cp_bwd_s: Sequence = ()          # ... of the backward
    chunk_cp_bwd_exposed_s: Sequence = ()
    chunk_ep_fwd_s: Sequence = ()          # expert all-to-alls inside the forward (exposed)
    chunk_ep_bwd_s: Sequence = ()          # ... inside the backward (exposed)
    chunk_param_share: Sequence = ()       # fraction of its rank's parameters in each chunk
    chunk_buckets: Sequence = ()           # gradient buckets per chunk
    p2p_s: float = 0.0                     # one activation or gradient send between ranks
    dp_mode: str = "none"                  # none | all_reduce | sharded | deferred
    dp_overlap: bool = True
    rank_grad_sync_s: Sequence = ()        # all_reduce, deferred: per step; sharded: per mb
    rank_gather_s: Sequence = ()           # sharded, deferred: one gather of the rank's params
    gathers_per_microbatch: int = 0        # ZeRO-2: 1 (before F), ZeRO-3: 2 (also before B)
    rank_after_step_s: Sequence = ()       # ZeRO-1 parameter broadcast after the step
    rank_optimizer_s: Sequence = ()
    blocking_p2p: bool = True

    def __post_init__(self):
        _check_schedule(self.schedule, self.pp, self.virtual_stages, self.num_microbatches)
        n, p = self.pp * self.virtual_stages, self.pp
        defaults = {"chunk_wgrad_s": n, "chunk_recompute_s": n, "chunk_tp_fwd_s": n,
                    "chunk_tp_recompute_s": n, "chunk_tp_bwd_s": n, "chunk_tp_bwd_exposed_s": n,
                    "chunk_cp_fwd_s": n, "chunk_cp_fwd_exposed_s": n, "chunk_cp_bwd_s": n,
                    "chunk_cp_bwd_exposed_s": n,
                    "chunk_ep_fwd_s": n, "chunk_ep_bwd_s": n,
                    "rank_grad_sync_s": p, "rank_gather_s": p,
                    "rank_after_step_s": p, "rank_optimizer_s": p}
        for name in ("chunk_fwd_s", "chunk_bwd_s", *defaults):
            value = getattr(self, name) or (0.0,) * defaults.get(name, 0)
            object.__setattr__(self, name, _tuple_of(value, name, defaults.get(name, n)))
        share = self.chunk_param_share or [1.0 / self.virtual_stages] * n
        object.__setattr__(self, "chunk_param_share", _tuple_of(share, "chunk_param_share", n))
        buckets = tuple(self.chunk_buckets or (1,) * n)
        if len(buckets) != n or any(not isinstance(k, int) or k < 1 for k in buckets):
            raise ValueError(f"chunk_buckets must be {n} integers >= 1, got {list(buckets)}")
        object.__setattr__(self, "chunk_buckets", buckets)
        if self.dp_mode not in DP_MODES:
            raise ValueError(f"dp_mode must be one of {', '.join(DP_MODES)}, got "
                             f"{self.dp_mode!r}")
        if any(w > b for w, b in zip(self.chunk_wgrad_s, self.chunk_bwd_s)):
            raise ValueError("chunk_wgrad_s must not exceed chunk_bwd_s")


def _check_schedule(schedule: str, pp: int, v: int, m: int) -> None:
    for name, value in (("pp", pp), ("virtual_stages", v), ("num_microbatches", m)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
    if schedule not in SCHEDULES:
        raise ValueError(f"schedule must be one of {', '.join(SCHEDULES)}; got {schedule!r}")
    if schedule in ("gpipe", "1f1b") and v != 1:
        raise ValueError(f"schedule {schedule} runs one stage per rank; virtual_stages is {v}")
    if schedule == "zbv" and v != 2:
        raise ValueError(f"schedule zbv runs exactly 2 virtual stages per rank, got {v}")


def plan_costs(plan: Plan) -> SimCosts:
    """Durations of every event of `plan`, from the cost model (planner/cost/*)."""
    spec, lay, named = plan.model, plan.layout, plan_fields(plan)
    lt = call(layer_times, named)
    ht = head_times(named["gpu"], spec, local_job(plan.job, lay.cp), tp=lay.tp,
                    micro_batch=lay.micro_batch)
    tp_pass, tp_bwd = call(tp_pass_seconds, named)
    tp_exposed = exposed_tp(plan.job, tp_pass, tp_bwd, lt.wgrad_s)
    # the estimate's own per-recomputed-layer seconds (planner.cost.time)
    tp_rec, rec = call(tp_recompute_seconds, named), call(recompute_seconds, named)
    rec += call(cp_recompute_seconds, named)  # the K/V traffic the recompute runs again
    layers = lay.stage_layers(spec.num_layers)
    recomputed = _chunk_recomputed(lay, spec.num_layers)
    head = [ht if c == len(layers) - 1 else _NO_HEAD for c in range(len(layers))]
    per_rank = [sum(lay.rank_chunk_layers(spec.num_layers)[r]) for r in range(lay.pp)]
    p2p = call(pp_p2p_per_microbatch, named)
    cp = _cp_layer_seconds(lay, named, lt)
    moe_n = _chunk_moe_layers(lay, spec)
    moe_f, moe_b = call(moe.moe_layer_delta_seconds, named)
    ep = call(moe.ep_comm_seconds, named) / 2  # dispatch + combine each way
    return SimCosts(
        schedule=lay.schedule, pp=lay.pp, virtual_stages=lay.virtual_stages,
        num_microbatches=lay.num_microbatches,
        chunk_fwd_s=[n * (lt.fwd_s + tp_pass + cp[1]) + h.fwd_s + k * (moe_f + ep)
                     for n, h, k in zip(layers, head, moe_n)],
        chunk_bwd_s=[n * (lt.bwd_s + tp_exposed - tp_pass + cp[3]) + h.bwd_s + k * (moe_b + ep)
                     for n, h, k in zip(layers, head, moe_n)],
        chunk_cp_fwd_s=[n * cp[0] for n in layers],
        chunk_cp_fwd_exposed_s=[n * cp[1] for n in layers],
        chunk_cp_bwd_s=[n * cp[2] for n in layers],
        chunk_cp_bwd_exposed_s=[n * cp[3] for n in layers],
        chunk_wgrad_s=[n * lt.wgrad_s + h.wgrad_s + k * moe_b / 2
                       for n, h, k in zip(layers, head, moe_n)],
        chunk_ep_fwd_s=[k * ep for k in moe_n], chunk_ep_bwd_s=[k * ep for k in moe_n],
        chunk_recompute_s=[k * (rec + tp_rec) for k in recomputed],
        chunk_tp_fwd_s=[n * tp_pass for n in layers],
        chunk_tp_recompute_s=[k * tp_rec for k in recomputed],
        chunk_tp_bwd_s=[n * tp_bwd for n in layers],
        chunk_tp_bwd_exposed_s=[n * (tp_exposed - tp_pass) for n in layers],
        chunk_param_share=[n / per_rank[lay.chunk_rank(c)] for c, n in enumerate(layers)],
        chunk_buckets=[max(1, min(n, MAX_BUCKETS_PER_CHUNK)) for n in layers],
        p2p_s=p2p[0].time_each_s if p2p else 0.0, **_dp_costs(plan, named))


def _cp_layer_seconds(lay, named: dict, lt) -> tuple:
    """Per layer and micro-batch: (forward CP seconds, exposed, backward, exposed); the ring's
    sends overlap the attention of the block at hand (planner/cost/context.py)."""
    if lay.cp == 1:
        return 0.0, 0.0, 0.0, 0.0
    fwd, bwd = call(cp_collectives, named)
    f, b = sum(c.time_s for c in fwd), sum(c.time_s for c in bwd)
    f_exp = cp_exposed(lay.cp_comm, lay.cp, fwd, [], lt.attention_fwd_s, 0.0)
    b_exp = cp_exposed(lay.cp_comm, lay.cp, [], bwd, 0.0, lt.attention_bwd_s)
    return f, f_exp, b, b_exp


def _chunk_moe_layers(lay, spec) -> list:
    """MoE layers of each chunk (pipeline order); 0 for a dense model."""
    out, start = [], 0
    for n in lay.stage_layers(spec.num_layers):
        out.append(sum(spec.moe.is_moe_layer(i) for i in range(start, start + n))
                   if spec.moe is not None else 0)
        start += n
    return out


def _chunk_recomputed(lay, num_layers: int) -> list:
    """Blocks of each chunk (pipeline order) running the recompute policy."""
    if lay.recompute == "none":
        return [0] * lay.num_chunks
    out, start = [], 0
    for n in lay.stage_layers(num_layers):
        out.append(sum(recomputed(i, lay.recompute_every) for i in range(start, start + n)))
        start += n
    return out


def _sync_s(colls: list) -> float:
    """Gradient-sync seconds: the first collective plus hybrid sharding's replica all-reduce."""
    return colls[0].time_s + sum(c.time_s for c in colls if c.axis == "dp_replicate")


def _optimizer_s(plan: Plan, named: dict, pp_rank: int) -> float:
    """The rank's AdamW step and the gradient accumulation of micro-batches 2..m."""
    lay, mem = plan.layout, rank_memory(plan, pp_rank)
    accumulate = accumulation_seconds_per_byte(named["gpu"], plan.job,
                                               num_microbatches=lay.num_microbatches)
    return (optimizer_seconds(named["gpu"], plan.job, tp=lay.tp, zero_stage=lay.zero_stage,
                              optimizer_bytes=mem.optimizer_bytes)
            + float(accumulate) * mem.gradients_bytes)


def _dp_costs(plan: Plan, named: dict) -> dict:
    lay = plan.layout
    ranks = [with_rank(named, r) for r in range(lay.pp)]
    colls = [call(dp_collectives, r) for r in ranks]
    # the GPU AdamW step and gradient accumulation, plus the CPU step and host-link copies of
    # CPU offload
    opt = [_optimizer_s(plan, named, r) + call(offload_seconds, rank)
           for r, rank in zip(range(lay.pp), ranks)]
    common = {"rank_optimizer_s": opt,
              "dp_overlap": bool(dp_overlapped(plan.job.engine, lay.zero_stage, lay.pp,
                                               lay.dp * lay.cp))}
    if lay.dp * lay.cp == 1:
        return common
    if lay.zero_stage in DDP_STAGES:
        return {**common, "dp_mode": "all_reduce", "rank_grad_sync_s": [_sync_s(c) for c in colls],
                "rank_after_step_s": [sum(x.time_s for x in c[1:] if x.axis != "dp_replicate")
                                      for c in colls]}
    deferred = bool(deferred_fsdp(plan.job.engine, lay.zero_stage, lay.pp))
    reduces, gathers = fsdp_rounds(plan.job.engine, lay.zero_stage, lay.pp, lay.num_microbatches)
    # one round of a rank's FSDP2 groups: every group's reduce-scatter or gather once
    return {**common, "dp_mode": "deferred" if deferred else "sharded",
            # hybrid sharding: each reduce-scatter's replica all-reduce follows it
            "rank_grad_sync_s": [_sync_s(c) / reduces for c in colls],
            "rank_gather_s": [c[1].time_s / gathers for c in colls],
            "gathers_per_microbatch": 2 if lay.zero_stage == 3 else 1}
