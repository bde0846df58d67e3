"""Time of the compute kernels of one layer / the output layer, for one micro-batch on one rank.

GEMMs run at peak x gemm_efficiency_max x q(m) q(n) q(k), q(d) = d / (d + gemm_half_dim): a
roofline-style saturation for tile quantisation on small dimensions, fitted per GPU
(planner/calibration/gemm_fit.py fits it to measured matmuls).  Memory-bound kernels move their
bytes at HBM bandwidth x memory_efficiency; every kernel pays kernel_overhead_s.

Which kernels run is the engine's (planner/engines.py, `kernels_from_op_census`):
- `torch` (eager PyTorch, this project's runtime): op by op from the runtime's op census
  (planner/cost/ops.py): every mm of a layer forward and backward on the GEMM curve, the
  scaled-dot-product attention kernel as below, and every other aten op - the fp32 RMSNorm
  statistics and casts, RoPE's mul/neg/cat, SiLU and the gate product, residual adds, autocast's
  weight casts and their gradients, dropout - as one memory-bound kernel moving its bytes;
- `megatron` (Megatron-LM's fused kernels): the layer's GEMMs, about ten fused elementwise
  kernels per layer over the activations, and a backward of two GEMMs per forward GEMM and
  twice the elementwise bytes.
Attention: flash at attention_efficiency of peak on the FLOPs it executes (causal kernels skip
half), backward 2.5x forward; unfused attention as batched GEMMs plus the softmax traffic.

The `torch` engine's host work per layer (Python, autograd and DTensor dispatch, and on CPU ranks
the waits of each small TP collective) is the profile's measured host_layer_overhead_s.  A GPU's
host queues kernels ahead of the device, so a layer takes the longer of host and device time;
where host and device are one processor (CPU ranks) the two add.

A torch.compile'd block (`compile`, torch engine): the same GEMM and attention calls, and instead
of the eager aten ops the fused kernels Inductor generates for it (planner/cost/compiled.py), each
one launch moving its bytes once; its host time is the eager host time per eager kernel times
the compiled kernels (README, torch.compile: an upper bound on the launches' host cost)."""

from dataclasses import dataclass, replace
from typing import Any

from planner.cost import fp8
from planner.cost.compiled import compiled_pass, eager_kernels
from planner.cost.flops import (
    Gemm,
    adapter_gemms,
    attention_core_flops,
    head_extra_gemms,
    head_gemm,
    layer_gemms,
)
from planner.cost.ops import op_policy_saved, ops
from planner.engines import engine
from planner.hardware import GpuSpec
from planner.job import Job
from planner.spec import ModelSpec
from planner.units import DROPOUT_MASK_BYTES, dtype_bytes

# FlashAttention-2 backward runs 5 GEMM-sized products against the forward's 2 (Dao 2023, Sec. 3)
FLASH_BWD_FACTOR = 2.5
# Megatron-LM's fused kernels per layer: norms, residual adds, activation, rope/bias, dropouts
ELEMENTWISE_KERNELS_PER_LAYER = 10
# Megatron-LM 2019 attention: scores / sqrt(d), scores * mask, - 10000 * (1 - mask), then softmax
EAGER_ATTENTION_EXTRA_KERNELS = 3


