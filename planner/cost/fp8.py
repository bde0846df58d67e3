"""FP8 training: what the linear layers' FP8 GEMMs cost and save (README, FP8).

Only the transformer blocks' linear layers run in FP8: attention, norms, the output layer and
every collective but FSDP2's FP8 all-gather stay bf16 (torchtitan's float8 converter skips the
`output` layer; Megatron-LM's output layer is no Transformer Engine module).  Per linear of a
forward GEMM input [m, k] x weight [k, n] (the census `mm` rows, planner/cost/ops.py):

torch engine = torchao 0.18 float8 training (torchao/float8/float8_linear.py,
matmul_with_hp_or_float8_args; float8_utils.py; float8_training_tensor.py _ToFloat8ConstrFunc):
  forward casts input and weight; backward casts grad_output twice (dim0 for grad_input, dim1
  for grad_weight), weight and input again, and copies three fp8 operands to the layout
  torch._scaled_mm takes (float8_ops.py preprocess_addmm: the weight for grad_input, grad_output
  and input for grad_weight).  One eager cast of X 16-bit elements is abs, max (amax), four
  scalar ops (amax_to_scale), to(float32), mul by the scale, clamp and to(float8): 10 kernels
  moving 33 bytes per element (EAGER_CAST_*).  torch.compile fuses a cast into an amax pass and
  one cast kernel (5 bytes per element, 2 kernels; the transposed copy written by the same
  kernel).  It saves the bf16 input and weight for backward (ctx.save_for_backward(input_hp,
  weight_hp_t)), so activations do not shrink.  With FSDP2 (ZeRO-2/3) and tensorwise scaling the
  weights are all-gathered in fp8 (enable_fsdp_float8_all_gather, config.py: tensorwise only):
  half the gather volume, fp8 gathered copies, and no per-GEMM weight cast.
megatron engine = Transformer Engine: one fused cast-transpose kernel per GEMM input (reads 2,
  writes 1 + 1 bytes per element: fp8 and its transpose), amax taken in the same kernel under
  delayed scaling and in one more read pass under current (tensorwise) scaling; the fp8 weight
  and its transpose cached for the step (2 bytes per linear weight element), and the saved GEMM
  inputs kept as fp8 (1 byte instead of 2)."""

from functools import lru_cache

from planner.cost.ops import ops
from planner.engines import SHARDED_GRAD_STAGES, engine

# An FP8 GEMM's large-shape efficiency relative to bf16's on the same GPU: cuBLAS FP8 GEMMs on
# H100 SXM sustain about 1.6-1.7x the bf16 rate against the 2x of the datasheet peaks (NVIDIA
# Transformer Engine H100 GEMM benchmarks; DeepGEMM README: 1550 TFLOP/s best case on H800 =
# 0.78 of 1979); 0.85 of the bf16 efficiency.  A prior, not measured here.
FP8_EFFICIENCY_VS_BF16 = 0.85
# Rowwise scaling runs CUTLASS's rowwise-scaled _scaled_mm, slower than cuBLAS tensorwise:
# torchao's float8 README (Llama-3 8B, 8x H100, torchtitan) measures +25% tokens/s for
# tensorwise (fp8 all-gather) and +10% for rowwise over bf16; torchtitan docs/float8.md calls
# rowwise "higher accuracy, slower".  0.8 of the tensorwise rate: a prior, not fitted.
ROWWISE_GEMM_RATE = 0.8
EAGER_CAST_BYTES = 33    # per element: abs 2+2, max 2, to(fp32) 2+4, mul 4+4, clamp 4+4, to 4+1
EAGER_CAST_KERNELS = 10  # abs, max, 4 amax_to_scale scalar ops, to(fp32), mul, clamp, to(fp8)
COMPILED_CAST_BYTES = 5  # amax read 2, cast read 2 + write 1
COMPILED_CAST_KERNELS = 2
TE_CAST_TRANSPOSE_BYTES = 4  # read 2, write fp8 1 + fp8 transpose 1
TE_AMAX_PASS_BYTES = 2       # current scaling: amax before the cast (read 2)


def gemm_efficiency_factor(recipe: str) -> float:
    """Multiplier on the bf16 GEMM efficiency curve for an FP8 linear GEMM of `recipe`."""
    return FP8_EFFICIENCY_VS_BF16 * (ROWWISE_GEMM_RATE if recipe == "rowwise" else 1.0)


def fp8_gather(job, zero_stage: int) -> bool:
    """FSDP2 all-gathers the weights in fp8: torch engine, tensorwise, ZeRO-2/3."""
    return (job.fp8 and job.fp8_recipe == "tensorwise" and engine(job.engine).name == "torch"
            and zero_stage in SHARDED_GRAD_STAGES)


LINEAR_OPS = ("mm", "addmm")  # a block's linear layers in the op census (bias: addmm)
# modules whose inputs are one tensor (Transformer Engine fuses them into one linear), and the
# linears whose input is a norm output (sequence-sharded under Megatron-LM's SP)
SHARED_INPUT = {"attn.k": "attn.q", "attn.v": "attn.q", "mlp.up": "mlp.gate"}
NORM_INPUT = ("attn.q", "mlp.gate", "mlp.fc")


