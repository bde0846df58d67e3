"""Activation bytes one rank saves for backward, per layer and micro-batch.

Korthikanti et al. 2022 (Sec. 4, Eqs. 1-6) count, for 16-bit activations and 1-byte dropout
masks, sbh(34 + 5as/h) per GPT layer: attention 11sbh + 5as^2b, MLP 19sbh, two norms 4sbh.
We count the same tensors one by one, so the formula generalises to GQA, SwiGLU, fp32, no
dropout and flash attention (which keeps q, k, v, its output and a 4-byte log-sum-exp per row
instead of the s^2 score, softmax and mask tensors; Dao et al. 2022).

Engines differ in one place: under sequence parallelism Megatron-LM saves the sequence-sharded
input of the column-parallel GEMMs and all-gathers it again in backward, while PyTorch's DTensor
`SequenceParallel` + `ColwiseParallel` saves the all-gathered input (full sequence).

LoRA (planner/lora.py): autograd saves a GEMM's input only to compute its weight gradient, so a
frozen linear layer saves nothing (PyTorch's generated autograd saves `self` of mm only when
mat2 requires grad); an adapted one saves its input for lora_A and the r-wide A x for lora_B.
The norms, activation functions and attention keep what they kept: the activation gradient
still flows through the frozen base.  A frozen embedding saves no token ids, and the frozen
output layer no input (the fp32 logits stay, for the cross-entropy)."""

from dataclasses import dataclass
from typing import Any

from planner.cost.comm_plan import tp_pattern_for
from planner.cost.ops import op_policy_saved, ops
from planner.engines import engine
from planner.job import Job
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


def _attention_bytes(spec: ModelSpec, job: Job, b: int, t: int, selective: bool) -> float:
    """The attention core's saved tensors and the output projection's input.

    The core keeps q, k, v (the checkpoint's inputs under selective recompute). Without
    recompute a flash kernel also keeps its output and fp32 log-sum-exp; the output projection
    reads that output through a view, so it is one tensor.  Unfused attention keeps the softmax,
    dropout mask and dropped probabilities (5as^2b/t with dropout) and the projection its own
    input (the re-laid-out context, 2sbh/t).  b: micro-batch, t: tp."""
    s, a = job.seq_len, dtype_bytes(job.dtype)
    heads = spec.num_heads // t
    out = a * b * s * spec.hidden_size / t
    qkv = out + 2 * a * b * s * spec.kv_hidden_size / t
    if selective:
        return qkv + out
    if job.flash_attention:
        return qkv + out + FP32 * b * heads * s
    scores = b * heads * s * s
    dropout = (DROPOUT_MASK_BYTES + a) * scores if spec.dropout > 0 else 0
    return qkv + a * scores + dropout + out


def _lora_attention_cut(spec: ModelSpec, job: Job, b: int, t: int, selective: bool) -> float:
    """Bytes the attention part no longer saves under LoRA: the q/k/v input when none of them
    is adapted, the output projection's input when o is not and nothing else keeps it (a flash
    kernel without recompute keeps its output, the same tensor)."""
    lora, a, tokens = job.lora, dtype_bytes(job.dtype), b * job.seq_len
    assert lora is not None
    cut = 0.0
    if not {"q", "k", "v"} & set(lora.targets):
        cut += a * tokens * spec.hidden_size
    if "o" not in lora.targets and (selective or not job.flash_attention):
        cut += a * tokens * spec.hidden_size / t
    return cut


def _lora_mlp_cut(spec: ModelSpec, job: Job, b: int, t: int) -> float:
    """Bytes the MLP no longer saves under LoRA: the first projections' input when none is
    adapted; the last projection's input (SwiGLU: silu(gate) * up, GELU: gelu's output) when it
    is not.  SiLU, GELU and the gate product still save their inputs."""
    lora, a, tokens = job.lora, dtype_bytes(job.dtype), b * job.seq_len
    assert lora is not None
    first, last = (("gate", "up"), "down") if spec.mlp == "swiglu" else (("fc",), "proj")
    cut = 0.0 if set(first) & set(lora.targets) else a * tokens * spec.hidden_size
    if last not in lora.targets:
        cut += a * tokens * spec.ffn_hidden_size / t
    return cut


def lora_adapter_bytes(job: Job, micro_batch: int) -> float:
    """lora_B's saved input, A x (tokens x r), per adapted linear layer of one block."""
    lora = job.lora
    assert lora is not None
    return len(lora.targets) * dtype_bytes(job.dtype) * micro_batch * job.seq_len * lora.rank


def _norm_bytes(spec: ModelSpec, tokens: float, a: int) -> float:
    """One norm: its input plus fp32 statistics per token (mean and rstd; RMSNorm rstd only)."""
    stats = 2 if spec.norm == "layernorm" else 1
    return a * tokens * spec.hidden_size + FP32 * stats * tokens


