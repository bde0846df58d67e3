"""Every collective of one training step for one rank: what, how big, how often, over which
link (tensor, pipeline and data parallel).  Keyword parameters are named as in
planner/cost/fields.py."""

from dataclasses import replace

from planner.cost import deepspeed as ds
from planner.cost.comm import make_collective
from planner.cost.context import local_job
from planner.cost.fp8 import fp8_gather, linear_weight_numel
from planner.cost.params import _local_numel
from planner.engines import deferred_fsdp, engine
from planner.plan import Mesh
from planner.topology import axis_link, pipeline_p2p_link
from planner.units import dtype_bytes


def tp_pattern(plan) -> tuple:
    """(forward, backward) collectives of one layer as [(kind, count)] for a plan."""
    return tp_pattern_for(plan.model.mlp, plan.layout.sequence_parallel, plan.job.engine)


def tp_pattern_for(mlp: str, sp: bool, engine_name: str) -> tuple:
    """(forward, backward) collectives of one layer as [(kind, count)], each over one
    [micro-batch, sequence, hidden] activation.

    Megatron-LM: two all-reduces in forward and two in backward (Shoeybi et al. 2019, Fig. 4);
    with sequence parallelism each becomes an all-gather plus a reduce-scatter of the same volume,
    mirrored in backward (Korthikanti et al. 2022, Sec. 4.2.2).  PyTorch DTensor (the `torch`
    engine) forwards the same way but in backward all-reduces the input gradient of every
    column-parallel projection on its own (q, k, v and the MLP's first projections) and, under
    sequence parallelism, re-gathers the two row-parallel output gradients; counted on the
    runtime by tests/test_tp_census.py."""
    forward = [("all_gather", 2), ("reduce_scatter", 2)] if sp else [("all_reduce", 2)]
    if not engine(engine_name).tp_bwd_all_reduces_each_colwise:
        return forward, forward
    colwise = 3 + (2 if mlp == "swiglu" else 1)
    return forward, ([("all_gather", 2)] if sp else []) + [("all_reduce", colwise)]


def _mesh(mesh_order, dp, tp, pp, cp=1, dp_shard=0) -> Mesh:
    return Mesh(mesh_order=tuple(mesh_order), dp=dp, tp=tp, pp=pp, cp=cp, dp_shard=dp_shard)


def _tp_collectives(profile, spec, job, mesh: Mesh, micro_batch: int, pattern: list) -> list:
    link = axis_link(profile, mesh, "tp")
    nbytes = dtype_bytes(job.dtype) * micro_batch * job.seq_len * spec.hidden_size
    return [make_collective(f"tp_{kind}", kind, link, count, nbytes) for kind, count in pattern]


def tp_pass_seconds(profile, spec, job, *, mesh_order, dp, tp, pp, sequence_parallel,
                    micro_batch, cp=1) -> tuple:
    """(forward, backward) seconds of one layer's TP collectives for one micro-batch (over the
    rank's s/cp tokens under context parallelism)."""
    if tp == 1:
        return 0.0, 0.0
    mesh, job = _mesh(mesh_order, dp, tp, pp, cp), local_job(job, cp)
    return tuple(sum(c.time_s for c in _tp_collectives(profile, spec, job, mesh, micro_batch, p))
                 for p in tp_pattern_for(spec.mlp, sequence_parallel, job.engine))


# collectives whose output torchtitan's op-level policy saves (its _save_list); the others are
# re-run when the block is recomputed
OP_POLICY_SAVED_COLLECTIVES = ("reduce_scatter",)


def recomputed_tp_pattern(forward: list, recompute: str, stops_early: bool = False) -> list:
    """The forward collectives a recomputed block runs again: all of them under full
    recompute, all but the saved reduce-scatters under the op-level policy, none otherwise
    (selective recomputes the attention core only).  Where the recompute `stops_early`
    (PyTorch's checkpoint), the block's last collective - the MLP output's reduction, after the
    last tensor backward needs - is not re-run (counted on the runtime: tests/test_tp_census.py)."""
    if recompute == "full":
        rerun = list(forward)
    elif recompute == "op":
        rerun = [(k, n) for k, n in forward if k not in OP_POLICY_SAVED_COLLECTIVES]
    else:
        return []
    if stops_early and forward:
        last = forward[-1][0]
        rerun = [(k, n - 1 if k == last else n) for k, n in rerun]
    return [(k, n) for k, n in rerun if n > 0]


