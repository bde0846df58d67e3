"""Mixture-of-experts cost: what an MoE layer adds to (or takes from) the dense layer the rest
of the cost model prices.

The cost model prices every layer of an MoE model as a dense block (attention plus a dense MLP
of ffn_hidden_size: the dense first layers are exactly that); per MoE layer of a rank it adds
the difference of the MoE MLP and that dense MLP, computed here: model states, saved
activations, forward/backward compute and the expert-parallel all-to-all.

Layout (Megatron-Core, megatron/core/parallel_state.py RankGenerator "tp-ep-dp"): within one
pipeline stage the tp x dp ranks (dp outer, tp inner) are re-split for the experts as
expert-dp x ep x etp (etp innermost); the torch engine keeps experts whole (etp = 1) and its ep
groups are slices of dp, experts replicated over tp.

Tokens one rank routes per micro-batch: T = micro_batch x seq / tp under sequence parallelism
(Megatron-Core requires it with tp > 1 and experts), else micro_batch x seq.  Each token goes to
top-k experts: the rank dispatches T k token copies and, with a routing imbalance f (max expert
load over the mean), the busiest rank receives f T k etp of them (etp ranks share one token
group; Job.moe_imbalance, default planner.job.DEFAULT_MOE_IMBALANCE): expert GEMM FLOPs, expert
activations and all-to-all bytes are scaled by f.
All-to-all (Lepikhin et al. 2021, GShard Sec. 3.2; Megatron-Core MoEAlltoAllTokenDispatcher): per
MoE layer and micro-batch a dispatch and a combine in forward and their transposes in backward,
each moving f T k h bytes per rank, (n-1)/n of it to other ranks of the ep group of n.  The
routed experts run as a grouped GEMM (Megatron --moe-grouped-gemm) whose per-expert M is
f T k etp ep / E, priced on the profile's GEMM curve at that M; router softmax/top-k,
permute/unpermute and the auxiliary loss as memory-bound kernels."""

from functools import lru_cache

import numpy as np

from planner.cost.comm import collective_latency
from planner.cost.flops import Gemm
from planner.cost.params import block_tensors, dense_view
from planner.cost.pipeline import chunk_rank, stage_layers
from planner.engines import engine
from planner.topology import _distinct_groups, _group_bandwidth, rank_grid
from planner.units import dtype_bytes

FP32 = 4
ROUTER_KERNELS = 4     # router: softmax/sigmoid, top-k, (re)normalise, aux-loss statistics
PERMUTE_KERNELS = 2    # permute before the experts, unpermute (weighted sum) after


@lru_cache(maxsize=65536)
def rank_moe_layers_of(spec, *, pp, virtual_stages, schedule, rank, layers_per_stage=()) -> int:
    """MoE layers held by pipeline rank `rank` (0 for a dense model)."""
    if spec.moe is None:
        return 0
    count, start = 0, 0
    for chunk, n in enumerate(stage_layers(spec.num_layers, pp=pp, virtual_stages=virtual_stages,
                                           layers_per_stage=layers_per_stage)):
        if chunk_rank(chunk, pp=pp, schedule=schedule) == rank:
            count += sum(spec.moe.is_moe_layer(i) for i in range(start, start + n))
        start += n
    return count


def tokens_per_rank(job, *, tp, sequence_parallel, micro_batch) -> float:
    """T: tokens one rank routes per micro-batch."""
    return micro_batch * job.seq_len / (tp if sequence_parallel else 1)


def routed_tokens(spec, job, *, tp, sequence_parallel, micro_batch, etp) -> float:
    """Token copies the busiest rank's experts process per micro-batch: f T k etp."""
    t = tokens_per_rank(job, tp=tp, sequence_parallel=sequence_parallel, micro_batch=micro_batch)
    return job.moe_imbalance * t * spec.moe.experts_per_token * etp


