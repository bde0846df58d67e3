"""What DeepSpeed 0.19.8 holds per rank for Ψ rank-local parameters over dp data-parallel ranks:
which optimizer wrapper deepspeed.initialize builds, its model states and its buffers (the
`deepspeed` engine; planner/engines.py).  The export (planner/export.py) writes the settings
these figures assume: gradients accumulated and reduced in the model dtype (DeepSpeed's default),
contiguous gradients, overlap_comm and the bucket sizes below.

The ZeRO paper's count (Rajbhandari et al. 2020, Sec. 3.1, Table 1) is the core: 16-bit weights
(2Ψ) and gradients (2Ψ), K = 12 bytes of fp32 master weights, momentum and variance, the K bytes
partitioned from ZeRO-1, gradients from ZeRO-2, weights at ZeRO-3.  DeepSpeed's code adds what
the paper leaves out (file and statement cited at each term)."""

from dataclasses import dataclass

from planner.units import ADAM_STATE_BYTES_FP32, ADAM_STATE_BYTES_MIXED, dtype_bytes

# zero/config.py defaults, written explicitly by the export (elements, not bytes)
REDUCE_BUCKET_SIZE = 500_000_000      # reduce_bucket_size
ALLGATHER_BUCKET_SIZE = 500_000_000   # allgather_bucket_size
PREFETCH_BUCKET_SIZE = 50_000_000     # stage3_prefetch_bucket_size
MAX_LIVE_PARAMETERS = 1_000_000_000   # stage3_max_live_parameters
MASTER_BYTES = 4                      # fp32 master weights / fp32 gradient partition


def optimizer_wrapper(precision: str, zero_stage: int, pp: int) -> str:
    """The class deepspeed.initialize wraps AdamW in (engine.py _do_optimizer_sanity_check with
    grad_accum_dtype = the model dtype; FusedAdam, so the fused FP16_Optimizer)."""
    if zero_stage == 3:
        return "DeepSpeedZeroOptimizer_Stage3"
    if zero_stage >= 1:
        return "DeepSpeedZeroOptimizer"
    if precision == "fp32":
        return "FusedAdam"  # no wrapper: the optimizer updates the fp32 parameters
    if precision == "bf16" and pp > 1:
        return "BF16_Optimizer"  # "BF16 gradient accumulation ... with pipeline parallelism"
    return "FP16_Optimizer"  # fp16, and bf16 without ZeRO (DDP_BFLOAT16)


@dataclass(frozen=True)
class DeepSpeedStates:
    weights_bytes: float
    gradients_bytes: float
    optimizer_bytes: float


def _part(numel: float, dp: int) -> float:
    """A flat partition: the padded flat buffer cut into dp equal pieces (ceil)."""
    return -(-numel // dp)


def model_state_bytes(numel: float, dp: int, zero_stage: int, precision: str,
                      pp: int) -> DeepSpeedStates:
    """(weights, gradients, optimizer) bytes of one rank, gradients at their peak (the step,
    when the fp32 gradient partition exists beside the 16-bit gradients)."""
    a = dtype_bytes(precision)
    wrapper = optimizer_wrapper(precision, zero_stage, pp)
    part = _part(numel, dp)
    if wrapper == "FusedAdam":  # fp32 parameters and gradients, moments on them
        return DeepSpeedStates(a * numel, a * numel, ADAM_STATE_BYTES_FP32 * numel)
    if wrapper == "FP16_Optimizer":
        # fused_optimizer.py: fp32_groups_flat = flat 16-bit params .clone().float(); at the
        # step the 16-bit grads are flattened into an fp32 flat gradient (grads_groups_flat)
        return DeepSpeedStates(a * numel, a * numel + MASTER_BYTES * numel,
                               ADAM_STATE_BYTES_MIXED * numel)
    if wrapper == "BF16_Optimizer":
        # bf16_optimizer.py: fp32 master partition (fp32_groups_flat_partition), a full flat
        # accumulation buffer in grad_acc_dtype (bf16 here) besides the bf16 .grad, which the
        # pipeline engine keeps (update_hp_grads(clear_lp_grads=False)); at the step the bf16
        # partition is cast to an fp32 .grad (param_partition.grad = grad_partition.to(fp32))
        return DeepSpeedStates(a * numel, 2 * a * numel + MASTER_BYTES * part,
                               ADAM_STATE_BYTES_MIXED * part)
    weights = a * (part if zero_stage == 3 else numel)
    if zero_stage == 1:
        # stage_1_and_2.py: every .grad kept until the boundary, the flat 16-bit partition of
        # averaged_gradients (get_flat_partition), then its fp32 copy single_grad_partition
        grads = a * numel + a * part + MASTER_BYTES * part
    else:
        # ZeRO-2: grads_in_partition (16-bit, the rank's partition); ZeRO-3:
        # grad_partitions_flat_buffer (the partition, in grad_accum_dtype); both cast to an fp32
        # partition .grad at the step
        grads = a * part + MASTER_BYTES * part
    return DeepSpeedStates(weights, grads, ADAM_STATE_BYTES_MIXED * part)


def bucket_buffer_bytes(precision: str, zero_stage: int) -> float:
    """Gradient buckets: ZeRO-1/2 with contiguous_gradients allocate reduce_bucket_size elements
    in the gradient dtype, twice under overlap_comm (stage_1_and_2.py setup_buckets, buf_0 and
    buf_1); ZeRO-3 one bucket of reduce_bucket_size (stage3.py `bucket.buffer = torch.empty(...)`).
    The all-gather of updated parameters writes into the flat 16-bit buffer itself
    (allgather_bucket_size only cuts it into rounds): no extra buffer."""
    a = dtype_bytes(precision)
    if zero_stage in (1, 2):
        return 2 * a * REDUCE_BUCKET_SIZE
    if zero_stage == 3:
        return a * REDUCE_BUCKET_SIZE
    return 0.0


def zero3_gathered_bytes(precision: str, block_numel: float) -> float:
    """ZeRO-3's gathered 16-bit parameters: the running block plus what the prefetcher fetches
    ahead (stage3_prefetch_bucket_size elements), at most stage3_max_live_parameters
    (zero/partitioned_param_coordinator.py)."""
    return dtype_bytes(precision) * min(block_numel + PREFETCH_BUCKET_SIZE, MAX_LIVE_PARAMETERS)


def summary(precision: str, zero_stage: int, pp: int) -> str:
    """One line on what DeepSpeed builds for this plan (the estimate text prints it)."""
    wrapper = optimizer_wrapper(precision, zero_stage, pp)
    why = {"BF16_Optimizer": ": bf16 with a pipeline and no ZeRO, fp32 master weights and "
                             "moments sharded over dp like ZeRO-1",
           "FP16_Optimizer": ": fp32 master weights and moments on every rank",
           "FusedAdam": ": no wrapper, fp32 throughout"}.get(wrapper, "")
    return (f"DeepSpeed {wrapper}{why}; gradients accumulated and reduced in {precision}; "
            f"{'1F1B TrainSchedule' if pp > 1 else 'no pipeline'}")