@dataclass(frozen=True)
class LayerTimes:
    """Seconds for one layer (or the output layer) and one micro-batch on one rank."""
    gemm_fwd_s: float
    attention_fwd_s: float
    elementwise_fwd_s: float
    gemm_bwd_s: float
    attention_bwd_s: float
    elementwise_bwd_s: float
    host_fwd_s: float = 0.0
    host_bwd_s: float = 0.0
    host_is_device: bool = False
    wgrad_fraction: float = 0.5  # of gemm_bwd_s, the weight gradients' (LoRA: adapters' only)

    def _with_host(self, device_s: float, host_s: float) -> float:
        return device_s + host_s if self.host_is_device else max(device_s, host_s)

    @property
    def fwd_s(self) -> float:
        return self._with_host(self.gemm_fwd_s + self.attention_fwd_s + self.elementwise_fwd_s,
                               self.host_fwd_s)

    @property
    def bwd_s(self) -> float:
        return self._with_host(self.gemm_bwd_s + self.attention_bwd_s + self.elementwise_bwd_s,
                               self.host_bwd_s)

    @property
    def wgrad_s(self) -> float:
        """The weight-gradient part of the backward GEMMs (deferrable in zero-bubble
        schedules): half of a dense backward, each GEMM's dgrad and wgrad being equal."""
        return self.gemm_bwd_s * self.wgrad_fraction


def gemm_efficiency(gpu: GpuSpec, m: int, n: int, k: int) -> float:
    d0 = gpu.gemm_half_dim
    return gpu.gemm_efficiency_max * (m / (m + d0)) * (n / (n + d0)) * (k / (k + d0))


def gemm_time(gpu: GpuSpec, gemm: Gemm, precision: str) -> float:
    rate = gpu.peak_flops[precision] * gemm_efficiency(gpu, gemm.m, gemm.n, gemm.k)
    return gemm.flops / rate + gemm.count * gpu.kernel_overhead_s


def linear_gemm_time(gpu: GpuSpec, gemm: Gemm, job: Job) -> float:
    """A transformer block's linear GEMM: at the profile's fp8 peak with the recipe's
    efficiency under FP8 training (planner/cost/fp8.py), else in the job's dtype."""
    if not job.fp8:
        return gemm_time(gpu, gemm, job.dtype)
    rate = gpu.peak_flops["fp8"] * gemm_efficiency(gpu, gemm.m, gemm.n, gemm.k) * \
        fp8.gemm_efficiency_factor(job.fp8_recipe)
    return gemm.flops / rate + gemm.count * gpu.kernel_overhead_s


def _memory_time(gpu: GpuSpec, nbytes: float, kernels: int) -> float:
    return nbytes / (gpu.hbm_bandwidth_bytes_per_s * gpu.memory_efficiency) + \
        kernels * gpu.kernel_overhead_s


def _elementwise_bytes(spec: ModelSpec, job: Job, t: int, sequence_parallel: bool,
                       micro_batch: int) -> float:
    """Bytes the memory-bound kernels of one layer's forward read and write (t: tp)."""
    a = dtype_bytes(job.dtype)
    tokens = micro_batch * job.seq_len
    sp = t if sequence_parallel else 1
    hidden = a * tokens * spec.hidden_size / sp
    # two norms (read + write), two residual adds (2 reads + 1 write)
    total = 2 * 2 * hidden + 2 * 3 * hidden
    if spec.dropout > 0:  # two dropouts: read, write, mask
        total += 2 * (2 * hidden + DROPOUT_MASK_BYTES * tokens * spec.hidden_size / sp)
    ffn = a * tokens * spec.ffn_hidden_size / t
    total += 5 * ffn if spec.mlp == "swiglu" else 2 * ffn  # silu + gate*up, or gelu
    if spec.arch == "llama":  # rotary embedding of q and k: read + write
        total += 2 * a * tokens * (spec.hidden_size + spec.kv_hidden_size) / t
    return total


