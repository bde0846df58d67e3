"""Per-rank memory: model states under ZeRO 0-3, activations of the in-flight micro-batches,
gathered-parameter and communication buffers, and the memory outside tensors itemised
(planner/cost/outside.py: CUDA context, NCCL buffers, cuBLAS workspaces, allocator reserve);
a fits verdict.

Model states (Rajbhandari et al. 2020, Sec. 3.1 and 5): mixed-precision Adam holds 2 + 2 + K
bytes per parameter (16-bit weights and gradients, K = 12 bytes of fp32 master weights, momentum
and variance); ZeRO-1 shards the K bytes over the dp ranks, ZeRO-2 also the gradients, ZeRO-3
also the weights.  That is the `megatron` engine.  The `torch` engine (this project's runtime)
keeps fp32 parameters as the master copy and computes in 16 bits through FSDP2's
MixedPrecisionPolicy or autocast: 4 + 4 + 8 bytes, sharded per tensor exactly as PyTorch does
(FSDP2: dim 0, torch.chunk sizes; ZeRO-1: the rank-local parameters laid end to end and cut into
dp equal pieces, as runtime/zero1.py does).

LoRA (planner/lora.py, runtime/lora.py): the frozen base tensors are held in the training
precision (2 bytes in bf16/fp16; QLoRA's 4-bit base: NF4 block weights at 4.5 bits, a memory
model only) with no gradient and no optimizer state, sharded by FSDP2 like any parameter; the
adapters (and a classifier head) are fp32 master parameters with fp32 gradients and AdamW state,
and ZeRO-1 partitions only them."""

import math
from dataclasses import dataclass, fields
from functools import lru_cache

from planner.cost import activations as act
from planner.cost import deepspeed as ds
from planner.cost import fp8, moe
from planner.cost.fp8 import fp8_gather, linear_weight_numel
from planner.cost import traced_bytes
from planner.cost.combine import activation_peak, rank_total_bytes
from planner.cost.compiled import saved_bytes_saving
from planner.cost.context import gathered_kv_bytes, local_job
from planner.cost.fields import (PlanEvaluations, call, plan_fields, rank_facts_of,
                                 recomputed_layers_of, unpack, with_rank)
from planner.cost.outside import OUTSIDE_TERMS, collective_groups, outside_parts, pipeline_peers
from planner.cost.params import _local_numel, block_params_local, chunk_size, pieces_tensors
from planner.cost.pipeline import head_inflight, inflight_chunks
from planner.cost import offload as offload_cost
from planner.engines import SHARDED_GRAD_STAGES, deferred_fsdp, engine
from planner.lora import NF4_BITS_PER_WEIGHT
from planner.units import ADAM_STATE_BYTES_FP32, ADAM_STATE_BYTES_MIXED, dtype_bytes

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
    context_bytes: float            # CUDA context (CPU ranks: the process's torch runtime)
    workspace_bytes: float          # cuBLAS workspaces
    nccl_buffers_bytes: float       # communicators' ring and point-to-point buffers
    allocator_reserve_bytes: float  # cached, reserved but free (fragmentation)
    num_communicators: int          # process groups running collectives on this rank
    num_pipeline_peers: int
    activation_bytes_per_microbatch: float
    inflight_microbatches: float
    capacity_bytes: float
    host_bytes_per_node: float = 0.0   # CPU offload: the node's ranks' states in host memory
    host_capacity_bytes: float = 0.0   # the profile's host memory per node

    @property
    def host_fits(self) -> bool:
        return self.host_bytes_per_node <= self.host_capacity_bytes or \
            self.host_bytes_per_node == 0

    @property
    def tensor_bytes(self) -> float:
        return (self.weights_bytes + self.gradients_bytes + self.optimizer_bytes
                + self.activations_bytes + self.gathered_params_bytes + self.comm_buffers_bytes)

    @property
    def framework_bytes(self) -> float:
        """Everything outside tensors (what torch.cuda.max_memory_allocated does not see)."""
        return (self.context_bytes + self.workspace_bytes + self.nccl_buffers_bytes
                + self.allocator_reserve_bytes)

    @property
    def total_bytes(self) -> float:
        return self.tensor_bytes + self.framework_bytes

    @property
    def fits(self) -> bool:
        """GPU memory and, under CPU offload, the node's host memory."""
        return self.total_bytes <= self.capacity_bytes and self.host_fits

    def to_dict(self) -> dict:
        d = {f.name: getattr(self, f.name) for f in fields(self)}
        d["framework_bytes"] = self.framework_bytes
        d["total_bytes"] = self.total_bytes
        d["fits"] = self.fits
        if not self.host_bytes_per_node:  # no offload: the keys of plans without it
            del d["host_bytes_per_node"], d["host_capacity_bytes"]
        else:
            d["host_fits"] = self.host_fits
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


