"""FLOPs of one micro-batch: the GEMMs of a transformer layer as one TP rank runs them, the
attention core, and the output layer.  A GEMM of (m x k) @ (k x n) costs 2mkn FLOPs.

For a GPT layer these sum to Korthikanti et al. 2022, Eq. 7: per layer and token
24h^2 (QKV 6h^2, projection 2h^2, 4h MLP 16h^2) + 4sh (attention scores and values), and the
output layer 2hv; a backward pass costs twice its forward (Narayanan et al. 2021, Sec. 5.1)."""

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


def _mla_gemms(spec: ModelSpec, tokens: int, tp: int) -> list:
    """MLA's projections (DeepSeek-V2 eqs. 37-47): down-projections replicated over TP, the
    up-projections and the output split by heads."""
    m, h, n = spec.mla, spec.hidden_size, spec.num_heads // tp
    gemms = ([Gemm("q_a", tokens, h, m.q_lora_rank), Gemm("q_b", tokens, m.q_lora_rank,
                                                          n * m.qk_head_dim)]
             if m.q_lora_rank else [Gemm("q", tokens, h, n * m.qk_head_dim)])
    return gemms + [Gemm("kv_a", tokens, h, m.kv_lora_rank + m.qk_rope_head_dim),
                    Gemm("kv_b", tokens, m.kv_lora_rank, n * (m.qk_nope_head_dim + m.v_head_dim)),
                    Gemm("attn_out", tokens, n * m.v_head_dim, h)]


def layer_gemms(spec: ModelSpec, tokens: int, tp: int) -> list:
    """Forward GEMMs of one block on one TP rank (column-parallel in, row-parallel out); an
    MoE model's layers as dense blocks (planner/cost/moe.py adds the experts)."""
    h, kv, f = spec.hidden_size, spec.kv_hidden_size, spec.ffn_hidden_size
    q = spec.q_hidden_size
    if spec.mla:
        gemms = _mla_gemms(spec, tokens, tp)
    else:
        gemms = [Gemm("q", tokens, h, q // tp), Gemm("kv", tokens, h, kv // tp, 2),
                 Gemm("attn_out", tokens, q // tp, h)]
    if spec.mlp == "swiglu":
        gemms += [Gemm("mlp_gate_up", tokens, h, f // tp, 2), Gemm("mlp_down", tokens, f // tp, h)]
    else:
        gemms += [Gemm("mlp_in", tokens, h, f // tp), Gemm("mlp_out", tokens, f // tp, h)]
    return gemms


def attention_core_flops(spec: ModelSpec, micro_batch: int, seq_len: int, tp: int) -> float:
    """Q K^T and softmax(.) V for the heads of one TP rank: 4 b s^2 h / t (Eq. 7's s/(6h) term).
    Counted in full, as the model-FLOPs convention does, even where a causal kernel skips half.
    Heads of their own width: 2 b s^2 heads (d_qk + d_v) / t (MLA: d_qk = nope + rope dims)."""
    if spec.mla:
        width = spec.num_heads * (spec.mla.qk_head_dim + spec.mla.v_head_dim)
    else:
        width = 2 * spec.q_hidden_size
    return 2.0 * micro_batch * seq_len * seq_len * width / tp


def head_gemm(spec: ModelSpec, tokens: int, tp: int) -> Gemm:
    """Output projection to the (vocab-parallel) logits; BERT adds its h x h MLM transform."""
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

    @property
    def layer_flops(self) -> float:
        return self.layer_gemm_flops + self.layer_attention_flops


def microbatch_flops(spec: ModelSpec, micro_batch: int, seq_len: int, tp: int) -> MicrobatchFlops:
    tokens = micro_batch * seq_len
    head = head_gemm(spec, tokens, tp).flops + sum(g.flops for g in head_extra_gemms(spec, tokens))
    return MicrobatchFlops(
        layer_gemm_flops=sum(g.flops for g in layer_gemms(spec, tokens, tp)),
        layer_attention_flops=attention_core_flops(spec, micro_batch, seq_len, tp),
        head_flops=head)


def model_flops_per_step(spec: ModelSpec, global_batch: int, seq_len: int) -> float:
    """Model FLOPs of one training step (forward + backward, no recompute), whole model; an
    MoE model's from its active parameters (top-k routed experts, planner/cost/moe.py), so MFU
    is on active FLOPs."""
    mb = microbatch_flops(spec, global_batch, seq_len, 1)
    total = 3.0 * (spec.num_layers * mb.layer_flops + mb.head_flops)
    if spec.is_moe:
        from planner.cost.moe import moe_delta_forward_flops
        total += 3.0 * spec.moe.num_moe_layers(spec.num_layers) * \
            moe_delta_forward_flops(spec, global_batch * seq_len)
    return total


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
                            op_policy_gemm_flops: float = 0.0) -> float:
    """Model FLOPs plus what recomputation adds; `op_policy_gemm_flops` is the whole batch's
    per-layer recomputed GEMM FLOPs under the op-level policy (planner.cost.compute)."""
    mb = microbatch_flops(spec, global_batch, seq_len, 1)
    extra = recomputed_layer_count(spec.num_layers, recompute, recompute_every) * \
        recompute_flops_per_layer(mb, recompute, op_policy_gemm_flops)
    return model_flops_per_step(spec, global_batch, seq_len) + extra