def _attention_times(gpu: GpuSpec, spec: ModelSpec, job: Job, b: int, t: int) -> tuple:
    """(forward, backward) seconds of the attention core (b: micro-batch, t: tp)."""
    s = job.seq_len
    flops = attention_core_flops(spec, b, s, t)
    peak = gpu.peak_flops[job.dtype]
    if job.flash_attention:
        executed = flops * (0.5 if spec.causal else 1.0)  # causal kernels skip masked tiles
        fwd = executed / (peak * gpu.attention_efficiency) + gpu.kernel_overhead_s
        return fwd, FLASH_BWD_FACTOR * fwd
    heads = b * spec.num_heads // t
    bmm = Gemm("scores", s, spec.head_dim, s, heads)
    gemm_fwd = 2 * gemm_time(gpu, bmm, job.dtype)
    scores = heads * s * s
    a = dtype_bytes(job.dtype)
    # fused scale-mask-softmax (read + write) and dropout (read, write, 1-byte mask); eager
    # code runs scale, mask-multiply and mask-subtract as three more read+write kernels
    passes = 1 if job.attention == "fused" else 1 + EAGER_ATTENTION_EXTRA_KERNELS
    traffic = passes * 2 * a * scores + \
        ((2 * a + DROPOUT_MASK_BYTES) * scores if spec.dropout > 0 else 0)
    elem = _memory_time(gpu, traffic, passes + 1)
    return gemm_fwd + elem, 2 * gemm_fwd + 2 * elem


def _census_pass(gpu: GpuSpec, spec: ModelSpec, job: Job, region: str, direction: str, *,
                 tp: int, sequence_parallel: bool, micro_batch: int,
                 skipped: list | None = None) -> tuple:
    """(GEMM seconds, memory-bound seconds) of one pass of a census region (planner/cost/ops.py);
    the attention kernel is timed by _attention_times.  `skipped`: per row, kernels not run
    (a recompute that reuses saved outputs)."""
    gemm_s, nbytes, kernels = 0.0, 0.0, 0
    rows = ops(spec, job.dtype, region, direction, tp=tp, micro_batch=micro_batch,
               seq_len=job.seq_len, sequence_parallel=sequence_parallel)
    for op, skip in zip(rows, skipped or [0] * len(rows)):
        count = op.count - skip
        if count <= 0:
            continue
        if op.kind == "gemm":
            *batch, m, k, n = op.mkn
            gemm = Gemm(op.name, m, k, n, count * (batch[0] if batch else 1))
            gemm_s += linear_gemm_time(gpu, gemm, job) if region == "block" and \
                fp8.is_linear(op) else gemm_time(gpu, gemm, job.dtype)
        elif op.kind == "memory":
            nbytes += count * (op.read_bytes + op.write_bytes)
            kernels += count
    return gemm_s, _memory_time(gpu, nbytes, kernels)


def _compiled_pass(gpu: GpuSpec, spec: ModelSpec, job: Job, direction: str, host_s: float, *,
                   tp: int, sequence_parallel: bool, micro_batch: int) -> tuple:
    """(GEMM seconds, memory-bound seconds, host seconds) of one pass of a torch.compile'd block
    (planner/cost/compiled.py): the same GEMMs as eager, Inductor's fused kernels each moving
    its bytes once, and the eager host time per eager kernel paid per compiled kernel."""
    shape: dict[str, Any] = {"tp": tp, "sequence_parallel": sequence_parallel,
                             "micro_batch": micro_batch}
    gemm_s, _ = _census_pass(gpu, spec, job, "block", direction, **shape)
    census_shape = {**shape, "seq_len": job.seq_len}
    fused = compiled_pass(spec, job.dtype, direction, **census_shape)
    host = host_s * fused.kernels / eager_kernels(spec, job.dtype, direction, **census_shape)
    return gemm_s, _memory_time(gpu, fused.memory_bytes, fused.memory_kernels), host


