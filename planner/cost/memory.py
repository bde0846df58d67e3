"""Per-rank memory: model states under ZeRO 0-3, activations of the in-flight micro-batches,
gathered-parameter and communication buffers, framework overhead; a fits verdict.

Model states (Rajbhandari et al. 2020, Sec. 3.1 and 5): mixed-precision Adam holds 2 + 2 + K
bytes per parameter (16-bit weights and gradients, K = 12 bytes of fp32 master weights, momentum
and variance); ZeRO-1 shards the K bytes over the dp ranks, ZeRO-2 also the gradients, ZeRO-3
also the weights.  That is the `megatron` engine.  The `torch` engine (this project's runtime)
keeps fp32 parameters as the master copy and computes in 16 bits through FSDP2's
MixedPrecisionPolicy or autocast: 4 + 4 + 8 bytes, sharded per tensor exactly as PyTorch does
(FSDP2: dim 0, torch.chunk sizes; ZeRO-1: the rank-local parameters laid end to end and cut into
dp equal pieces, as runtime/zero1.py does)."""

import math
from dataclasses import dataclass, fields
from functools import lru_cache

from planner.cost import activations as act
from planner.cost.params import (block_params_local, chunk_size, pieces_tensors,
                                 rank_local_numel, rank_pieces)
from planner.cost.pipeline import head_inflight, inflight_chunks
from planner.plan import Plan
from planner.units import (ADAM_STATE_BYTES_FP32, ADAM_STATE_BYTES_MIXED, dtype_bytes)

ADAM_STEP_BYTES = 4        # torch.optim.AdamW keeps a float32 `step` tensor per parameter
FSDP_PREFETCH_LAYERS = 2   # FSDP2 implicit prefetch: the running block and the next one


@dataclass(frozen=True)
class ModelStateBytes:
    weights_bytes: float
    gradients_bytes: float
    optimizer_bytes: float


@dataclass(frozen=True)
class MemoryBreakdown:
    """Bytes on the most loaded rank (`pp_rank`, with dp rank 0 and tp rank 0)."""
    pp_rank: int
    weights_bytes: float
    gradients_bytes: float
    optimizer_bytes: float
    activations_bytes: float
    gathered_params_bytes: float    # 16-bit compute copies: ZeRO-3/FSDP gathers, autocast cache
    comm_buffers_bytes: float
    framework_bytes: float
    activation_bytes_per_microbatch: float
    inflight_microbatches: float
    capacity_bytes: float

    @property
    def total_bytes(self) -> float:
        return (self.weights_bytes + self.gradients_bytes + self.optimizer_bytes
                + self.activations_bytes + self.gathered_params_bytes + self.comm_buffers_bytes
                + self.framework_bytes)

    @property
    def fits(self) -> bool:
        return self.total_bytes <= self.capacity_bytes

    def to_dict(self) -> dict:
        d = {f.name: getattr(self, f.name) for f in fields(self)}
        d["total_bytes"] = self.total_bytes
        d["fits"] = self.fits
        return d


def zero_model_state_bytes(num_params: float, dp: int, zero_stage: int,
                           precision: str = "fp16") -> ModelStateBytes:
    """ZeRO paper recipe for Ψ parameters over N_d = dp ranks (Table 1)."""
    a = dtype_bytes(precision)
    k = ADAM_STATE_BYTES_FP32 if precision == "fp32" else ADAM_STATE_BYTES_MIXED
    return ModelStateBytes(
        weights_bytes=a * num_params / (dp if zero_stage >= 3 else 1),
        gradients_bytes=a * num_params / (dp if zero_stage >= 2 else 1),
        optimizer_bytes=k * num_params / (dp if zero_stage >= 1 else 1))


def _fsdp_numel(shape: tuple, dp: int, dp_rank: int) -> int:
    """FSDP2 shards dim 0 of the (TP-local) tensor like torch.chunk."""
    return chunk_size(shape[0], dp, dp_rank) * math.prod(shape[1:])


