"""Every collective of one training step for the most loaded rank: what, how big, how often,
over which link (tensor, pipeline and data parallel)."""

from planner.cost.comm import make_collective
from planner.cost.params import rank_local_numel
from planner.plan import Plan
from planner.topology import axis_link, pipeline_p2p_link
from planner.units import dtype_bytes


def tp_pattern(plan: Plan) -> tuple:
    """(forward, backward) collectives of one layer as [(kind, count)], each over one
    [micro-batch, sequence, hidden] activation.

    Megatron-LM: two all-reduces in forward and two in backward (Shoeybi et al. 2019, Fig. 4);
    with sequence parallelism each becomes an all-gather plus a reduce-scatter of the same volume,
    mirrored in backward (Korthikanti et al. 2022, Sec. 4.2.2).  PyTorch DTensor (the `torch`
    engine) forwards the same way but in backward all-reduces the input gradient of every
    column-parallel projection on its own (q, k, v and the MLP's first projections) and, under
    sequence parallelism, re-gathers the two row-parallel output gradients; counted on the
    runtime by tests/test_tp_census.py."""
    return tp_pattern_for(plan.model.mlp, plan.layout.sequence_parallel, plan.job.engine)


def tp_pattern_for(mlp: str, sp: bool, engine: str) -> tuple:
    forward = [("all_gather", 2), ("reduce_scatter", 2)] if sp else [("all_reduce", 2)]
    if engine == "megatron":
        return forward, forward
    colwise = 3 + (2 if mlp == "swiglu" else 1)
    return forward, ([("all_gather", 2)] if sp else []) + [("all_reduce", colwise)]


def _tp_collectives(plan: Plan, pattern: list) -> list:
    link = axis_link(plan.cluster.profile, plan.layout, "tp")
    lay, job = plan.layout, plan.job
    nbytes = dtype_bytes(job.precision) * lay.micro_batch * job.seq_len * plan.model.hidden_size
    return [make_collective(f"tp_{kind}", kind, link, count, nbytes)
            for kind, count in pattern]


def tp_pass_seconds(plan: Plan) -> tuple:
    """(forward, backward) seconds of one layer's TP collectives for one micro-batch."""
    if plan.layout.tp == 1:
        return 0.0, 0.0
    return tuple(sum(c.time_s for c in _tp_collectives(plan, pattern))
                 for pattern in tp_pattern(plan))


def tp_collectives_per_layer(plan: Plan) -> list:
    """Per layer and micro-batch, forward + backward; full recompute repeats the forward's."""
    if plan.layout.tp == 1:
        return []
    forward, backward = tp_pattern(plan)
    counts = {}
    for kind, count in forward:
        counts[kind] = counts.get(kind, 0) + count * (2 if plan.layout.recompute == "full" else 1)
    for kind, count in backward:
        counts[kind] = counts.get(kind, 0) + count
    return _tp_collectives(plan, list(counts.items()))


def pp_p2p_per_microbatch(plan: Plan) -> list:
    """Activation sent forward and its gradient sent backward at each chunk boundary (the
    sequence-parallel activation is sharded, so 1/t of it crosses; Korthikanti Sec. 4.2.3)."""
    lay, job = plan.layout, plan.job
    if lay.pp == 1:
        return []
    link = pipeline_p2p_link(plan.cluster.profile, lay)
    div = lay.tp if lay.sequence_parallel else 1
    nbytes = dtype_bytes(job.precision) * lay.micro_batch * job.seq_len * \
        plan.model.hidden_size / div
    return [make_collective("pp_send_activation", "p2p", link, lay.virtual_stages, nbytes),
            make_collective("pp_send_gradient", "p2p", link, lay.virtual_stages, nbytes)]


def dp_collectives(plan: Plan, pp_rank: int) -> list:
    """Gradient synchronisation and parameter gathers of one step on one pipeline rank.

    ZeRO-0: all-reduce of the gradients; ZeRO-1: the same plus an all-gather of the updated
    parameters (torch: the sharded AdamW all-gathers its fp32 shards; Megatron's distributed
    optimizer reduce-scatters gradients and all-gathers 16-bit parameters); ZeRO-2/3 (FSDP2):
    per micro-batch a reduce-scatter of fp32 gradients and one (ZeRO-2) or two (ZeRO-3, forward
    and backward) all-gathers of the 16-bit parameters (Rajbhandari et al. 2020, Sec. 7), for
    each FSDP2 group on its own (the torch engine)."""
    lay, job = plan.layout, plan.job
    if lay.dp == 1:
        return []
    link = axis_link(plan.cluster.profile, lay, "dp")
    numel = rank_local_numel(plan.model, lay, pp_rank)
    a, m = dtype_bytes(job.precision), lay.num_microbatches
    grad_bytes = 2 * numel if job.engine == "megatron" and job.precision == "fp16" else 4 * numel
    if lay.zero_stage == 0:
        return [make_collective("dp_all_reduce", "all_reduce", link, 1, grad_bytes)]
    if lay.zero_stage == 1:
        if job.engine == "megatron":
            return [make_collective("dp_reduce_scatter", "reduce_scatter", link, 1, grad_bytes),
                    make_collective("dp_param_all_gather", "all_gather", link, 1, a * numel)]
        return [make_collective("dp_all_reduce", "all_reduce", link, 1, grad_bytes),
                make_collective("dp_param_broadcast", "all_gather", link, 1, 4 * numel)]
    gathers = 2 if lay.zero_stage == 3 else 1
    groups = 1 if job.engine == "megatron" else fsdp_groups(plan, pp_rank)
    return [make_collective("dp_reduce_scatter", "reduce_scatter", link, m * groups,
                            4 * numel / groups),
            make_collective("dp_param_all_gather", "all_gather", link, gathers * m * groups,
                            a * numel / groups)]


def fsdp_groups(plan: Plan, pp_rank: int) -> int:
    """FSDP2 groups of one pipeline rank: every block is its own group (each gathered and
    reduced on its own), plus the root group holding the embedding or the output layer."""
    lay = plan.layout
    layers = sum(lay.rank_chunk_layers(plan.model.num_layers)[pp_rank])
    ends = {lay.chunk_rank(0), lay.chunk_rank(lay.num_chunks - 1)}
    return layers + (1 if pp_rank in ends else 0)