def op_policy_recompute_s(gpu: GpuSpec, spec: ModelSpec, job: Job, *, tp: int,
                          sequence_parallel: bool, micro_batch: int,
                          compile: bool = False) -> float:
    """torchtitan's op-level policy re-runs the block's forward in backward with every saved
    output taken from its cache: each census op but the saved ones (the attention kernel is
    always saved), and the whole forward's host work (the Python forward runs again).  The TP
    collectives it re-runs are planner.cost.comm_plan.tp_recompute_seconds."""
    shape: dict[str, Any] = {"tp": tp, "sequence_parallel": sequence_parallel,
                             "micro_batch": micro_batch}
    rows = ops(spec, job.dtype, "block", "fwd", tp=tp, micro_batch=micro_batch,
               seq_len=job.seq_len, sequence_parallel=sequence_parallel)
    gemm_s, elem_s = _census_pass(gpu, spec, job, "block", "fwd", **shape,
                                  skipped=op_policy_saved(rows))
    # FP8: the casts are not in the save list, so they all run again (fused when compiled)
    elem_s = _with_casts(gpu, spec, job, (elem_s, 0.0), tp=tp, micro_batch=micro_batch,
                         zero_stage=0, compiled=compile)[0]
    host_s = gpu.host_layer_s(tp)[0] if engine(job.engine).host_overhead_per_layer else 0.0
    return LayerTimes(gemm_s, 0.0, elem_s, 0.0, 0.0, 0.0, host_s, 0.0, gpu.host_is_device).fwd_s


def op_policy_gemm_flops(spec: ModelSpec, job: Job, *, tp: int, micro_batch: int) -> float:
    """GEMM FLOPs the op-level policy recomputes per layer (the mm outputs it does not save)."""
    rows = ops(spec, job.dtype, "block", "fwd", tp=tp, micro_batch=micro_batch,
               seq_len=job.seq_len)
    return sum((op.count - saved) * op.flops for op, saved in zip(rows, op_policy_saved(rows))
               if op.kind == "gemm")


def _with_casts(gpu: GpuSpec, spec: ModelSpec, job: Job, times: tuple, *, tp: int,
                micro_batch: int, zero_stage: int, compiled: bool) -> tuple:
    """(forward, backward) memory-bound seconds plus the FP8 cast, amax, scale and transpose
    kernels of the block's linears (planner/cost/fp8.py; nothing unless fp8)."""
    if not job.fp8:
        return times
    return tuple(t + _memory_time(gpu, *fp8.cast_traffic(spec, job, d, tp=tp,
                                                           micro_batch=micro_batch,
                                                           zero_stage=zero_stage,
                                                           compiled=compiled))
                 for t, d in zip(times, ("fwd", "bwd")))


def with_lora(times: LayerTimes, gpu: GpuSpec, gemms: list, precision: str) -> LayerTimes:
    """LoRA: the base GEMMs' backward loses its weight-gradient half (frozen weights); the
    adapters' GEMMs run forward and twice backward, their wgrad half deferrable."""
    fwd = sum(gemm_time(gpu, g, precision) for g in gemms)
    base_bwd = times.gemm_bwd_s / 2
    bwd = base_bwd + 2 * fwd
    return replace(times, gemm_fwd_s=times.gemm_fwd_s + fwd, gemm_bwd_s=bwd,
                   wgrad_fraction=fwd / bwd if bwd else 0.0)


def layer_times(gpu: GpuSpec, spec: ModelSpec, job: Job, *, tp: int, sequence_parallel: bool,
                micro_batch: int, compile: bool = False, zero_stage: int = 0) -> LayerTimes:
    times = _layer_times(gpu, spec, job, tp=tp, sequence_parallel=sequence_parallel,
                         micro_batch=micro_batch, compile=compile, zero_stage=zero_stage)
    if job.lora is None:
        return times
    return with_lora(times, gpu, adapter_gemms(spec, micro_batch * job.seq_len, job.lora),
                     job.dtype)


