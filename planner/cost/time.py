"""Step time of a plan: per-rank micro-batch time (compute, recompute, exposed TP and PP
communication), the pipeline bubble, exposed data-parallel communication and the optimizer.

Overlap rules: forward TP collectives sit on the critical path; in backward, Megatron-LM overlaps
the input-gradient all-reduce (or, with sequence parallelism, the re-gather and reduce-scatter)
with the weight-gradient GEMM (Megatron-LM `LinearWithGradAccumulationAndAsyncCommunication`;
Korthikanti et al. 2022, Sec. 4.2.2), while PyTorch's default DTensor TP overlaps nothing;
pipeline sends are blocking between chunks; the `torch`
engine's DDP all-reduce overlaps the last micro-batch's backward and FSDP2 overlaps each
micro-batch's gathers and reduce-scatters with its compute; the `megatron` engine's gradient
all-reduce is not overlapped (Korthikanti et al. 2022, Sec. 6.3)."""

from dataclasses import dataclass, fields

import numpy as np

from planner.cost import moe, ops
from planner.cost.combine import RankMicrobatch, rank_microbatch, step_parts
from planner.cost.comm_plan import (dp_collectives, pp_p2p_per_microbatch, tp_pass_seconds,
                                    tp_recompute_seconds)
from planner.cost.context import cp_collectives, cp_exposed, cp_rerun_collectives, local_job
from planner.cost.compute import (head_times, layer_times, op_policy_recompute_s,
                                  selective_recompute_s)
from planner.cost.fields import (PlanEvaluations, call, plan_fields, rank_facts_of,
                                 recomputed_layers_of, unpack)
from planner.cost.flops import recomputed_layer_count
from planner.cost.offload import offload_seconds
from planner.engines import (SHARDED_GRAD_STAGES, ZERO_BUBBLE, deferred_fsdp, dp_overlapped,
                             engine)

# Megatron-LM's fused Adam per parameter: read+write fp32 weight, momentum and variance, read the
# gradient, plus the gradient-norm pass for clipping (read the gradient again).  The torch engine
# counts what the runtime's AdamW really moves (planner.cost.ops, from the op census).
OPTIMIZER_BYTES_PER_PARAM = 8 + 8 + 8 + 4 + 4
# an in-place `grad += new` reads the gradient and the new one and writes the gradient
ACCUMULATE_BYTES_PER_BYTE = 3


@dataclass(frozen=True)
class TimeBreakdown:
    compute_s: float
    recompute_s: float
    tp_comm_s: float
    pp_comm_s: float
    bubble_s: float
    dp_comm_exposed_s: float
    optimizer_s: float
    dp_comm_total_s: float
    bubble_fraction: float
    slowest_pp_rank: int
    cp_comm_s: float = 0.0     # context-parallel attention traffic on the critical path
    ep_comm_s: float = 0.0     # expert-parallel all-to-all on the critical path (MoE)

    @property
    def step_s(self) -> float:
        return (self.compute_s + self.recompute_s + self.tp_comm_s + self.pp_comm_s
                + self.cp_comm_s + self.bubble_s + self.dp_comm_exposed_s + self.optimizer_s
                + self.ep_comm_s)

    def to_dict(self) -> dict:
        """Every field; ep_comm_s only where there is expert-parallel traffic (MoE plans)."""
        d = {f.name: getattr(self, f.name) for f in fields(self)}
        if not self.ep_comm_s:
            del d["ep_comm_s"]
        d["step_s"] = self.step_s
        return d

    @classmethod
    def of(cls, parts) -> "TimeBreakdown":
        """From one layout's planner.cost.combine.StepParts."""
        busy = parts.compute_s + parts.recompute_s + parts.tp_comm_s + parts.pp_comm_s + \
            parts.cp_comm_s + parts.ep_comm_s
        bubble = float(parts.bubble_s)
        return cls(compute_s=float(parts.compute_s), recompute_s=float(parts.recompute_s),
                   tp_comm_s=float(parts.tp_comm_s), pp_comm_s=float(parts.pp_comm_s),
                   cp_comm_s=float(parts.cp_comm_s),
                   bubble_s=bubble, dp_comm_exposed_s=float(parts.dp_comm_exposed_s),
                   optimizer_s=float(parts.optimizer_s),
                   dp_comm_total_s=float(parts.dp_comm_total_s),
                   bubble_fraction=bubble / (busy + bubble) if busy else 0.0,
                   slowest_pp_rank=int(parts.slowest), ep_comm_s=float(parts.ep_comm_s))


