"""FLOPs of one micro-batch: the GEMMs of a transformer layer as one TP rank runs them, the
attention core, and the output layer.  A GEMM of (m x k) @ (k x n) costs 2mkn FLOPs.

For a GPT layer these sum to Korthikanti et al. 2022, Eq. 7: per layer and token
24h^2 (QKV 6h^2, projection 2h^2, 4h MLP 16h^2) + 4sh (attention scores and values), and the
output layer 2hv; a backward pass costs twice its forward (Narayanan et al. 2021, Sec. 5.1):
one GEMM for the input gradient and one for the weight gradient, each as large as the forward.

LoRA (planner/lora.py; runtime/lora.py): a frozen weight needs no weight-gradient GEMM, so its
backward costs one forward (half the dense backward; the whole layer's GEMM work 2/3 of full
training); each adapter is two small trainable GEMMs (x A^T, then (x A^T) B^T) costing three
forwards.  Classification replaces the vocabulary projection by h x num_labels."""

from dataclasses import dataclass

from planner.spec import ModelSpec


@dataclass(frozen=True)
class Gemm:
    name: str
    m: int
    k: int
    n: int
    count: int = 1  # batched GEMMs of the same shape

    @property
    def flops(self) -> float:
        return 2.0 * self.m * self.k * self.n * self.count