def tp_recompute_seconds(profile, spec, job, *, mesh_order, dp, tp, pp, sequence_parallel,
                         micro_batch, recompute, cp=1) -> float:
    """Seconds of the TP collectives one recomputed layer re-runs (one micro-batch)."""
    if tp == 1:
        return 0.0
    job = local_job(job, cp)
    forward, _ = tp_pattern_for(spec.mlp, sequence_parallel, job.engine)
    pattern = recomputed_tp_pattern(forward, recompute, engine(job.engine).recompute_stops_early)
    return sum(c.time_s for c in _tp_collectives(profile, spec, job,
                                                  _mesh(mesh_order, dp, tp, pp, cp), micro_batch,
                                                  pattern))


def tp_collectives_per_layer(profile, spec, job, *, mesh_order, dp, tp, pp, sequence_parallel,
                             micro_batch, recompute, cp=1) -> list:
    """Per recomputed layer and micro-batch, forward + backward + the collectives the recompute
    re-runs (recomputed_tp_pattern)."""
    if tp == 1:
        return []
    job = local_job(job, cp)
    forward, backward = tp_pattern_for(spec.mlp, sequence_parallel, job.engine)
    counts: dict = {}
    for kind, count in forward + recomputed_tp_pattern(forward, recompute,
                                                       engine(job.engine).recompute_stops_early):
        counts[kind] = counts.get(kind, 0) + count
    for kind, count in backward:
        counts[kind] = counts.get(kind, 0) + count
    return _tp_collectives(profile, spec, job, _mesh(mesh_order, dp, tp, pp, cp), micro_batch,
                           list(counts.items()))


def pp_p2p_per_microbatch(profile, spec, job, *, mesh_order, dp, tp, pp, sequence_parallel,
                          micro_batch, virtual_stages, cp=1) -> list:
    """Activation sent forward and its gradient sent backward at each chunk boundary (the
    sequence-parallel activation is sharded, so 1/t of it crosses; Korthikanti Sec. 4.2.3)."""
    if pp == 1:
        return []
    link = pipeline_p2p_link(profile, _mesh(mesh_order, dp, tp, pp, cp))
    job = local_job(job, cp)
    div = tp if sequence_parallel else 1
    nbytes = dtype_bytes(job.dtype) * micro_batch * job.seq_len * spec.hidden_size / div
    return [make_collective("pp_send_activation", "p2p", link, virtual_stages, nbytes),
            make_collective("pp_send_gradient", "p2p", link, virtual_stages, nbytes)]


def dp_collectives(profile, spec, job, *, mesh_order, dp, tp, pp, zero_stage, num_microbatches,
                   rank_layers, holds_embedding, holds_head, tied_copy, cp=1, rank_moe_layers=0,
                   ep=1, etp=1, dp_shard=0) -> list:
    """Gradient synchronisation and parameter gathers of one step on one pipeline rank.

    ZeRO-0: all-reduce of the gradients; ZeRO-1: the same plus an all-gather of the updated
    parameters (torch: the sharded AdamW all-gathers its fp32 shards; Megatron's distributed
    optimizer reduce-scatters gradients and all-gathers 16-bit parameters); ZeRO-2/3 (FSDP2):
    per micro-batch a reduce-scatter of fp32 gradients and one (ZeRO-2) or two (ZeRO-3, forward
    and backward) all-gathers of the 16-bit parameters (Rajbhandari et al. 2020, Sec. 7), for
    each FSDP2 group on its own (the torch engine: every block, plus the root group holding the
    embedding or the output layer).  Under context parallelism the group is dp x cp: the cp
    ranks of a sequence hold gradients of different tokens, and FSDP shards over them too
    (torchtitan's dp_shard_cp mesh).  LoRA: gradients and optimizer shards exist for the
    trainable tensors only (`numel`); ZeRO-2/3 still gather every parameter (`all_numel`).
    The experts of MoE layers are not here (planner.cost.moe.expert_grad_sync_seconds).
    Hybrid sharding (0 < dp_shard < dp) runs the reduce-scatters and gathers within the shard
    group and, after every reduce-scatter, all-reduces its 1/dp_shard output across the
    dp / dp_shard replicas (hybrid_all_reduce; not with cp > 1: rule cp_hsdp)."""
    if dp * cp == 1:
        return []
    hybrid = 0 < dp_shard < dp
    mesh = _mesh(mesh_order, dp, tp, pp, cp, dp_shard)
    link = axis_link(profile, mesh, "dp_shard" if hybrid else "dp_cp" if cp > 1 else "dp")
    link = replace(link, axis="dp") if cp > 1 else link
    colls = _dp_sync(profile, spec, job, link,
                     zero_stage=zero_stage, pp=pp, num_microbatches=num_microbatches, tp=tp,
                     pieces=(rank_layers, holds_embedding, holds_head, tied_copy),
                     experts=(rank_moe_layers, ep, etp))
    if hybrid:
        colls.append(hybrid_all_reduce(colls[0], axis_link(profile, mesh, "dp_replicate"),
                                       dp_shard))
    return colls