def _flat_partition(numels: list, dp: int, dp_rank: int) -> tuple:
    """(elements, tensor pieces) of one rank when the rank-local parameters are laid end to end
    and cut into dp equal pieces (DeepSpeed's flat ZeRO-1 partition, runtime/zero1.py)."""
    total = sum(numels)
    shard = -(-total // dp)
    start, end = dp_rank * shard, min((dp_rank + 1) * shard, total)
    pieces, offset = 0, 0
    for n in numels:
        if max(start, offset) < min(end, offset + n):
            pieces += 1
        offset += n
    return max(0, end - start), pieces


def torch_model_state_bytes(tensors: list, tp: int, dp: int, zero_stage: int,
                            dp_rank: int = 0, tp_rank: int = 0) -> ModelStateBytes:
    """fp32 parameters, fp32 gradients, AdamW exp_avg + exp_avg_sq + step, as PyTorch shards."""
    state = ADAM_STATE_BYTES_FP32
    shapes = [t.local_shape(tp, tp_rank) for t in tensors]
    if zero_stage >= 2:
        numel = sum(_fsdp_numel(s, dp, dp_rank) for s in shapes)
        return ModelStateBytes(4 * numel, 4 * numel, state * numel + ADAM_STEP_BYTES * len(shapes))
    local = [math.prod(s) for s in shapes]
    numel = sum(local)
    if zero_stage == 1:
        opt_numel, opt_count = _flat_partition(local, dp, dp_rank)
    else:
        opt_numel, opt_count = numel, len(local)
    return ModelStateBytes(4 * numel, 4 * numel, state * opt_numel + ADAM_STEP_BYTES * opt_count)


@lru_cache(maxsize=65536)
def _torch_rank_states(spec, pieces: tuple, tp: int, dp: int, zero_stage: int, dp_rank: int,
                       tp_rank: int) -> ModelStateBytes:
    return torch_model_state_bytes(pieces_tensors(spec, *pieces), tp, dp, zero_stage, dp_rank,
                                   tp_rank)


def rank_model_state(plan: Plan, pp_rank: int, dp_rank: int = 0,
                     tp_rank: int = 0) -> ModelStateBytes:
    """Model-state bytes of one rank (dp rank 0 / tp rank 0 hold the largest shards)."""
    lay, spec = plan.layout, plan.model
    if plan.job.engine == "torch":
        return _torch_rank_states(spec, rank_pieces(spec, lay, pp_rank), lay.tp, lay.dp,
                                  lay.zero_stage, dp_rank, tp_rank)
    return zero_model_state_bytes(rank_local_numel(spec, lay, pp_rank), lay.dp, lay.zero_stage,
                                  plan.job.precision)


def _rank_activations(plan: Plan, pp_rank: int) -> tuple:
    """(peak activation bytes, bytes of one micro-batch through all this rank's chunks)."""
    spec, job, lay = plan.model, plan.job, plan.layout
    chunks = lay.rank_chunk_layers(spec.num_layers)[pp_rank]
    per_layer = act.layer_bytes(spec, job, lay)
    mean_chunk_layers = sum(chunks) / len(chunks)
    peak = inflight_chunks(lay, pp_rank) * mean_chunk_layers * per_layer
    one_mb = sum(chunks) * per_layer
    if pp_rank == lay.chunk_rank(0):
        emb = act.embedding_bytes(spec, job, lay)
        peak += inflight_chunks(lay, pp_rank) / len(chunks) * emb
        one_mb += emb
    if pp_rank == lay.chunk_rank(lay.num_chunks - 1):
        head = act.head_bytes(spec, job, lay)
        peak += head_inflight(lay) * head
        one_mb += head
    return peak, one_mb


def _gathered_params(plan: Plan, pp_rank: int) -> float:
    """16-bit parameter copies that exist only during compute."""
    lay, job = plan.layout, plan.job
    a = dtype_bytes(job.precision)
    if lay.zero_stage == 3:
        return FSDP_PREFETCH_LAYERS * a * block_params_local(plan.model, lay.tp)
    if job.engine == "megatron" or (job.precision == "fp32" and lay.zero_stage < 2):
        return 0.0  # the 16-bit (or fp32) weights are the model states themselves
    # FSDP2 reshard_after_forward=False, or autocast's cast-weight cache
    return a * rank_local_numel(plan.model, lay, pp_rank)


def comm_buffers(plan: Plan) -> float:
    """Transient collective outputs: the TP all-gathered layer input, or the block's gradients
    staged for a ZeRO-2/3 reduce-scatter in fp32."""
    lay, job = plan.layout, plan.job
    tp_gather = dtype_bytes(job.precision) * lay.micro_batch * job.seq_len * \
        plan.model.hidden_size if lay.tp > 1 else 0.0
    rs = 4 * block_params_local(plan.model, lay.tp) if lay.zero_stage >= 2 else 0.0
    return tp_gather + rs


def rank_memory(plan: Plan, pp_rank: int) -> MemoryBreakdown:
    states = rank_model_state(plan, pp_rank)
    peak, one_mb = _rank_activations(plan, pp_rank)
    gpu = plan.cluster.profile.gpu
    return MemoryBreakdown(
        pp_rank=pp_rank, weights_bytes=states.weights_bytes,
        gradients_bytes=states.gradients_bytes, optimizer_bytes=states.optimizer_bytes,
        activations_bytes=peak, gathered_params_bytes=_gathered_params(plan, pp_rank),
        comm_buffers_bytes=comm_buffers(plan), framework_bytes=gpu.framework_overhead_bytes,
        activation_bytes_per_microbatch=one_mb,
        inflight_microbatches=peak / one_mb if one_mb else 0.0,
        capacity_bytes=gpu.memory_bytes)


def memory_breakdown(plan: Plan) -> MemoryBreakdown:
    """The most loaded rank's memory (ties go to the earliest pipeline rank)."""
    ranks = [rank_memory(plan, r) for r in range(plan.layout.pp)]
    return max(ranks, key=lambda m: (m.total_bytes, -m.pp_rank))