def layer_gemms(spec: ModelSpec, tokens: int, tp: int) -> list:
    """Forward GEMMs of one block on one TP rank (column-parallel in, row-parallel out)."""
    h, kv, f = spec.hidden_size, spec.kv_hidden_size, spec.ffn_hidden_size
    gemms = [Gemm("q", tokens, h, h // tp), Gemm("kv", tokens, h, kv // tp, 2),
             Gemm("attn_out", tokens, h // tp, h)]
    if spec.mlp == "swiglu":
        gemms += [Gemm("mlp_gate_up", tokens, h, f // tp, 2), Gemm("mlp_down", tokens, f // tp, h)]
    else:
        gemms += [Gemm("mlp_in", tokens, h, f // tp), Gemm("mlp_out", tokens, f // tp, h)]
    return gemms


def attention_core_flops(spec: ModelSpec, micro_batch: int, seq_len: int, tp: int) -> float:
    """Q K^T and softmax(.) V for the heads of one TP rank: 4 b s^2 h / t (Eq. 7's s/(6h) term).
    Counted in full, as the model-FLOPs convention does, even where a causal kernel skips half."""
    return 4.0 * micro_batch * seq_len * seq_len * spec.hidden_size / tp


def adapter_gemms(spec: ModelSpec, tokens: int, lora) -> list:
    """Forward GEMMs of one block's LoRA adapters (tp = 1: rule lora_tp)."""
    if lora is None:
        return []
    h, kv, f = spec.hidden_size, spec.kv_hidden_size, spec.ffn_hidden_size
    shapes = {"q": (h, h), "k": (h, kv), "v": (h, kv), "o": (h, h), "gate": (h, f),
              "up": (h, f), "down": (f, h), "fc": (h, f), "proj": (f, h)}  # (in, out)
    out = []
    for t in lora.targets:
        d_in, d_out = shapes[t]
        out += [Gemm(f"lora_A_{t}", tokens, d_in, lora.rank),
                Gemm(f"lora_B_{t}", tokens, lora.rank, d_out)]
    return out


def head_gemm(spec: ModelSpec, tokens: int, tp: int, job=None) -> Gemm:
    """Output projection to the (vocab-parallel) logits, or a classify job's h x num_labels
    classifier (on every position: the loss reads the pooled one); BERT adds its h x h MLM
    transform."""
    if job is not None and job.trains_classifier:
        return Gemm("classifier", tokens, spec.hidden_size, job.num_labels)
    return Gemm("logits", tokens, spec.hidden_size, -(-spec.vocab_size // tp))


def head_extra_gemms(spec: ModelSpec, tokens: int) -> list:
    return [Gemm("mlm_transform", tokens, spec.hidden_size, spec.hidden_size)] \
        if spec.arch == "bert" else []


@dataclass(frozen=True)
class MicrobatchFlops:
    """Forward FLOPs of one micro-batch on one TP rank, by piece."""
    layer_gemm_flops: float      # one layer
    layer_attention_flops: float  # one layer's attention core
    head_flops: float            # output layer (on the last stage only)
    adapter_flops: float = 0.0   # one layer's LoRA adapters
    frozen_base: bool = False    # LoRA: base weights frozen (no weight-gradient GEMMs)
    head_trainable_flops: float | None = None  # of head_flops, the trained GEMMs' (None: all)

    @property
    def layer_flops(self) -> float:
        return self.layer_gemm_flops + self.layer_attention_flops + self.adapter_flops

    @property
    def layer_train_flops(self) -> float:
        """Forward + backward of one layer: 3x each trained GEMM and the attention core, 2x
        each frozen GEMM (input gradient only)."""
        gemm = (2.0 if self.frozen_base else 3.0) * self.layer_gemm_flops
        return gemm + 3.0 * (self.layer_attention_flops + self.adapter_flops)

    @property
    def head_train_flops(self) -> float:
        trained = self.head_flops if self.head_trainable_flops is None \
            else self.head_trainable_flops
        return 3.0 * trained + 2.0 * (self.head_flops - trained)


def microbatch_flops(spec: ModelSpec, micro_batch: int, seq_len: int, tp: int,
                     job=None) -> MicrobatchFlops:
    tokens = micro_batch * seq_len
    main, extra = head_gemm(spec, tokens, tp, job).flops, \
        sum(g.flops for g in head_extra_gemms(spec, tokens))
    lora = job.lora if job is not None else None
    trained = None
    if lora is not None:  # the classifier is trained; the MLM transform / vocab head frozen
        trained = main if job.trains_classifier else 0.0
    return MicrobatchFlops(
        layer_gemm_flops=sum(g.flops for g in layer_gemms(spec, tokens, tp)),
        layer_attention_flops=attention_core_flops(spec, micro_batch, seq_len, tp),
        head_flops=main + extra,
        adapter_flops=sum(g.flops for g in adapter_gemms(spec, tokens, lora)),
        frozen_base=lora is not None, head_trainable_flops=trained)


def lora_first_block_skip(spec: ModelSpec, tokens: int, lora) -> float:
    """Under LoRA the frozen embedding's output carries no gradient, so the first block's q, k
    and v GEMMs (and their adapters' lora_A) compute no input gradient: the backward stops
    there (counted on the runtime with torch.utils.flop_counter, tests/test_lora.py).  Exact
    when one of q, k, v is adapted; otherwise the backward stops later, which is not counted
    (the figure then over-counts the first block's backward)."""
    if lora is None or not {"q", "k", "v"} & set(lora.targets):
        return 0.0
    qkv = sum(g.flops for g in layer_gemms(spec, tokens, 1) if g.name in ("q", "kv"))
    a_in = sum(g.flops for g in adapter_gemms(spec, tokens, lora)
               if g.name in ("lora_A_q", "lora_A_k", "lora_A_v"))
    return qkv + a_in


def model_flops_per_step(spec: ModelSpec, global_batch: int, seq_len: int, job=None) -> float:
    """Model FLOPs of one training step (forward + backward, no recompute), whole model, as the
    job trains it (LoRA: no weight gradients of frozen weights, no input gradient into the
    first block)."""
    mb = microbatch_flops(spec, global_batch, seq_len, 1, job)
    skip = lora_first_block_skip(spec, global_batch * seq_len, job.lora if job else None)
    return spec.num_layers * mb.layer_train_flops + mb.head_train_flops - skip


def recompute_flops_per_layer(mb: MicrobatchFlops, recompute: str,
                              op_policy_gemm_flops: float = 0.0) -> float:
    """Extra forward FLOPs per recomputed layer and micro-batch (Korthikanti Eq. 8 for
    selective: the attention core again; full: the whole layer forward again; op: the GEMMs
    whose outputs torchtitan's policy does not save, `op_policy_gemm_flops`)."""
    return {"none": 0.0, "selective": mb.layer_attention_flops, "op": op_policy_gemm_flops,
            "full": mb.layer_flops}[recompute]


def recomputed_layer_count(num_layers: int, recompute: str, every: int = 1) -> int:
    """Blocks running the policy: every K-th (planner.cost.pipeline.recomputed)."""
    return 0 if recompute == "none" else num_layers // every


def hardware_flops_per_step(spec: ModelSpec, global_batch: int, seq_len: int,
                            recompute: str, recompute_every: int = 1,
                            op_policy_gemm_flops: float = 0.0, job=None) -> float:
    """Model FLOPs plus what recomputation adds; `op_policy_gemm_flops` is the whole batch's
    per-layer recomputed GEMM FLOPs under the op-level policy (planner.cost.compute)."""
    mb = microbatch_flops(spec, global_batch, seq_len, 1, job)
    extra = recomputed_layer_count(spec.num_layers, recompute, recompute_every) * \
        recompute_flops_per_layer(mb, recompute, op_policy_gemm_flops)
    return model_flops_per_step(spec, global_batch, seq_len, job) + extra