def hybrid_all_reduce(reduce_scatter, link, dp_shard: int):
    """HSDP's replica all-reduce: FSDP2 (_fsdp_collectives.foreach_reduce: all_reduce over the
    replicate group of the reduce-scatter output) and Megatron's distributed optimizer instances
    (param_and_grad_buffer: inter-instance all-reduce of the reduce-scattered bucket) both
    all-reduce the rank's 1/dp_shard gradient shard, once per reduce-scatter."""
    return make_collective("dp_replicate_all_reduce", "all_reduce", link, reduce_scatter.count,
                           reduce_scatter.bytes_each / dp_shard)


def _dp_sync(profile, spec, job, link, *, zero_stage, pp, num_microbatches, tp,
             pieces, experts=(0, 1, 1)) -> list:
    """The collectives of dp_collectives over one group's link (dp, or the shard group);
    `experts`: (MoE layers of the rank, ep, etp)."""
    eng = engine(job.engine)
    rank_layers, holds_embedding, holds_head, tied_copy = pieces
    rank_moe_layers, ep, etp = experts
    inv = job if job.task == "classify" or job.lora is not None else None
    numel = _local_numel(spec, tp, rank_layers, holds_embedding, holds_head, tied_copy, inv,
                         trainable_only=True)
    all_numel = _local_numel(spec, tp, rank_layers, holds_embedding, holds_head, tied_copy, inv)
    if rank_moe_layers:  # MoE layers: router and shared experts instead of the dense MLP; the
        #                  experts sync over expert-dp (planner/cost/moe.py)
        from planner.cost.moe import moe_layer_numels
        delta = rank_moe_layers * moe_layer_numels(spec, tp, ep, etp)[0]
        numel, all_numel = numel + delta, all_numel + delta
    a, m = dtype_bytes(job.dtype), num_microbatches
    grad_bytes = 2 * numel if eng.fp16_grads_reduced_in_fp16 and job.dtype == "fp16" \
        else 4 * numel
    if eng.grads_in_model_dtype:
        grad_bytes = a * numel
    if zero_stage == 0:
        ar = [make_collective("dp_all_reduce", "all_reduce", link, 1, grad_bytes)]
        if eng.deepspeed_optimizers and ds.optimizer_wrapper(job.dtype, 0, pp) \
                == "BF16_Optimizer":  # update_lp_params all-gathers the bf16 partitions
            ar.append(make_collective("dp_param_all_gather", "all_gather", link, 1, a * numel))
        return ar
    if zero_stage == 1:
        if eng.zero1_reduce_scatters:
            return [make_collective("dp_reduce_scatter", "reduce_scatter", link, 1, grad_bytes),
                    make_collective("dp_param_all_gather", "all_gather", link, 1, a * numel)]
        return [make_collective("dp_all_reduce", "all_reduce", link, 1, grad_bytes),
                make_collective("dp_param_broadcast", "all_gather", link, 1, 4 * numel)]
    groups = 1
    if eng.fsdp_groups_per_block:
        groups = rank_layers + (1 if holds_embedding or holds_head else 0)
    reduces, gathers = fsdp_rounds(job.engine, zero_stage, pp, m)
    gathered = a * all_numel
    if fp8_gather(job, zero_stage):  # FSDP2 fp8 all-gather: block linears in 1 byte, not 2
        gathered -= linear_weight_numel(spec, tp) * rank_layers
    return [make_collective("dp_reduce_scatter", "reduce_scatter", link, reduces * groups,
                            grad_bytes / groups if eng.grads_in_model_dtype
                            else 4 * numel / groups),
            make_collective("dp_param_all_gather", "all_gather", link, gathers * groups,
                            gathered / groups)]


def fsdp_rounds(engine_name: str, zero_stage: int, pp: int, m: int) -> tuple:
    """(reduce-scatters, all-gathers) of each FSDP2 group per step.  Without pipelining: per
    micro-batch one reduce-scatter and one (ZeRO-2) or two (ZeRO-3) gathers.  Under pipelining
    (engines.deferred_fsdp) one reduce-scatter per step; ZeRO-2 gathers once; ZeRO-3 reshards
    after each forward but not after a backward, so it gathers for the first forward, for each
    forward that follows a forward and for each backward that follows a forward: m + 1 in GPipe
    and 1F1B (counted on 4 gloo ranks, dp=2 x pp=2, m=4: 5 per group)."""
    if deferred_fsdp(engine_name, zero_stage, pp):
        return 1, (m + 1 if zero_stage == 3 else 1)
    if zero_stage == 2 and engine(engine_name).zero2_params_replicated:
        return m, 1  # DeepSpeed ZeRO-2: whole 16-bit weights, gathered after the update
    return m, (2 * m if zero_stage == 3 else m)
