"""Activation bytes one rank saves for backward, per layer and micro-batch.

Korthikanti et al. 2022 (Sec. 4, Eqs. 1-6) count, for 16-bit activations and 1-byte dropout
masks, sbh(34 + 5as/h) per GPT layer: attention 11sbh + 5as^2b, MLP 19sbh, two norms 4sbh.
We count the same tensors one by one, so the formula generalises to GQA, SwiGLU, fp32, no
dropout and flash attention (which keeps q, k, v, its output and a 4-byte log-sum-exp per row
instead of the s^2 score, softmax and mask tensors; Dao et al. 2022).

Engines differ in one place: under sequence parallelism Megatron-LM saves the sequence-sharded
input of the column-parallel GEMMs and all-gathers it again in backward, while PyTorch's DTensor
`SequenceParallel` + `ColwiseParallel` saves the all-gathered input (full sequence)."""

from dataclasses import dataclass

from planner.job import Job
from planner.plan import Layout
from planner.spec import ModelSpec
from planner.units import DROPOUT_MASK_BYTES, dtype_bytes

FP32 = 4


@dataclass(frozen=True)
class LayerActivations:
    """Bytes one rank saves per layer per micro-batch, by part."""
    norms_bytes: float
    attention_bytes: float
    mlp_bytes: float
    dropout_mask_bytes: float

    @property
    def total_bytes(self) -> float:
        return self.norms_bytes + self.attention_bytes + self.mlp_bytes + self.dropout_mask_bytes


def _attention_core(spec: ModelSpec, job: Job, b: int, s: int, t: int, a: int) -> float:
    """Tensors saved by the attention core itself (not its input/output projections)."""
    heads = spec.num_heads // t
    q = a * b * s * spec.hidden_size / t
    kv = 2 * a * b * s * spec.kv_hidden_size / t
    if job.flash_attention:
        return q + kv + q + FP32 * b * heads * s  # q, k, v, output, log-sum-exp
    scores = b * heads * s * s
    mask = DROPOUT_MASK_BYTES * scores if spec.dropout > 0 else 0
    probs_dropped = a * scores if spec.dropout > 0 else 0
    return q + kv + a * scores + mask + probs_dropped  # q, k (scores), v, softmax, dropout


def _norm_bytes(spec: ModelSpec, tokens: float, a: int) -> float:
    """One norm: its input plus fp32 statistics per token (mean and rstd; RMSNorm rstd only)."""
    stats = 2 if spec.norm == "layernorm" else 1
    return a * tokens * spec.hidden_size + FP32 * stats * tokens


def layer_activations(spec: ModelSpec, job: Job, layout: Layout) -> LayerActivations:
    """Saved bytes of one layer and one micro-batch without recomputation."""
    b, s, t, a = layout.micro_batch, job.seq_len, layout.tp, dtype_bytes(job.precision)
    h, f = spec.hidden_size, spec.ffn_hidden_size
    tokens = b * s
    sp = t if layout.sequence_parallel else 1
    # input of the column-parallel GEMMs (norm output), replicated across TP ranks
    gathered_div = sp if job.engine == "megatron" else 1
    gemm_in = a * tokens * h / gathered_div
    attention = gemm_in + _attention_core(spec, job, b, s, t, a) + a * tokens * h / t
    if spec.mlp == "swiglu":
        mlp = gemm_in + 4 * a * tokens * f / t  # gate (silu in), up, silu out, down in
    else:
        mlp = gemm_in + 2 * a * tokens * f / t  # gelu in, second GEMM in
    masks = 2 * DROPOUT_MASK_BYTES * tokens * h / sp if spec.dropout > 0 else 0
    norms = 2 * _norm_bytes(spec, tokens / sp, a)
    return LayerActivations(norms, attention, mlp, masks)


def checkpointed_layer_bytes(spec: ModelSpec, job: Job, layout: Layout) -> float:
    """Full recompute keeps only the block input (Korthikanti Table 2: 2sbh; sequence-sharded
    under PyTorch SP since the residual stream is sharded there)."""
    sp = layout.tp if layout.sequence_parallel and job.engine == "torch" else 1
    return dtype_bytes(job.precision) * layout.micro_batch * job.seq_len * spec.hidden_size / sp


def selective_saving(spec: ModelSpec, job: Job, layout: Layout) -> float:
    """Bytes selective recompute frees per layer: the attention core's saved tensors, except its
    inputs q, k, v which the checkpoint keeps (Korthikanti Sec. 5)."""
    b, s, t, a = layout.micro_batch, job.seq_len, layout.tp, dtype_bytes(job.precision)
    kept = a * b * s * (spec.hidden_size + 2 * spec.kv_hidden_size) / t
    return _attention_core(spec, job, b, s, t, a) - kept


def layer_bytes(spec: ModelSpec, job: Job, layout: Layout) -> float:
    """Saved bytes per layer and micro-batch under the plan's recompute policy."""
    if layout.recompute == "full":
        return checkpointed_layer_bytes(spec, job, layout)
    full = layer_activations(spec, job, layout).total_bytes
    if layout.recompute == "selective":
        return full - selective_saving(spec, job, layout)
    return full


def head_bytes(spec: ModelSpec, job: Job, layout: Layout) -> float:
    """Output layer, one micro-batch: final-norm input, the logits GEMM input and fp32 logits
    kept for the cross-entropy backward (Korthikanti Sec. 4.3: 4sbv/t)."""
    b, s, t, a = layout.micro_batch, job.seq_len, layout.tp, dtype_bytes(job.precision)
    tokens = b * s
    sp = t if layout.sequence_parallel else 1
    norm = _norm_bytes(spec, tokens / sp, a) if spec.arch != "bert" else 0
    return norm + a * tokens * spec.hidden_size + FP32 * tokens * -(-spec.vocab_size // t)


def embedding_bytes(spec: ModelSpec, job: Job, layout: Layout) -> float:
    """First stage, one micro-batch: token ids (int64) and the embedding dropout mask."""
    tokens = layout.micro_batch * job.seq_len
    sp = layout.tp if layout.sequence_parallel else 1
    mask = DROPOUT_MASK_BYTES * tokens * spec.hidden_size / sp if spec.dropout > 0 else 0
    return 8 * tokens + mask