def layer_seconds(gpu, spec, job, *, tp, sequence_parallel, micro_batch,
                  compile=False, zero_stage=0, cp=1) -> tuple:
    """(forward, backward, weight-gradient) seconds of one layer and micro-batch (zero_stage:
    FP8's FSDP2 fp8 all-gather drops the per-GEMM weight casts)."""
    lt = layer_times(gpu, spec, job, tp=tp, sequence_parallel=sequence_parallel,
                     micro_batch=micro_batch, compile=compile,
                     zero_stage=zero_stage if job.fp8 else 0, cp=cp)
    return lt.fwd_s, lt.bwd_s, lt.wgrad_s


def head_seconds(gpu, spec, job, *, tp, micro_batch, cp=1) -> tuple:
    """(forward, backward, weight-gradient) seconds of the output layer and one micro-batch."""
    ht = head_times(gpu, spec, local_job(job, cp), tp=tp, micro_batch=micro_batch)
    return ht.fwd_s, ht.bwd_s, ht.wgrad_s


def recompute_seconds(gpu, spec, job, *, tp, sequence_parallel, micro_batch, recompute,
                      compile=False, cp=1) -> float:
    """Recompute per recomputed layer and micro-batch: the attention core (selective), the
    forward ops whose outputs are not saved (op; timed from the eager census also under
    `compile`) or the forward (full; compiled under `compile`); TP collectives apart."""
    if recompute == "none":
        return 0.0
    shape = {"tp": tp, "sequence_parallel": sequence_parallel, "micro_batch": micro_batch}
    if recompute == "op":
        return op_policy_recompute_s(gpu, spec, local_job(job, cp), **shape, compile=compile)
    lt = layer_times(gpu, spec, job, **shape, compile=compile, cp=cp)
    return selective_recompute_s(lt) if recompute == "selective" else lt.fwd_s


def cp_recompute_seconds(gpu, profile, spec, job, *, mesh_order, dp, tp, pp, sequence_parallel,
                         micro_batch, recompute, cp=1, cp_comm="allgather") -> float:
    """CP communication a recomputed layer adds per micro-batch: its forward collectives that
    the recompute runs again (context.cp_rerun_collectives), exposed as in the forward."""
    if cp == 1 or recompute == "none":
        return 0.0
    fwd, _ = cp_collectives(profile, spec, job, mesh_order=mesh_order, dp=dp, tp=tp, pp=pp,
                            cp=cp, cp_comm=cp_comm, micro_batch=micro_batch)
    rerun = cp_rerun_collectives(fwd, cp_comm, recompute)
    if not rerun:
        return 0.0
    lt = layer_times(gpu, spec, job, tp=tp, sequence_parallel=sequence_parallel,
                     micro_batch=micro_batch, cp=cp)
    return cp_exposed(cp_comm, cp, rerun, [], lt.attention_fwd_s, 0.0)


def tp_exposed_seconds(gpu, profile, spec, job, *, mesh_order, dp, tp, pp, sequence_parallel,
                       micro_batch, cp=1) -> float:
    """TP communication per layer and micro-batch left on the critical path (a recomputed
    layer adds comm_plan.tp_recompute_seconds)."""
    fwd, bwd = tp_pass_seconds(profile, spec, job, mesh_order=mesh_order, dp=dp, tp=tp, pp=pp,
                               sequence_parallel=sequence_parallel, micro_batch=micro_batch,
                               cp=cp)
    wgrad = layer_times(gpu, spec, job, tp=tp, sequence_parallel=sequence_parallel,
                        micro_batch=micro_batch, cp=cp).wgrad_s
    return exposed_tp(job, fwd, bwd, wgrad)