def layer_activations(spec: ModelSpec, job: Job, *, tp: int, sequence_parallel: bool,
                      micro_batch: int, selective: bool = False) -> LayerActivations:
    """Saved bytes of one layer and one micro-batch (no recompute, or selective)."""
    s, t, a = job.seq_len, tp, dtype_bytes(job.dtype)
    h, f = spec.hidden_size, spec.ffn_hidden_size
    tokens = micro_batch * s
    sp = t if sequence_parallel else 1
    # input of the column-parallel GEMMs (norm output), replicated across TP ranks unless the
    # engine keeps it sequence-sharded and re-gathers it in backward
    gathered_div = sp if engine(job.engine).sp_saves_sharded_gemm_input else 1
    gemm_in = a * tokens * h / gathered_div
    attention = gemm_in + _attention_bytes(spec, job, micro_batch, t, selective)
    if spec.mlp == "swiglu":
        mlp = gemm_in + 4 * a * tokens * f / t  # gate (silu in), up, silu out, down in
    else:
        mlp = gemm_in + 2 * a * tokens * f / t  # gelu in, second GEMM in
    masks = 2 * DROPOUT_MASK_BYTES * tokens * h / sp if spec.dropout > 0 else 0
    norms = 2 * _norm_bytes(spec, tokens / sp, a)
    if job.lora is not None:  # tp = 1 (rule lora_tp): no sequence-parallel division
        attention -= _lora_attention_cut(spec, job, micro_batch, t, selective)
        mlp += lora_adapter_bytes(job, micro_batch) - _lora_mlp_cut(spec, job, micro_batch, t)
    return LayerActivations(norms, attention, mlp, masks)


def checkpointed_layer_bytes(spec: ModelSpec, job: Job, *, tp: int, sequence_parallel: bool,
                             micro_batch: int) -> float:
    """Full recompute keeps only the block input (Korthikanti Table 2: 2sbh; sequence-sharded
    under PyTorch SP since the residual stream is sharded there)."""
    sp = tp if sequence_parallel and engine(job.engine).sp_shards_checkpoint else 1
    return dtype_bytes(job.dtype) * micro_batch * job.seq_len * spec.hidden_size / sp


def op_policy_layer_bytes(spec: ModelSpec, job: Job, *, tp: int, sequence_parallel: bool,
                          micro_batch: int) -> float:
    """torchtitan's op-level policy: the checkpoint's input plus the outputs it caches - every
    other mm, the attention kernel (output and log-sum-exp) and, under sequence parallelism,
    the row-parallel reduce-scatters - from the op census's output bytes (planner.cost.ops)."""
    shape: dict[str, Any] = {"tp": tp, "sequence_parallel": sequence_parallel,
                             "micro_batch": micro_batch}
    rows = ops(spec, job.dtype, "block", "fwd", tp=tp, micro_batch=micro_batch,
               seq_len=job.seq_len, sequence_parallel=sequence_parallel)
    cached = sum(n * op.write_bytes for n, op in zip(op_policy_saved(rows), rows))
    forward, _ = tp_pattern_for(spec.mlp, sequence_parallel, job.engine)
    scatters = sum(n for kind, n in forward if kind == "reduce_scatter") if tp > 1 else 0
    scattered = scatters * dtype_bytes(job.dtype) * micro_batch * job.seq_len * \
        spec.hidden_size / tp
    return checkpointed_layer_bytes(spec, job, **shape) + cached + scattered


def layer_bytes(spec: ModelSpec, job: Job, *, tp: int, sequence_parallel: bool,
                micro_batch: int, recompute: str) -> float:
    """Saved bytes per layer and micro-batch under the plan's recompute policy (selective:
    the attention core is recomputed, Korthikanti Sec. 5; op: op_policy_layer_bytes; full:
    Table 2)."""
    shape: dict[str, Any] = {"tp": tp, "sequence_parallel": sequence_parallel,
                             "micro_batch": micro_batch}
    if recompute == "full":
        return checkpointed_layer_bytes(spec, job, **shape)
    if recompute == "op":
        return op_policy_layer_bytes(spec, job, **shape)
    return layer_activations(spec, job, **shape, selective=recompute == "selective").total_bytes


def head_bytes(spec: ModelSpec, job: Job, *, tp: int, sequence_parallel: bool,
               micro_batch: int) -> float:
    """Output layer, one micro-batch: final-norm input, the logits GEMM input and fp32 logits
    kept for the cross-entropy backward (Korthikanti Sec. 4.3: 4sbv/t)."""
    s, t, a = job.seq_len, tp, dtype_bytes(job.dtype)
    tokens = micro_batch * s
    sp = t if sequence_parallel else 1
    norm = _norm_bytes(spec, tokens / sp, a) if spec.arch != "bert" else 0
    labels = 8 * tokens  # int64 targets kept by the cross-entropy
    outputs = job.num_labels if job.trains_classifier else -(-spec.vocab_size // t)
    # the output GEMM's input, unless the output layer is LoRA's frozen one
    gemm_in = 0 if job.lora is not None and not job.trains_classifier else \
        a * tokens * spec.hidden_size
    return norm + gemm_in + FP32 * tokens * outputs + labels


def embedding_bytes(spec: ModelSpec, job: Job, *, tp: int, sequence_parallel: bool,
                    micro_batch: int) -> float:
    """First stage, one micro-batch: token ids (int64), position ids for learned positions and
    the embedding dropout mask."""
    tokens = micro_batch * job.seq_len
    sp = tp if sequence_parallel else 1
    mask = DROPOUT_MASK_BYTES * tokens * spec.hidden_size / sp if spec.dropout > 0 else 0
    positions = 8 * job.seq_len if spec.learned_positions else 0
    if job.lora is not None:  # a frozen embedding: no gradient, nothing saved
        return 0.0
    return 8 * tokens + positions + mask