def _frozen_bytes(tensors: list, tp: int, dp: int, zero_stage: int, dp_rank: int,
                  tp_rank: int, frozen_bytes: float, base_4bit: bool) -> float:
    """Frozen tensors (LoRA's base) in `frozen_bytes` per element, FSDP2-sharded under ZeRO-2/3;
    with `base_4bit` the block's linear weights in NF4 (planner.lora.NF4_BITS_PER_WEIGHT)."""
    total = 0.0
    for t in tensors:
        shape = t.local_shape(tp, tp_rank)
        n = _fsdp_numel(shape, dp, dp_rank) if zero_stage in SHARDED_GRAD_STAGES \
            else math.prod(shape)
        quantised = base_4bit and len(shape) == 2 and not t.name.startswith(("embed.", "head."))
        total += n * (NF4_BITS_PER_WEIGHT / 8 if quantised else frozen_bytes)
    return total


def torch_model_state_bytes(tensors: list, tp: int, dp: int, zero_stage: int,
                            dp_rank: int = 0, tp_rank: int = 0, deferred_sync: bool = False,
                            frozen_bytes: float = 4, base_4bit: bool = False) -> ModelStateBytes:
    """fp32 parameters, fp32 gradients, AdamW exp_avg + exp_avg_sq + step, as PyTorch shards.
    With `deferred_sync` (ZeRO-2/3 under pipelining) the gradients are held unsharded in fp32
    until the step's reduce-scatter (FSDP2 accumulates unreduced gradients in its reduce dtype).
    Frozen tensors (t.frozen) hold `frozen_bytes` per element and nothing else."""
    frozen = [t for t in tensors if t.frozen]
    if frozen:
        base = _frozen_bytes(frozen, tp, dp, zero_stage, dp_rank, tp_rank, frozen_bytes,
                             base_4bit)
        rest = torch_model_state_bytes([t for t in tensors if not t.frozen], tp, dp,
                                       zero_stage, dp_rank, tp_rank, deferred_sync)
        return ModelStateBytes(base + rest.weights_bytes, rest.gradients_bytes,
                               rest.optimizer_bytes)
    state = ADAM_STATE_BYTES_FP32
    shapes = [t.local_shape(tp, tp_rank) for t in tensors]
    if zero_stage in SHARDED_GRAD_STAGES:  # FSDP2 shards parameters and gradients
        numel = sum(_fsdp_numel(s, dp, dp_rank) for s in shapes)
        grads = 4 * sum(math.prod(s) for s in shapes) if deferred_sync else 4 * numel
        return ModelStateBytes(4 * numel, grads, state * numel + ADAM_STEP_BYTES * len(shapes))
    local = [math.prod(s) for s in shapes]
    numel = sum(local)
    if zero_stage == 1:
        opt_numel, opt_count = _flat_partition(local, dp, dp_rank)
    else:
        opt_numel, opt_count = numel, len(local)
    return ModelStateBytes(4 * numel, 4 * numel, state * opt_numel + ADAM_STEP_BYTES * opt_count)


@lru_cache(maxsize=65536)
def _torch_rank_states(spec, pieces: tuple[int, bool, bool, bool], tp: int,
                       dp: int, zero_stage: int, dp_rank: int,
                       tp_rank: int, deferred_sync: bool, job=None) -> ModelStateBytes:
    lora = job.lora if job is not None else None
    frozen = dtype_bytes(job.dtype) if job is not None else 4
    return torch_model_state_bytes(pieces_tensors(spec, *pieces, job=job), tp, dp, zero_stage,
                                   dp_rank, tp_rank, deferred_sync, frozen,
                                   bool(lora and lora.base_4bit))


def _inventory_job(job):
    """The job when it changes the parameter inventory (classify, LoRA), else None (a shared
    cache entry for every pre-training job)."""
    return job if job.task == "classify" or job.lora is not None else None