def cp_exposed_seconds(gpu, profile, spec, job, *, mesh_order, dp, tp, pp, sequence_parallel,
                       micro_batch, cp=1, cp_comm="allgather") -> float:
    """Context-parallel communication per layer and micro-batch left on the critical path
    (planner/cost/context.py)."""
    if cp == 1:
        return 0.0
    fwd, bwd = cp_collectives(profile, spec, job, mesh_order=mesh_order, dp=dp, tp=tp, pp=pp,
                              cp=cp, cp_comm=cp_comm, micro_batch=micro_batch)
    lt = layer_times(gpu, spec, job, tp=tp, sequence_parallel=sequence_parallel,
                     micro_batch=micro_batch, cp=cp)
    return cp_exposed(cp_comm, cp, fwd, bwd, lt.attention_fwd_s, lt.attention_bwd_s)


def exposed_tp(job, forward_s: float, backward_s: float, wgrad_s: float) -> float:
    """The forward's TP seconds, and the backward's unless the engine hides them behind the
    weight-gradient GEMMs."""
    if not engine(job.engine).tp_bwd_overlaps_wgrad:
        return forward_s + backward_s
    return forward_s + max(0.0, backward_s - wgrad_s)


def pp_comm_seconds(profile, spec, job, *, mesh_order, dp, tp, pp, sequence_parallel,
                    micro_batch, virtual_stages, cp=1) -> float:
    """Pipeline sends of one micro-batch on one rank (blocking)."""
    return sum(c.time_s for c in pp_p2p_per_microbatch(
        profile, spec, job, mesh_order=mesh_order, dp=dp, tp=tp, pp=pp,
        sequence_parallel=sequence_parallel, micro_batch=micro_batch,
        virtual_stages=virtual_stages, cp=cp))


def dp_seconds(profile, spec, job, *, mesh_order, dp, tp, pp, zero_stage, num_microbatches,
               rank_layers, holds_embedding, holds_head, tied_copy, cp=1, rank_moe_layers=0,
               ep=1, etp=1, dp_shard=0) -> tuple:
    """(all data-parallel seconds of the step, the gradient sync's, one FSDP group's parameter
    gather) on one pipeline rank; an MoE model's expert gradients sync over expert-dp; hybrid
    sharding's replica all-reduce follows each reduce-scatter, so it counts in the gradient
    sync."""
    moe_args = {"rank_moe_layers": int(rank_moe_layers), "ep": ep, "etp": etp}
    colls = dp_collectives(profile, spec, job, mesh_order=mesh_order, dp=dp, tp=tp, pp=pp,
                           zero_stage=zero_stage, num_microbatches=num_microbatches,
                           rank_layers=int(rank_layers), holds_embedding=bool(holds_embedding),
                           holds_head=bool(holds_head), tied_copy=bool(tied_copy), cp=cp,
                           dp_shard=int(dp_shard), **moe_args)
    experts = moe.expert_grad_sync_seconds(profile, spec, job, mesh_order=mesh_order, dp=dp,
                                           tp=tp, pp=pp, zero_stage=zero_stage, **moe_args)
    gather = colls[1].time_each_s if zero_stage in SHARDED_GRAD_STAGES and colls else 0.0
    sync = colls[0].time_s + sum(c.time_s for c in colls if c.axis == "dp_replicate") \
        if colls else 0.0
    return sum(c.time_s for c in colls) + experts, sync + experts, gather