def _layer_times(gpu: GpuSpec, spec: ModelSpec, job: Job, *, tp: int, sequence_parallel: bool,
                 micro_batch: int, compile: bool = False, zero_stage: int = 0) -> LayerTimes:
    eng = engine(job.engine)
    attn_fwd, attn_bwd = _attention_times(gpu, spec, job, micro_batch, tp)
    host_fwd, host_bwd = gpu.host_layer_s(tp) if eng.host_overhead_per_layer else (0.0, 0.0)
    shape: dict[str, Any] = {"tp": tp, "sequence_parallel": sequence_parallel,
                             "micro_batch": micro_batch}
    casts: dict[str, Any] = {"tp": tp, "micro_batch": micro_batch, "zero_stage": zero_stage,
                             "compiled": compile}
    if compile:  # the rules allow it on engines that compile blocks only
        gemm_fwd, elem_fwd, host_fwd = _compiled_pass(gpu, spec, job, "fwd", host_fwd, **shape)
        gemm_bwd, elem_bwd, host_bwd = _compiled_pass(gpu, spec, job, "bwd", host_bwd, **shape)
    elif eng.kernels_from_op_census:
        gemm_fwd, elem_fwd = _census_pass(gpu, spec, job, "block", "fwd", **shape)
        gemm_bwd, elem_bwd = _census_pass(gpu, spec, job, "block", "bwd", **shape)
    else:
        tokens = micro_batch * job.seq_len
        gemm_fwd = sum(linear_gemm_time(gpu, g, job) for g in layer_gemms(spec, tokens, tp))
        elem_fwd = _memory_time(gpu, _elementwise_bytes(spec, job, tp, sequence_parallel,
                                                        micro_batch),
                                ELEMENTWISE_KERNELS_PER_LAYER)
        gemm_bwd, elem_bwd = 2 * gemm_fwd, 2 * elem_fwd
    elem_fwd, elem_bwd = _with_casts(gpu, spec, job, (elem_fwd, elem_bwd), **casts)
    return LayerTimes(gemm_fwd, attn_fwd, elem_fwd, gemm_bwd, attn_bwd, elem_bwd,
                      host_fwd, host_bwd, gpu.host_is_device)


def head_times(gpu: GpuSpec, spec: ModelSpec, job: Job, *, tp: int,
               micro_batch: int) -> LayerTimes:
    """Output layer: logits GEMM (vocab-parallel) and the fp32 softmax cross-entropy (a
    classifier: the same kernels, analytically, over num_labels outputs).  LoRA's frozen
    output layer runs no weight-gradient GEMM."""
    times = _head_times(gpu, spec, job, tp=tp, micro_batch=micro_batch)
    if job.lora is None or job.trains_classifier:
        return times
    return replace(times, gemm_bwd_s=times.gemm_bwd_s / 2, wgrad_fraction=0.0)


def _head_times(gpu: GpuSpec, spec: ModelSpec, job: Job, *, tp: int,
                micro_batch: int) -> LayerTimes:
    if engine(job.engine).kernels_from_op_census and not job.trains_classifier:
        # the final norm counted on the whole sequence also under sequence parallelism
        shape: dict[str, Any] = {"tp": tp, "sequence_parallel": False, "micro_batch": micro_batch}
        gemm_fwd, elem_fwd = _census_pass(gpu, spec, job, "head", "fwd", **shape)
        gemm_bwd, elem_bwd = _census_pass(gpu, spec, job, "head", "bwd", **shape)
        return LayerTimes(gemm_fwd, 0.0, elem_fwd, gemm_bwd, 0.0, elem_bwd)
    tokens = micro_batch * job.seq_len
    gemms = [head_gemm(spec, tokens, tp, job)] + head_extra_gemms(spec, tokens)
    gemm_fwd = sum(gemm_time(gpu, g, job.dtype) for g in gemms)
    logits = tokens * gemms[0].n
    # cast to fp32 and log-softmax (read 16-bit, write fp32, read + write for the softmax)
    elem_fwd = _memory_time(gpu, logits * (dtype_bytes(job.dtype) + 3 * 4), 3)
    return LayerTimes(gemm_fwd, 0.0, elem_fwd, 2 * gemm_fwd, 0.0, 2 * elem_fwd)


def selective_recompute_s(times: LayerTimes) -> float:
    """Selective recompute re-runs the attention core's forward (Korthikanti Sec. 5)."""
    return times.attention_fwd_s