def model_states(spec, job, *, tp, dp, pp, zero_stage, rank_layers, holds_embedding,
                 holds_head, tied_copy, dp_rank=0, tp_rank=0, cp=1, dp_shard=0,
                 offload="none") -> tuple:
    """(weights, gradients, optimizer) bytes on one rank's GPU: the states (rank_states) less
    what CPU offload keeps on the host (planner/cost/offload.py)."""
    states = rank_states(spec, job, tp=tp, dp=dp, pp=pp, zero_stage=zero_stage,
                         rank_layers=rank_layers, holds_embedding=holds_embedding,
                         holds_head=holds_head, tied_copy=tied_copy, dp_rank=dp_rank,
                         tp_rank=tp_rank, cp=cp, dp_shard=dp_shard)
    numel = offload_cost.optimizer_numel(job, zero_stage=zero_stage, optimizer_bytes=states[2])
    return offload_cost.split(states, job, offload=offload, optimizer_numel=numel)[0]


def host_states(spec, job, *, tp, dp, pp, zero_stage, rank_layers, holds_embedding, holds_head,
                tied_copy, cp=1, dp_shard=0, offload="none") -> float:
    """Bytes one rank keeps in host memory under CPU offload (0 without)."""
    if offload == "none":
        return 0.0
    states = rank_states(spec, job, tp=tp, dp=dp, pp=pp, zero_stage=zero_stage,
                         rank_layers=rank_layers, holds_embedding=holds_embedding,
                         holds_head=holds_head, tied_copy=tied_copy, cp=cp, dp_shard=dp_shard)
    numel = offload_cost.optimizer_numel(job, zero_stage=zero_stage, optimizer_bytes=states[2])
    return offload_cost.split(states, job, offload=offload, optimizer_numel=numel)[1]


def rank_states(spec, job, *, tp, dp, pp, zero_stage, rank_layers, holds_embedding,
                holds_head, tied_copy, dp_rank=0, tp_rank=0, cp=1, dp_shard=0) -> tuple:
    """(weights, gradients, optimizer) bytes of one rank (dp rank 0 / tp rank 0 hold the
    largest shards).  ZeRO/FSDP shard over dp x cp (torchtitan's dp_shard_cp mesh).  Hybrid
    sharding shards over the dp_shard ranks of a shard group (every replica holds the same
    shards), so the states are those of dp = dp_shard at the rank's place in its group (dp rank
    = replica x dp_shard + place: planner/topology.py; not with cp > 1: rule cp_hsdp)."""
    dp, dp_rank = (dp_shard, dp_rank % dp_shard) if 0 < dp_shard < dp else (dp * cp, dp_rank)
    pieces = (int(rank_layers), bool(holds_embedding), bool(holds_head), bool(tied_copy))
    states: ds.DeepSpeedStates | ModelStateBytes
    if engine(job.engine).deepspeed_optimizers:
        states = ds.model_state_bytes(_local_numel(spec, tp, *pieces, _inventory_job(job)), dp,
                                      zero_stage, job.dtype, pp)
    elif engine(job.engine).fp32_master_params:
        deferred = bool(deferred_fsdp(job.engine, zero_stage, pp))
        states = _torch_rank_states(spec, pieces, tp, dp, zero_stage, dp_rank, tp_rank, deferred,
                                    _inventory_job(job))
    else:
        states = zero_model_state_bytes(_local_numel(spec, tp, *pieces, _inventory_job(job)), dp,
                                        zero_stage, job.dtype)
    return states.weights_bytes, states.gradients_bytes, states.optimizer_bytes


def gathered_params(spec, job, *, tp, pp, zero_stage, rank_layers, holds_embedding, holds_head,
                    tied_copy, micro_batch=1) -> float:
    """Parameter copies that exist only during compute: 16-bit copies (under pipelining
    ZeRO-2/3 keep the whole stage's unsharded copies until the step ends:
    engines.deferred_fsdp), plus FP8's weight copies (planner/cost/fp8.py)."""
    extra = fp8.weight_copy_bytes(spec, job, tp=tp, micro_batch=micro_batch,
                                  rank_layers=rank_layers)
    return _compute_copies(spec, job, tp=tp, pp=pp, zero_stage=zero_stage,
                           rank_layers=rank_layers, holds_embedding=holds_embedding,
                           holds_head=holds_head, tied_copy=tied_copy) + extra


def _fp8_gathered_discount(spec, job, tp, zero_stage, layers) -> float:
    """Bytes FSDP2's fp8 all-gather saves on gathered block weights: 1 of 2 per linear
    weight element."""
    return linear_weight_numel(spec, tp) * layers if fp8_gather(job, zero_stage) else 0.0