def optimizer_seconds(gpu, job, *, tp, zero_stage, optimizer_bytes) -> float:
    """AdamW's update of the rank's parameters, memory-bound."""
    eng = engine(job.engine)
    numel = optimizer_bytes / eng.optimizer_state_bytes(job.dtype, zero_stage)
    per_param: float = OPTIMIZER_BYTES_PER_PARAM
    if eng.kernels_from_op_census and not eng.deepspeed_optimizers:  # DeepSpeed: FusedAdam
        # runtime/optim.py: fused AdamW only over plain CUDA tensors (no TP, no FSDP/ZeRO
        # sharding); foreach otherwise, and always on CPU ranks
        fused = not gpu.host_is_device and tp == 1 and zero_stage == 0
        per_param = ops.optimizer_bytes_per_param(fused)
    return numel * per_param / (gpu.hbm_bandwidth_bytes_per_s * gpu.memory_efficiency)


def accumulation_seconds_per_byte(gpu, job, *, num_microbatches) -> float:
    """Seconds per gradient byte a rank spends adding micro-batches 2..m into its gradients:
    read both, write one, 3 bytes moved per byte held, memory-bound.  The `torch` engine only:
    autograd's AccumulateGrad adds in place into an existing `.grad` (torch/csrc/autograd/
    functions/accumulate_grad.h), FSDP2 into the sharded gradient after each reduce-scatter and,
    under pipelining, into the unsharded fp32 gradient (torch/distributed/fsdp/_fully_shard/
    _fsdp_collectives.py foreach_reduce, _fsdp_param.py); the op census counts one micro-batch
    (tests/op_census.py).  Megatron-LM's fused weight-gradient GEMMs accumulate into main_grad
    (gradient_accumulation_fusion) and DeepSpeed's buffers are its own: no extra pass counted."""
    eng = engine(job.engine)
    if not eng.kernels_from_op_census or eng.deepspeed_optimizers:
        return 0.0
    adds = np.maximum(0, num_microbatches - 1)
    bandwidth = gpu.hbm_bandwidth_bytes_per_s * gpu.memory_efficiency
    return ACCUMULATE_BYTES_PER_BYTE * adds / bandwidth


def step_inputs(spec, job, profile, *, world, pp, virtual_stages, schedule, zero_stage,
                dp, num_microbatches, cp=1) -> dict:
    """What the step combination needs besides the ranks (planner.cost.combine.step_parts);
    scalars, or numpy columns (schedule and zero_stage then hold names and stages)."""
    return {"pp": pp, "virtual_stages": virtual_stages, "num_microbatches": num_microbatches,
            "zero_bubble": np.isin(schedule, ZERO_BUBBLE),
            "sharded": np.isin(zero_stage, SHARDED_GRAD_STAGES),
            "deferred": deferred_fsdp(job.engine, zero_stage, pp),
            "overlapped": dp_overlapped(job.engine, zero_stage, pp, dp * cp),
            "first_gather_layers": spec.num_layers // pp, "cores": profile.gpu.shared_cores,
            "ranks_per_node": np.minimum(world, profile.gpus_per_node)}


def _microbatch(evaluate, layers, holds_head, recomputed, sends=1,
                moe_layers=0) -> RankMicrobatch:
    """A micro-batch through `layers` layers, `recomputed` of them recomputed (and the output
    layer where holds_head), with `sends` times one rank's pipeline sends; `moe_layers` of the
    layers are MoE layers (planner/cost/moe.py)."""
    layer, head = unpack(evaluate(layer_seconds), 3), unpack(evaluate(head_seconds), 3)
    moe_fwd, moe_bwd = unpack(evaluate(moe.moe_layer_delta_seconds), 2)
    return rank_microbatch(
        moe_layers=moe_layers, moe_fwd_s=moe_fwd, moe_bwd_s=moe_bwd,
        ep_comm_per_layer_s=evaluate(moe.ep_comm_seconds),
        rank_layers=layers, holds_head=holds_head, layer_fwd_s=layer[0], layer_bwd_s=layer[1],
        layer_wgrad_s=layer[2], head_fwd_s=head[0], head_bwd_s=head[1], head_wgrad_s=head[2],
        recompute_per_layer_s=evaluate(recompute_seconds) + evaluate(cp_recompute_seconds),
        tp_exposed_per_layer_s=evaluate(tp_exposed_seconds),
        cp_exposed_per_layer_s=evaluate(cp_exposed_seconds),
        pp_comm_s=sends * evaluate(pp_comm_seconds), recomputed_layers=recomputed,
        tp_recompute_per_layer_s=evaluate(tp_recompute_seconds))


