"""estimate(plan) -> Estimate: memory, time, communication and throughput of one plan."""

from dataclasses import dataclass, replace

from planner.cost.comm_plan import dp_collectives, pp_p2p_per_microbatch, tp_collectives_per_layer
from planner.cost.compute import op_policy_gemm_flops
from planner.cost.context import cp_collectives, cp_rerun_collectives
from planner.cost.fields import PlanEvaluations, call, plan_fields, recomputed_layers_of, with_rank
from planner.cost.flops import hardware_flops_per_step, model_flops_per_step
from planner.cost.memory import MemoryBreakdown, rank_memory
from planner.cost.moe import ep_collectives
from planner.cost.time import TimeBreakdown, time_breakdown
from planner.plan import Plan


@dataclass(frozen=True)
class Estimate:
    plan: Plan
    memory: MemoryBreakdown
    time: TimeBreakdown
    communication: list       # Collective, per step, for the most loaded rank
    model_flops_per_step: float
    hardware_flops_per_step: float

    @property
    def fits(self) -> bool:
        return self.memory.fits

    @property
    def step_s(self) -> float:
        return self.time.step_s

    @property
    def tokens_per_s(self) -> float:
        return self.plan.job.tokens_per_step / self.step_s

    @property
    def tflops_per_gpu(self) -> float:
        """Model TFLOP/s per GPU (no recompute counted)."""
        return self.model_flops_per_step / self.step_s / self.plan.cluster.world_size / 1e12

    @property
    def peak_flops(self) -> float:
        return self.plan.cluster.profile.gpu.peak_flops[self.plan.job.dtype]

    @property
    def mfu(self) -> float:
        return self.tflops_per_gpu * 1e12 / self.peak_flops

    @property
    def hfu(self) -> float:
        return self.hardware_flops_per_step / self.step_s / self.plan.cluster.world_size / \
            self.peak_flops

    def fp8_gain(self) -> dict | None:
        """What FP8 gains on this plan's shape: the same layout estimated in bf16 (None unless
        the job is fp8).  speedup = fp8 tokens/s over bf16's; memory_saved_bytes may be
        negative (FP8 weight copies)."""
        if not self.plan.job.fp8:
            return None
        job = replace(self.plan.job, precision="bf16", fp8_recipe="none")
        base = estimate(replace(self.plan, job=job, estimate=None))
        return {"recipe": self.plan.job.fp8_recipe, "bf16_tokens_per_s": base.tokens_per_s,
                "speedup": self.tokens_per_s / base.tokens_per_s,
                "bf16_total_bytes": base.memory.total_bytes,
                "memory_saved_bytes": base.memory.total_bytes - self.memory.total_bytes,
                "bf16_fits": base.fits}

    def to_dict(self) -> dict:
        extra = {"fp8_gain": self.fp8_gain()} if self.plan.job.fp8 else {}
        return {**extra, "fits": self.fits, "memory": self.memory.to_dict(),
                "time": self.time.to_dict(),
                "tokens_per_s": self.tokens_per_s, "tflops_per_gpu": self.tflops_per_gpu,
                "mfu": self.mfu, "hfu": self.hfu,
                "model_flops_per_step": self.model_flops_per_step,
                "hardware_flops_per_step": self.hardware_flops_per_step,
                "communication": [_collective_dict(c) for c in self.communication],
                "plan": self.plan.with_estimate(None).to_dict()}


def _collective_dict(c) -> dict:
    return {"name": c.name, "kind": c.kind, "axis": c.axis, "tier": c.tier, "count": c.count,
            "group_size": c.group_size, "bytes_each": c.bytes_each,
            "volume_bytes": c.volume_bytes, "time_s": c.time_s}


def _step_collectives(plan: Plan, pp_rank: int) -> list:
    """Per-step collectives of one rank, counts scaled from per-layer / per-micro-batch."""
    named = with_rank(plan_fields(plan), pp_rank)
    layers, m = named["rank_layers"], plan.layout.num_microbatches
    recomputed = call(recomputed_layers_of, named)
    plain = {c.name: c for c in call(tp_collectives_per_layer, {**named, "recompute": "none"})}
    scaled = []
    for c in call(tp_collectives_per_layer, named):  # the recomputed layers re-run some
        base = plain[c.name].count if c.name in plain else 0
        scaled.append(replace(c, count=(base * (layers - recomputed) + c.count * recomputed) * m))
    scaled += [replace(c, count=c.count * m) for c in call(pp_p2p_per_microbatch, named)]
    forward, backward = call(cp_collectives, named)
    rerun = {c.name for c in cp_rerun_collectives(forward, named["cp_comm"], named["recompute"])}
    scaled += [replace(c, count=c.count * (layers + recomputed * (c.name in rerun)) * m)
               for c in forward + backward]
    return scaled + call(dp_collectives, named) + call(ep_collectives, named)


def estimate(plan: Plan) -> Estimate:
    spec, job, lay = plan.model, plan.job, plan.layout
    evaluations = PlanEvaluations(plan_fields(plan))
    memories = [rank_memory(plan, r, evaluations) for r in range(lay.pp)]
    memory = max(memories, key=lambda mem: (mem.total_bytes, -mem.pp_rank))
    time = time_breakdown(plan, memories, evaluations)
    return Estimate(
        plan=plan, memory=memory, time=time,
        communication=_step_collectives(plan, memory.pp_rank),
        model_flops_per_step=model_flops_per_step(spec, job.global_batch, job.seq_len, job),
        hardware_flops_per_step=hardware_flops_per_step(
            spec, job.global_batch, job.seq_len, lay.recompute, lay.recompute_every,
            op_policy_gemm_flops(spec, job, tp=1, micro_batch=job.global_batch)
            if lay.recompute == "op" else 0.0, job))
