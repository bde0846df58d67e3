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

from planner.cost.comm_plan import dp_collectives, pp_p2p_per_microbatch, tp_pass_seconds
from planner.cost.compute import head_times, layer_times, selective_recompute_s
from planner.cost.memory import MemoryBreakdown
from planner.cost.pipeline import pipeline_time
from planner.plan import Plan
from planner.units import ADAM_STATE_BYTES_FP32, ADAM_STATE_BYTES_MIXED

# AdamW update per parameter: read+write fp32 weight, momentum and variance, read the gradient,
# plus the gradient-norm pass for clipping (read the gradient again).
OPTIMIZER_BYTES_PER_PARAM = 8 + 8 + 8 + 4 + 4


@dataclass(frozen=True)
class RankMicrobatch:
    """One micro-batch through all chunks of one pipeline rank, in seconds."""
    compute_fwd_s: float
    compute_bwd_s: float
    recompute_s: float
    tp_comm_s: float
    pp_comm_s: float
    wgrad_s: float

    @property
    def total_s(self) -> float:
        return (self.compute_fwd_s + self.compute_bwd_s + self.recompute_s + self.tp_comm_s
                + self.pp_comm_s)


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

    @property
    def step_s(self) -> float:
        return (self.compute_s + self.recompute_s + self.tp_comm_s + self.pp_comm_s
                + self.bubble_s + self.dp_comm_exposed_s + self.optimizer_s)

    def to_dict(self) -> dict:
        d = {f.name: getattr(self, f.name) for f in fields(self)}
        d["step_s"] = self.step_s
        return d


def rank_microbatch(plan: Plan, pp_rank: int) -> RankMicrobatch:
    spec, job, lay = plan.model, plan.job, plan.layout
    gpu = plan.cluster.profile.gpu
    layers = sum(lay.rank_chunk_layers(spec.num_layers)[pp_rank])
    lt = layer_times(gpu, spec, job, lay)
    fwd, bwd, wgrad = layers * lt.fwd_s, layers * lt.bwd_s, layers * lt.wgrad_s
    if pp_rank == lay.chunk_rank(lay.num_chunks - 1):
        ht = head_times(gpu, spec, job, lay)
        fwd, bwd, wgrad = fwd + ht.fwd_s, bwd + ht.bwd_s, wgrad + ht.wgrad_s
    recompute = {"none": 0.0, "selective": selective_recompute_s(lt),
                 "full": lt.fwd_s}[lay.recompute] * layers
    tp = layers * exposed_tp_per_layer(plan, lt.wgrad_s)
    pp = sum(c.time_s for c in pp_p2p_per_microbatch(plan))
    return RankMicrobatch(fwd, bwd, recompute, tp, pp, wgrad)


def exposed_tp_per_layer(plan: Plan, wgrad_s: float) -> float:
    """TP communication per layer and micro-batch left on the critical path."""
    forward, backward = tp_pass_seconds(plan)
    if plan.layout.recompute == "full":
        forward *= 2
    if plan.job.engine != "megatron":
        return forward + backward
    return forward + max(0.0, backward - wgrad_s)


def _dp_exposed(plan: Plan, pp_rank: int, mb: RankMicrobatch) -> tuple:
    """(exposed, total) seconds of data-parallel communication on one pipeline rank."""
    lay = plan.layout
    colls = dp_collectives(plan, pp_rank)
    total = sum(c.time_s for c in colls)
    if not colls or plan.job.engine == "megatron":
        return total, total
    if lay.zero_stage >= 2:
        per_mb = total / lay.num_microbatches
        exposed = max(0.0, per_mb - mb.total_s) * lay.num_microbatches
        first_gather = per_mb / max(1, plan.model.num_layers // lay.pp)
        return exposed + first_gather, total
    grad_sync = colls[0].time_s
    after_step = total - grad_sync  # ZeRO-1 parameter broadcast follows the optimizer step
    return max(0.0, grad_sync - mb.compute_bwd_s - mb.recompute_s) + after_step, total


def optimizer_step_s(plan: Plan, memory: MemoryBreakdown) -> float:
    k = ADAM_STATE_BYTES_FP32 if plan.job.engine == "torch" or plan.job.precision == "fp32" \
        else ADAM_STATE_BYTES_MIXED
    numel = memory.optimizer_bytes / k
    gpu = plan.cluster.profile.gpu
    return numel * OPTIMIZER_BYTES_PER_PARAM / (gpu.hbm_bandwidth_bytes_per_s *
                                                 gpu.memory_efficiency)


def shared_core_bubble(plan: Plan, step_s: float, bubble_s: float) -> float:
    """The bubble left where the ranks of a node share its cores (CPU ranks): a rank idle in the
    bubble lends its share of the cores to the busy ones, so the step shrinks towards its busy
    time, but no further than the whole step run with every rank on a core of its own."""
    profile = plan.cluster.profile
    cores = profile.gpu.shared_cores
    ranks = min(plan.cluster.world_size, profile.gpus_per_node)
    if not cores or ranks <= cores or not bubble_s:
        return bubble_s
    return max(0.0, min(bubble_s, step_s * cores / ranks - (step_s - bubble_s)))


def time_breakdown(plan: Plan, rank_memories: list) -> TimeBreakdown:
    lay = plan.layout
    mbs = [rank_microbatch(plan, r) for r in range(lay.pp)]
    slow = max(range(lay.pp), key=lambda r: mbs[r].total_s)
    s = mbs[slow]
    pipe_s, bubble = pipeline_time(lay, [mb.total_s for mb in mbs], s.compute_fwd_s,
                                   s.compute_bwd_s + s.recompute_s, s.wgrad_s)
    tails = []
    for r in range(lay.pp):
        exposed, total = _dp_exposed(plan, r, mbs[r])
        optimizer = optimizer_step_s(plan, rank_memories[r])
        tails.append((exposed + optimizer, exposed, total, optimizer))
    tail, dp_exposed, dp_total, optimizer = max(tails)
    m = lay.num_microbatches
    busy = m * s.total_s
    bubble = shared_core_bubble(plan, busy + bubble + tail, bubble)
    return TimeBreakdown(
        compute_s=m * (s.compute_fwd_s + s.compute_bwd_s), recompute_s=m * s.recompute_s,
        tp_comm_s=m * s.tp_comm_s, pp_comm_s=m * s.pp_comm_s, bubble_s=bubble,
        dp_comm_exposed_s=dp_exposed, optimizer_s=optimizer,
        dp_comm_total_s=dp_total, bubble_fraction=bubble / (busy + bubble) if busy else 0.0,
        slowest_pp_rank=slow)