def expert_dp(job, *, tp, dp, ep, etp) -> int:
    """Ranks that hold the same experts: tp x dp / (ep x etp) (Megatron-Core); the torch engine
    replicates experts over tp and splits them over ep within dp: dp / ep."""
    if engine(job.engine).ep_within_dp:
        return max(1, dp // ep)
    return max(1, tp * dp // (ep * etp))


# --- GEMMs and compute ------------------------------------------------------------------------

def moe_gemms(spec, job, *, tp, sequence_parallel, micro_batch, ep, etp) -> list:
    """Forward GEMMs of one MoE MLP on the busiest rank."""
    moe, h = spec.moe, spec.hidden_size
    t = tokens_per_rank(job, tp=tp, sequence_parallel=sequence_parallel, micro_batch=micro_batch)
    local = moe.num_experts // ep
    m = max(1, round(routed_tokens(spec, job, tp=tp, sequence_parallel=sequence_parallel,
                                   micro_batch=micro_batch, etp=etp) / local))
    f = moe.expert_ffn_hidden_size // etp
    ins = 2 if spec.mlp == "swiglu" else 1
    gemms = [Gemm("router", int(t), h, moe.num_experts),
             Gemm("experts_in", m, h, f, ins * local), Gemm("experts_out", m, f, h, local)]
    if moe.shared_ffn_hidden_size:
        full = micro_batch * job.seq_len  # TP-split like the dense MLP (full sequence)
        fs = moe.shared_ffn_hidden_size // tp
        gemms += [Gemm("shared_in", full, h, fs, ins), Gemm("shared_out", full, fs, h)]
    return gemms


def dense_mlp_gemms(spec, job, *, tp, micro_batch) -> list:
    """The dense MLP the MoE MLP replaces (as planner.cost.flops.layer_gemms prices it)."""
    tokens, h, f = micro_batch * job.seq_len, spec.hidden_size, spec.ffn_hidden_size // tp
    ins = 2 if spec.mlp == "swiglu" else 1
    return [Gemm("mlp_in", tokens, h, f, ins), Gemm("mlp_out", tokens, f, h)]


def moe_memory_bytes(spec, job, *, tp, sequence_parallel, micro_batch, etp) -> float:
    """Bytes the memory-bound MoE kernels of one forward move: router scores (fp32, read and
    written by each router kernel), permute and unpermute of the routed copies (read + write),
    the expert activation (SwiGLU: gate, up -> product: 3 reads/writes of the routed width)."""
    a, moe = dtype_bytes(job.dtype), spec.moe
    t = tokens_per_rank(job, tp=tp, sequence_parallel=sequence_parallel, micro_batch=micro_batch)
    routed = routed_tokens(spec, job, tp=tp, sequence_parallel=sequence_parallel,
                           micro_batch=micro_batch, etp=etp)
    router = ROUTER_KERNELS * 2 * FP32 * t * moe.num_experts
    permute = PERMUTE_KERNELS * 2 * a * routed * spec.hidden_size
    act = (3 if spec.mlp == "swiglu" else 2) * a * routed * moe.expert_ffn_hidden_size / etp
    return router + permute + act


def dense_mlp_memory_bytes(spec, job, *, tp, micro_batch) -> float:
    """The dense MLP's activation traffic (planner.cost.compute._elementwise_bytes' ffn term)."""
    ffn = dtype_bytes(job.dtype) * micro_batch * job.seq_len * spec.ffn_hidden_size / tp
    return 5 * ffn if spec.mlp == "swiglu" else 2 * ffn


def moe_layer_delta_seconds(gpu, spec, job, *, tp, sequence_parallel, micro_batch, ep=1,
                            etp=1) -> tuple:
    """(forward, backward) seconds an MoE layer adds to the dense layer on the busiest rank:
    its GEMMs (backward: twice, Narayanan et al. 2021 Sec. 5.1) and memory-bound kernels
    (backward: twice the bytes) minus the dense MLP's."""
    if spec.moe is None:
        return 0.0, 0.0
    from planner.cost.compute import _memory_time, linear_gemm_time
    shape = {"tp": tp, "sequence_parallel": sequence_parallel, "micro_batch": micro_batch}
    moe = sum(linear_gemm_time(gpu, g, job)
              for g in moe_gemms(spec, job, **shape, ep=ep, etp=etp))
    dense = sum(linear_gemm_time(gpu, g, job)
                for g in dense_mlp_gemms(spec, job, tp=tp, micro_batch=micro_batch))
    mem = _memory_time(gpu, moe_memory_bytes(spec, job, **shape, etp=etp),
                       ROUTER_KERNELS + PERMUTE_KERNELS)
    dense_mem = _memory_time(gpu, dense_mlp_memory_bytes(spec, job, tp=tp,
                                                         micro_batch=micro_batch), 0)
    return moe - dense + mem - dense_mem, 2 * (moe - dense) + 2 * (mem - dense_mem)


def moe_delta_forward_flops(spec, tokens: float) -> float:
    """Model FLOPs an MoE layer adds to the dense layer per forward, balanced routing: top-k
    experts, shared experts and the router in place of the dense MLP (active parameters)."""
    moe, h = spec.moe, spec.hidden_size
    mats = 3 if spec.mlp == "swiglu" else 2
    per_token = 2 * h * (mats * (moe.experts_per_token * moe.expert_ffn_hidden_size
                                 + moe.shared_ffn_hidden_size - spec.ffn_hidden_size)
                         + moe.num_experts)
    return per_token * tokens


# --- activations ------------------------------------------------------------------------------

def moe_activation_delta_bytes(spec, job, *, tp, sequence_parallel, micro_batch, recompute,
                               etp=1) -> float:
    """Bytes an MoE layer saves for backward beyond the dense MLP (per micro-batch): router
    scores and probabilities (fp32), the permuted expert input, the expert intermediates
    (SwiGLU: gate, up, product; GELU: its input and output) and the unpermute input, plus the
    shared experts like a dense MLP; minus the dense MLP's (planner.cost.activations).  Under
    full recompute a layer keeps only its input: no difference."""
    if spec.moe is None or recompute == "full":
        return 0.0
    a, moe = dtype_bytes(job.dtype), spec.moe
    t = tokens_per_rank(job, tp=tp, sequence_parallel=sequence_parallel, micro_batch=micro_batch)
    routed = routed_tokens(spec, job, tp=tp, sequence_parallel=sequence_parallel,
                           micro_batch=micro_batch, etp=etp)
    inter = (3 if spec.mlp == "swiglu" else 2) * a * routed * moe.expert_ffn_hidden_size / etp
    saved = 2 * FP32 * t * moe.num_experts + 2 * a * routed * spec.hidden_size + inter
    full = micro_batch * job.seq_len
    per_f = (4 if spec.mlp == "swiglu" else 2) * a * full / tp
    return saved + per_f * (moe.shared_ffn_hidden_size - spec.ffn_hidden_size)


# --- model states -----------------------------------------------------------------------------

@lru_cache(maxsize=4096)
def moe_layer_numels(spec, tp: int, ep: int, etp: int) -> tuple:
    """(non-expert elements an MoE block has beyond a dense block, expert elements) on TP/EP
    rank 0; the first may be negative (router and shared experts smaller than the dense MLP)."""
    moe_block = block_tensors(spec, spec.moe.first_dense_layers)
    dense_block = block_tensors(dense_view(spec), 0)

    def local(tensors, expert):
        return sum(int(np.prod(t.local_shape(tp, ep=ep, etp=etp))) for t in tensors
                   if t.expert == expert)
    return local(moe_block, False) - local(dense_block, False), local(moe_block, True)


def _state_bytes(job, numel: float, shards: int, zero_stage: int) -> tuple:
    """(weights, gradients, optimizer) bytes of `numel` elements sharded over `shards` ranks as
    the engine does (planner.cost.memory: torch fp32 master 4 + 4 + 8, else the ZeRO recipe)."""
    eng = engine(job.engine)
    weights_from = 3
    if eng.fp32_master_params:
        w, g, o = 4.0, 4.0, 8.0
        weights_from = 2  # FSDP2 shards parameters at ZeRO-2 too (memory.SHARDED_GRAD_STAGES)
    else:
        w = g = float(dtype_bytes(job.dtype))
        o = float(eng.optimizer_state_bytes(job.dtype, zero_stage))
    return (w * numel / (shards if zero_stage >= weights_from else 1),
            g * numel / (shards if zero_stage >= 2 else 1),
            o * numel / (shards if zero_stage >= 1 else 1))


def moe_model_states(spec, job, *, tp, dp, zero_stage, rank_moe_layers, ep=1, etp=1) -> tuple:
    """(weights, gradients, optimizer) bytes the rank's MoE layers add to their dense-block
    pricing: the non-expert difference sharded over dp, the experts over expert-dp."""
    if spec.moe is None or not rank_moe_layers:
        return 0.0, 0.0, 0.0
    other, experts = moe_layer_numels(spec, tp, ep, etp)
    edp = expert_dp(job, tp=tp, dp=dp, ep=ep, etp=etp)
    a = _state_bytes(job, rank_moe_layers * other, dp, zero_stage)
    b = _state_bytes(job, rank_moe_layers * experts, edp, zero_stage)
    w, g, o = (x + y for x, y in zip(a, b))
    if engine(job.engine).fp32_master_params:  # AdamW's per-tensor step: the MoE block's count
        from planner.cost.memory import ADAM_STEP_BYTES
        o += ADAM_STEP_BYTES * rank_moe_layers * moe_tensor_count_delta(spec)
    return w, g, o


def moe_tensor_count_delta(spec) -> int:
    """Parameter tensors an MoE block has beyond a dense block (router, stacked experts, shared
    experts and gate against the dense MLP's)."""
    return len(block_tensors(spec, spec.moe.first_dense_layers)) - \
        len(block_tensors(dense_view(spec), 0))


# --- expert-parallel communication ------------------------------------------------------------

def expert_groups(mesh_order, *, dp, tp, pp, ep, etp, axis: str) -> np.ndarray:
    """Rows of global ranks forming the 'ep', 'etp' or 'edp' groups (Megatron-Core's tp-ep-dp
    order within each pipeline stage's tp x dp ranks; rank_grid gives their global ids)."""
    grid = rank_grid(tuple(mesh_order), {"cp": 1, "dp": dp, "tp": tp, "pp": pp})  # cp: rule cp_moe
    order = tuple(mesh_order)
    plane = np.moveaxis(grid, [order.index("pp"), order.index("dp"), order.index("tp")],
                        [0, 1, 2]).reshape(pp, dp * tp)
    edp = dp * tp // (ep * etp)
    cube = plane.reshape(pp, edp, ep, etp)
    move = {"etp": 3, "ep": 2, "edp": 1}[axis]
    size = {"etp": etp, "ep": ep, "edp": edp}[axis]
    return np.moveaxis(cube, move, -1).reshape(-1, size)


_LINKS: dict = {}


def group_links(profile, mesh_order, dp, tp, pp, ep, etp, axis) -> tuple:
    """(size, nodes spanned, ranks on one node, bandwidth, per-GPU NIC bandwidth, intra
    latency, inter latency) of the slowest group of `axis` (cached per profile object)."""
    key = (id(profile), mesh_order, dp, tp, pp, ep, etp, axis)
    hit = _LINKS.get(key)
    if hit is None or hit[0] is not profile:
        hit = _LINKS[key] = (profile, _group_links(profile, mesh_order, dp, tp, pp, ep, etp,
                                                   axis))
    return hit[1]


def _group_links(profile, mesh_order, dp, tp, pp, ep, etp, axis) -> tuple:
    rows = expert_groups(mesh_order, dp=dp, tp=tp, pp=pp, ep=ep, etp=etp, axis=axis)
    gpn = profile.gpus_per_node
    worst = min((_group_bandwidth(profile, rows[i]) for i in _distinct_groups(rows, gpn)),
                key=lambda g: g[2])
    intra = profile.intra_node
    nic = profile.inter_node.bandwidth_bytes_per_s * profile.inter_node.efficiency / gpn
    return (rows.shape[1], worst[0], worst[1], worst[2], nic, intra.latency_s,
            profile.inter_node.latency_s)


def all_to_all_seconds(profile, nbytes: float, links: tuple) -> float:
    """One all-to-all of `nbytes` per rank: (n-1)/n of it leaves the rank; of that, what goes to
    ranks on other nodes crosses the GPU's NIC share while the rest crosses NVLink at once."""
    n, nodes, per_node, bw, nic, lat_in, lat_out = links
    if n == 1 or nbytes == 0:
        return 0.0
    if nodes == 1:
        return (n - 1) / n * nbytes / bw + collective_latency("all_gather", n, lat_in)
    off_node = (n - per_node) / n * nbytes / nic
    on_node = (per_node - 1) / n * nbytes / (bw if per_node > 1 else float("inf"))
    return max(off_node, on_node) + collective_latency("all_gather", n, lat_out)


def a2a_bytes(spec, job, *, tp, sequence_parallel, micro_batch, etp=1) -> float:
    """Bytes one rank sends in one dispatch (or combine) all-to-all: f T k h (x etp when etp
    ranks exchange their gathered token group)."""
    return dtype_bytes(job.dtype) * spec.hidden_size * routed_tokens(
        spec, job, tp=tp, sequence_parallel=sequence_parallel, micro_batch=micro_batch,
        etp=etp) / etp


def ep_comm_seconds(profile, spec, job, *, mesh_order, dp, tp, pp, sequence_parallel,
                    micro_batch, ep=1, etp=1) -> float:
    """Expert-parallel communication per MoE layer and micro-batch: 4 all-to-alls (dispatch and
    combine, forward and backward) over the ep group, and with etp > 1 an all-gather and a
    reduce-scatter of the routed tokens in each direction over the etp group.  Not overlapped
    (the experts wait for their tokens)."""
    if spec.moe is None or ep * etp == 1:
        return 0.0
    from planner.cost.comm import collective_time
    from planner.topology import GroupLink
    shape = {"tp": tp, "sequence_parallel": sequence_parallel, "micro_batch": micro_batch}
    nbytes = a2a_bytes(spec, job, **shape, etp=etp)
    seconds = 4 * all_to_all_seconds(
        profile, nbytes, group_links(profile, tuple(mesh_order), dp, tp, pp, ep, etp, "ep"))
    if etp > 1:
        n, nodes, per_node, bw, nic, lat_in, lat_out = group_links(
            profile, tuple(mesh_order), dp, tp, pp, ep, etp, "etp")
        link = GroupLink("etp", n, nodes, per_node, "intra" if nodes == 1 else "inter",
                         bw, lat_in if nodes == 1 else lat_out)
        seconds += 2 * (collective_time("all_gather", nbytes * etp, link)
                        + collective_time("reduce_scatter", nbytes * etp, link))
    return seconds


def expert_grad_sync_seconds(profile, spec, job, *, mesh_order, dp, tp, pp, zero_stage,
                             rank_moe_layers, ep=1, etp=1) -> float:
    """The step's reduction of the rank's expert gradients over expert-dp (an all-reduce; at
    ZeRO-1 a reduce-scatter plus the parameters' all-gather), fp32 (Megatron-Core reduces
    expert gradients over its expert-data-parallel group, distributed optimizer included)."""
    if spec.moe is None or not rank_moe_layers:
        return 0.0
    from planner.cost.comm import collective_time
    edp = expert_dp(job, tp=tp, dp=dp, ep=ep, etp=etp)
    if edp == 1:
        return 0.0
    numel = rank_moe_layers * moe_layer_numels(spec, tp, ep, etp)[1]
    link = _edp_link(profile, job, tuple(mesh_order), dp, tp, pp, ep, etp)
    if zero_stage == 0:
        return collective_time("all_reduce", FP32 * numel, link)
    a = dtype_bytes(job.dtype)
    return (collective_time("reduce_scatter", FP32 * numel, link)
            + collective_time("all_gather", a * numel, link))


def _edp_link(profile, job, mesh_order, dp, tp, pp, ep, etp):
    """The expert-dp group's link: torch's is a slice of dp (priced as the dp axis' link)."""
    from planner.topology import GroupLink, axis_link
    if engine(job.engine).ep_within_dp:
        from planner.plan import Layout
        d = axis_link(profile, Layout(dp=dp, tp=tp, pp=pp, mesh_order=mesh_order), "dp")
        return GroupLink("edp", max(1, dp // ep), d.num_nodes, d.ranks_per_node, d.tier,
                         d.bandwidth_bytes_per_s, d.latency_s)
    n, nodes, per_node, bw, _, lat_in, lat_out = group_links(profile, mesh_order, dp, tp, pp,
                                                             ep, etp, "edp")
    return GroupLink("edp", n, nodes, per_node, "intra" if nodes == 1 else "inter", bw,
                     lat_in if nodes == 1 else lat_out)


def ep_collectives(profile, spec, job, *, mesh_order, dp, tp, pp, sequence_parallel,
                   micro_batch, num_microbatches, zero_stage, rank_moe_layers, ep=1,
                   etp=1) -> list:
    """The step's expert-parallel collectives of one rank, as Estimate.communication lists them
    (the same seconds ep_comm_seconds and expert_grad_sync_seconds price)."""
    from planner.cost.comm import Collective
    if spec.moe is None or not rank_moe_layers:
        return []
    shape = {"tp": tp, "sequence_parallel": sequence_parallel, "micro_batch": micro_batch}
    calls = 4 * rank_moe_layers * num_microbatches
    out = []
    if ep > 1:
        links = group_links(profile, tuple(mesh_order), dp, tp, pp, ep, etp, "ep")
        nbytes = a2a_bytes(spec, job, **shape, etp=etp)
        out.append(Collective(name="ep_all_to_all", kind="all_to_all", axis="ep",
                              tier="intra" if links[1] == 1 else "inter", count=calls,
                              bytes_each=nbytes,
                              time_each_s=all_to_all_seconds(profile, nbytes, links),
                              group_size=ep))
    grad = expert_grad_sync_seconds(profile, spec, job, mesh_order=mesh_order, dp=dp, tp=tp,
                                    pp=pp, zero_stage=zero_stage,
                                    rank_moe_layers=rank_moe_layers, ep=ep, etp=etp)
    edp = expert_dp(job, tp=tp, dp=dp, ep=ep, etp=etp)
    if grad:
        link = _edp_link(profile, job, tuple(mesh_order), dp, tp, pp, ep, etp)
        numel = rank_moe_layers * moe_layer_numels(spec, tp, ep, etp)[1]
        out.append(Collective(name="edp_expert_grad_sync",
                              kind="all_reduce" if zero_stage == 0 else "reduce_scatter",
                              axis="edp", tier=link.tier, count=1, bytes_each=FP32 * numel,
                              time_each_s=grad, group_size=edp))
    return out