@dataclass(frozen=True)
class RankTime:
    """One pipeline rank's times (scalars, or one entry per layout)."""
    microbatch: RankMicrobatch
    dp_total_s: object         # every data-parallel collective of the step
    grad_sync_s: object        # the gradient all-reduce or reduce-scatter part of it
    first_gather_s: object     # one FSDP2 group's parameter gather (ZeRO-2/3)
    optimizer_s: object


def rank_time_parts(evaluate, optimizer_bytes, gradients_bytes) -> RankTime:
    """One rank's times from its pieces: `evaluate(fn)` is fn's result for the rank
    (planner/cost/fields.py).  Its optimizer time includes the gradient accumulation of
    micro-batches 2..m (accumulation_seconds_per_byte)."""
    layers, _, _, last = unpack(evaluate(rank_facts_of), 4)
    total, sync, gather = unpack(evaluate(dp_seconds), 3)
    recomputed = evaluate(recomputed_layers_of)
    moe_layers = evaluate(moe.rank_moe_layers_of)
    return RankTime(microbatch=_microbatch(evaluate, layers, last == 1, recomputed,
                                           moe_layers=moe_layers),
                    dp_total_s=total,
                    grad_sync_s=sync, first_gather_s=gather,
                    optimizer_s=optimizer_bytes * evaluate(optimizer_seconds_per_byte)
                    + gradients_bytes * evaluate(accumulation_seconds_per_byte)
                    + evaluate(offload_seconds))


def model_recomputed_layers(spec, *, recompute, recompute_every) -> int:
    """Blocks of the whole model running the recompute policy."""
    return recomputed_layer_count(spec.num_layers, recompute, recompute_every)


def mean_rank_s(evaluate, num_layers: int, pp) -> object:
    """The mean over all pipeline ranks of their micro-batch time: every layer, the output
    layer and every rank's sends, over pp."""
    recomputed = evaluate(model_recomputed_layers)
    moe_layers = evaluate(model_moe_layers)
    return _microbatch(evaluate, num_layers, True, recomputed, sends=pp,
                       moe_layers=moe_layers).total_s / pp


def model_moe_layers(spec) -> int:
    return spec.moe.num_moe_layers(spec.num_layers) if spec.moe is not None else 0


def optimizer_seconds_per_byte(gpu, job, *, tp, zero_stage) -> float:
    """The optimizer step is linear in the bytes it updates."""
    return optimizer_seconds(gpu, job, tp=tp, zero_stage=zero_stage, optimizer_bytes=1.0)


def step_of(ranks: list, step: dict, mean_rank_total_s):
    """planner.cost.combine.step_parts from the RankTime of each rank."""
    return step_parts(ranks=[r.microbatch for r in ranks], mean_total_s=mean_rank_total_s,
                      dp_total_s=[r.dp_total_s for r in ranks],
                      grad_sync_s=[r.grad_sync_s for r in ranks],
                      optimizer_s=[r.optimizer_s for r in ranks],
                      first_gather_s=[r.first_gather_s for r in ranks], **step)


def time_breakdown(plan, rank_memories: list,
                   evaluations: PlanEvaluations | None = None) -> TimeBreakdown:
    named, pp = plan_fields(plan), plan.layout.pp
    evaluations = evaluations or PlanEvaluations(named)
    evaluators = [evaluations.evaluator(r) for r in range(pp)]
    ranks = [rank_time_parts(ev, mem.optimizer_bytes, mem.gradients_bytes)
             for ev, mem in zip(evaluators, rank_memories)]
    mean = mean_rank_s(evaluators[0], plan.model.num_layers, pp)
    return TimeBreakdown.of(step_of(ranks, call(step_inputs, named), mean))