def _compute_copies(spec, job, *, tp, pp, zero_stage, rank_layers, holds_embedding, holds_head,
                    tied_copy) -> float:
    """The 16-bit copies.  Autocast caches casts of trainable fp32 leaves only
    (aten/src/ATen/autocast_mode.cpp, `can_try_cache` needs requires_grad): LoRA's frozen
    base, already 16-bit, adds no copy."""
    a = dtype_bytes(job.dtype)
    inv = _inventory_job(job)
    if engine(job.engine).deepspeed_optimizers:  # 16-bit weights are the model states
        return ds.zero3_gathered_bytes(job.dtype, block_params_local(spec, tp, inv)) \
            if zero_stage == 3 else 0.0
    if zero_stage == 3 and not deferred_fsdp(job.engine, zero_stage, pp):
        return FSDP_PREFETCH_LAYERS * (a * block_params_local(spec, tp, inv) -
                                       _fp8_gathered_discount(spec, job, tp, zero_stage, 1))
    if not engine(job.engine).fp32_master_params or (
            job.dtype == "fp32" and zero_stage not in SHARDED_GRAD_STAGES):
        return 0.0  # the 16-bit (or fp32) weights are the model states themselves
    # FSDP2 reshard_after_forward=False, or autocast's cast-weight cache
    autocast = zero_stage not in SHARDED_GRAD_STAGES
    return a * _local_numel(spec, tp, int(rank_layers), bool(holds_embedding), bool(holds_head),
                            bool(tied_copy), inv, trainable_only=autocast) - \
        _fp8_gathered_discount(spec, job, tp, zero_stage, int(rank_layers))


def comm_buffers(spec, job, *, tp, micro_batch, zero_stage, cp=1) -> float:
    """Transient collective outputs: the TP all-gathered layer input, or the block's gradients
    staged for a ZeRO-2/3 reduce-scatter in fp32 (LoRA: the adapters' only)."""
    job = local_job(job, cp)
    tp_gather = dtype_bytes(job.dtype) * micro_batch * job.seq_len * spec.hidden_size \
        if tp > 1 else 0.0
    if engine(job.engine).deepspeed_optimizers:
        return tp_gather + ds.bucket_buffer_bytes(job.dtype, zero_stage)
    rs = 4 * block_params_local(spec, tp, _inventory_job(job), trainable_only=True) \
        if zero_stage in SHARDED_GRAD_STAGES else 0.0
    return tp_gather + rs


def activation_pieces(spec, job, *, tp, sequence_parallel, micro_batch, recompute,
                      compile=False, cp=1, cp_comm="allgather") -> tuple:
    """(per recomputed layer, per other layer, embedding, output layer) activation bytes of
    one micro-batch; a compiled block without recompute saves what the compiled census
    measured fewer (planner/cost/compiled.py; under a recompute policy the eager figure).
    Under context parallelism every piece is of the rank's s/cp tokens, and the all-gather
    flavour's attention also keeps the gathered K/V (planner/cost/context.py)."""
    shape = {"tp": tp, "sequence_parallel": sequence_parallel, "micro_batch": micro_batch}
    gathered = gathered_kv_bytes(spec, job, tp=tp, micro_batch=micro_batch, cp=cp,
                                 cp_comm=cp_comm)
    job = local_job(job, cp)
    trace = traced_bytes.active(job)  # --trace-activations: the implementation's own bytes
    if trace is not None:
        plain = trace.layer(spec, job, **shape) + gathered
    else:
        plain = act.layer_bytes(spec, job, **shape, recompute="none") + gathered
    if compile:
        plain -= saved_bytes_saving(spec, job.dtype, seq_len=job.seq_len, **shape)
    fp8_saved = fp8.saved_input_saving(spec, job, **shape)
    plain -= fp8_saved
    # full recompute keeps the block input only; selective and op keep the attention inputs,
    # the local q, k, v: the gathered K/V is made again inside the recomputed attention
    # (context.cp_rerun_collectives; measured on the runtime, tests/test_runtime_cp.py)
    policy = plain if recompute == "none" else act.layer_bytes(
        spec, job, **shape, recompute=recompute) - \
        (fp8_saved if recompute == "selective" else 0.0)
    head = act.head_bytes(spec, job, **shape) if trace is None else trace.head(spec, job,
                                                                                **shape)
    return (policy, plain, act.embedding_bytes(spec, job, **shape), head)


def inflight(*, pp, num_microbatches, virtual_stages, schedule, rank) -> tuple:
    """(chunk passes, output-layer micro-batches) rank `rank` holds at its peak."""
    return (inflight_chunks(pp=pp, num_microbatches=num_microbatches,
                            virtual_stages=virtual_stages, schedule=schedule, rank=rank),
            head_inflight(pp=pp, num_microbatches=num_microbatches, schedule=schedule))