def is_linear(op) -> bool:
    return op.kind == "gemm" and op.name in LINEAR_OPS and op.module != "attn"


@lru_cache(maxsize=4096)
def linear_shapes(spec, *, tp: int, micro_batch: int, seq_len: int) -> tuple:
    """(count, input elements m*k, weight elements k*n, output elements m*n, module) of each
    forward linear of a block on one TP rank, from the op census's mm/addmm rows."""
    rows = ops(spec, "bf16", "block", "fwd", tp=tp, micro_batch=micro_batch, seq_len=seq_len)
    out = []
    for op in rows:
        if is_linear(op):
            m, k, n = op.mkn[-3:]
            batch = op.mkn[0] if len(op.mkn) == 4 else 1
            out.append((op.count * batch, m * k, k * n, m * n, op.module))
    return tuple(out)


def linear_weight_numel(spec, tp: int) -> float:
    """Elements of a block's linear weights on one TP rank (the ones FP8 casts)."""
    return sum(c * w for c, _, w, _, _ in linear_shapes(spec, tp=tp, micro_batch=1, seq_len=1))


def _torch_cast_traffic(shapes, direction: str, compiled: bool, gather: bool) -> tuple:
    per_b, per_k = ((COMPILED_CAST_BYTES, COMPILED_CAST_KERNELS) if compiled
                    else (EAGER_CAST_BYTES, EAGER_CAST_KERNELS))
    nbytes, kernels = 0.0, 0
    for count, x, w, g, _ in shapes:
        if direction == "fwd":
            casts = [x] + ([] if gather else [w])
            copies = []
        else:
            casts = [g, x] + ([] if gather else [w]) + ([] if compiled else [g])
            copies = [w, g, x]  # fp8 transposes (compiled: written by the cast kernel)
        nbytes += count * (per_b * sum(casts) + 2 * sum(copies))
        kernels += count * (per_k * len(casts) + (0 if compiled else len(copies)))
    return nbytes, kernels


def _te_cast_traffic(shapes, direction: str, recipe: str) -> tuple:
    per_b = TE_CAST_TRANSPOSE_BYTES + (TE_AMAX_PASS_BYTES if recipe == "tensorwise" else 0)
    per_k = 2 if recipe == "tensorwise" else 1
    nbytes, kernels = 0.0, 0
    for count, x, w, g, _ in shapes:
        casts = [x, w] if direction == "fwd" else [g]
        nbytes += count * per_b * sum(casts)
        kernels += count * per_k * len(casts)
    return nbytes, kernels


def cast_traffic(spec, job, direction: str, *, tp: int, micro_batch: int, zero_stage: int = 0,
                 compiled: bool = False) -> tuple:
    """(bytes, kernels) of the FP8 cast, amax, scale and transpose kernels of one block pass
    (`direction` fwd or bwd) for one micro-batch on one TP rank; (0, 0) unless fp8."""
    if not job.fp8:
        return 0.0, 0
    shapes = linear_shapes(spec, tp=tp, micro_batch=micro_batch, seq_len=job.seq_len)
    if engine(job.engine).name == "megatron":
        return _te_cast_traffic(shapes, direction, job.fp8_recipe)
    return _torch_cast_traffic(shapes, direction, compiled, fp8_gather(job, zero_stage))


def weight_copy_bytes(spec, job, *, tp: int, micro_batch: int, rank_layers: int) -> float:
    """FP8 copies of weights besides the model states: Transformer Engine's cached fp8 weight
    and transpose (2 bytes per linear weight element of the rank, for the step); torchao's
    transient fp8 operands of the largest linear in backward (weight, grad_output and input,
    each with its transposed copy)."""
    if not job.fp8:
        return 0.0
    if engine(job.engine).name == "megatron":
        return 2.0 * linear_weight_numel(spec, tp) * rank_layers
    shapes = linear_shapes(spec, tp=tp, micro_batch=micro_batch, seq_len=job.seq_len)
    return max(2.0 * (x + w + g) for _, x, w, g, _ in shapes)


def saved_input_saving(spec, job, *, tp: int, micro_batch: int, sequence_parallel: bool) -> float:
    """Activation bytes per layer FP8 saves: Transformer Engine keeps the fp8 cast of each
    linear's input (1 byte, not 2) for the weight gradient - the norm outputs (one per fused
    qkv / gate-up linear) and the MLP's last input - while the output projection's fp8 input is
    a new tensor beside the bf16 attention output the attention kernel keeps (+1 byte).
    torchao keeps the bf16 input: 0."""
    if not (job.fp8 and engine(job.engine).name == "megatron"):
        return 0.0
    shapes = linear_shapes(spec, tp=tp, micro_batch=micro_batch, seq_len=job.seq_len)
    sp = tp if sequence_parallel and engine(job.engine).sp_saves_sharded_gemm_input else 1
    saved = 0.0
    for _, x, _, _, module in shapes:
        if module in SHARED_INPUT:
            continue
        if module == "attn.o":
            saved -= x
        else:
            saved += x / sp if module in NORM_INPUT else x
    return saved  # elements x (2 - 1) bytes