def rank_memory_parts(evaluate) -> dict:
    """One rank's bytes by component (scalars, or one entry per layout), from its pieces:
    `evaluate(fn)` is fn's result for the rank (planner/cost/fields.py)."""
    weights, gradients, optimizer = unpack(evaluate(model_states), 3)
    moe_w, moe_g, moe_o = unpack(evaluate(moe.moe_model_states), 3)
    weights, gradients, optimizer = weights + moe_w, gradients + moe_g, optimizer + moe_o
    per_layer, plain, emb, head = unpack(evaluate(activation_pieces), 4)
    chunks, head_mbs = unpack(evaluate(inflight), 2)
    layers, nchunks, first, last = unpack(evaluate(rank_facts_of), 4)
    moe_layers = evaluate(moe.rank_moe_layers_of)
    facts = {"rank_layers": layers, "holds_embedding": first == 1, "holds_head": last == 1,
             "layer_bytes": per_layer, "embedding_bytes": emb, "head_bytes": head,
             "recomputed_layers": evaluate(recomputed_layers_of), "plain_layer_bytes": plain}
    # each MoE layer saves its difference to the dense layer (planner/cost/moe.py)
    moe_layer_acts = moe_layers * evaluate(moe.moe_activation_delta_bytes)
    moe_acts = chunks * moe_layer_acts / nchunks
    parts = {"weights": weights, "gradients": gradients, "optimizer": optimizer,
             "activations": activation_peak(inflight=chunks, rank_chunks=nchunks,
                                            head_inflight=head_mbs, **facts) + moe_acts,
             "gathered": evaluate(gathered_params), "comm_buffers": evaluate(comm_buffers)}
    parts.update(outside_parts(
        terms=[evaluate(fn) for fn in OUTSIDE_TERMS], groups=evaluate(collective_groups),
        peers=evaluate(pipeline_peers),
        transient_bytes=parts["activations"] + parts["gathered"] + parts["comm_buffers"]))
    parts["total"] = rank_total_bytes(**parts)
    parts["communicators"], parts["peers"] = evaluate(collective_groups), evaluate(pipeline_peers)
    parts["host"] = evaluate(host_states)
    parts["one_microbatch"] = activation_peak(inflight=1, rank_chunks=1, head_inflight=1,
                                              **facts) + moe_layer_acts
    return parts


def rank_memory(plan, pp_rank: int,
                evaluations: PlanEvaluations | None = None) -> MemoryBreakdown:
    """The memory of pipeline rank `pp_rank` (dp rank 0, tp rank 0); `evaluations` shares
    the plan's rank-independent pieces between calls."""
    evaluations = evaluations or PlanEvaluations(plan_fields(plan))
    parts = rank_memory_parts(evaluations.evaluator(pp_rank))
    p = {k: float(v) for k, v in parts.items()}
    return MemoryBreakdown(
        pp_rank=pp_rank, weights_bytes=p["weights"], gradients_bytes=p["gradients"],
        optimizer_bytes=p["optimizer"], activations_bytes=p["activations"],
        gathered_params_bytes=p["gathered"], comm_buffers_bytes=p["comm_buffers"],
        context_bytes=p["context"], workspace_bytes=p["workspace"],
        nccl_buffers_bytes=p["nccl_buffers"], allocator_reserve_bytes=p["allocator_reserve"],
        num_communicators=int(p["communicators"]), num_pipeline_peers=int(p["peers"]),
        activation_bytes_per_microbatch=p["one_microbatch"],
        inflight_microbatches=p["activations"] / p["one_microbatch"]
        if p["one_microbatch"] else 0.0, capacity_bytes=plan.cluster.profile.gpu.memory_bytes,
        # every rank of a node offloads into its host memory: the node's ranks (at most
        # gpus_per_node) times this rank's bytes (an upper bound where a node mixes stages)
        host_bytes_per_node=p["host"] * min(plan.cluster.world_size,
                                            plan.cluster.profile.gpus_per_node),
        host_capacity_bytes=float(plan.cluster.profile.host.memory_bytes_per_node))


def rank_model_state(plan, pp_rank: int, dp_rank: int = 0, tp_rank: int = 0) -> ModelStateBytes:
    """Model-state bytes of one rank of a plan."""
    named = with_rank(plan_fields(plan), pp_rank)
    return ModelStateBytes(*call(model_states, {**named, "dp_rank": dp_rank, "tp_rank": tp_rank}))
