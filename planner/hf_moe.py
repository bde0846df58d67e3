"""Hugging Face config.json -> MoESpec / MLASpec for the mixture-of-experts families
(planner/hf_config.py reads the rest of the decoder): mixtral, qwen2_moe, qwen3_moe,
deepseek_v3 and gpt_oss, with transformers 5.x's defaults for absent keys.

Which layers are MoE, as each transformers class builds them: Mixtral, GPT-OSS every layer;
Qwen2/3-MoE layer i when i is not in mlp_only_layers and (i + 1) % decoder_sparse_step == 0
(MoESpec: first_dense_layers = step - 1, moe_layer_every = step; an mlp_only_layers other than
the first k layers is refused); DeepSeek-V3 layer i >= first_k_dense_replace (transformers
ignores moe_layer_freq; a value other than 1 is refused, since DeepSeek's own code reads it).

Read and left out on purpose (they change which experts a token picks or how outputs are
scaled, not a tensor, a FLOP count or a byte moved, since the cost model assumes uniform routing
times the imbalance factor): norm_topk_prob, routed_scaling_factor, DeepSeek's group-limited
routing n_group / topk_group (it caps inter-node all-to-all traffic; planned as unlimited: an
upper bound), topk_method, scoring_func (read as the router), router_jitter_noise,
output_router_logits, GPT-OSS's clamped SwiGLU (swiglu_alpha, swiglu_limit).  DeepSeek-V3's
multi-token-prediction module (num_nextn_predict_layers) is not built by transformers and not
counted (the published 671B excludes its 14B; DeepSeek-AI 2024, Sec. 4.2)."""

from planner.moe_spec import MLASpec, MoESpec

PREFIX = "Hugging Face config"
QWEN_MOE = ("qwen2_moe", "qwen3_moe")


def _experts(c, key_default: dict) -> int:
    """The routed-expert count under either name a config uses."""
    (key, default), = key_default.items()
    other = "num_local_experts" if key == "num_experts" else "num_experts"
    n, alias = c.integer(key, default), c.integer(other, None)
    if alias is not None and n is not None and alias != n:
        c.refuse(f"{key} {n} and {other} {alias} disagree")
    return alias if n is None else n


def _same(c, alias: str, key: str, default) -> None:
    value, other = c.integer(alias, None), c.integer(key, default)
    if value is not None and value != other:
        c.refuse(f"{alias} {value} and {key} {other} disagree")


def _qwen_layers(c, layers: int) -> tuple:
    """(first_dense_layers, moe_layer_every) of Qwen2/3-MoE's layer choice."""
    step = c.integer("decoder_sparse_step", 1)
    only = c.value("mlp_only_layers", []) or []
    if not isinstance(only, list) or step < 1:
        raise ValueError(f"{PREFIX}: mlp_only_layers must be a list and decoder_sparse_step "
                         f">= 1, got {only!r} and {step}")
    if only and (step != 1 or sorted(only) != list(range(len(only)))):
        c.refuse(f"mlp_only_layers {only[:8]!r} with decoder_sparse_step {step}: only the "
                 f"first k layers dense (or every n-th MoE) is represented")
    return (len(only), 1) if only else (step - 1, step)


def read_moe(c, layers: int):
    """MoESpec of the config (None for a family without experts)."""
    t = c.model_type
    if t == "mixtral":
        return MoESpec(num_experts=_experts(c, {"num_local_experts": 8}),
                       experts_per_token=c.integer("num_experts_per_tok", 2),
                       expert_ffn_hidden_size=c.integer("intermediate_size"),
                       aux_loss_coef=c.number("router_aux_loss_coef", 0.001))
    if t in QWEN_MOE:
        first, every = _qwen_layers(c, layers)
        shared = c.integer("shared_expert_intermediate_size", 5632) if t == "qwen2_moe" else 0
        return MoESpec(num_experts=_experts(c, {"num_experts": 60 if t == "qwen2_moe" else 128}),
                       experts_per_token=c.integer("num_experts_per_tok",
                                                   4 if t == "qwen2_moe" else 8),
                       expert_ffn_hidden_size=c.integer("moe_intermediate_size",
                                                        1408 if t == "qwen2_moe" else 768),
                       shared_ffn_hidden_size=shared, shared_expert_gate=bool(shared),
                       first_dense_layers=first, moe_layer_every=every,
                       aux_loss_coef=c.number("router_aux_loss_coef", 0.001))
    if t == "deepseek_v3":
        return _deepseek_moe(c)
    if t == "gpt_oss":
        _same(c, "experts_per_token", "num_experts_per_tok", 4)  # the original release's name
        return MoESpec(num_experts=_experts(c, {"num_local_experts": 128}),
                       experts_per_token=c.integer("num_experts_per_tok", 4),
                       expert_ffn_hidden_size=c.integer("intermediate_size", 2880),
                       aux_loss_coef=c.number("router_aux_loss_coef", 0.001))
    return None


def _deepseek_moe(c) -> MoESpec:
    freq = c.integer("moe_layer_freq", 1)
    if freq != 1:
        c.refuse(f"moe_layer_freq {freq}: transformers builds every layer from "
                 f"first_k_dense_replace on as MoE, DeepSeek's code every {freq}-th; ambiguous")
    scoring = c.value("scoring_func", "sigmoid")
    if scoring not in ("sigmoid", "softmax"):
        c.refuse(f"scoring_func {scoring!r}: the router is softmax or sigmoid")
    ffn = c.integer("moe_intermediate_size", 2048)
    shared = c.integer("n_shared_experts", 1) or 0
    c.ignore("n_group", "topk_group", "routed_scaling_factor", "topk_method", "norm_topk_prob",
             "num_nextn_predict_layers", "ep_size", "aux_loss_alpha", "seq_aux")
    return MoESpec(num_experts=_experts(c, {"n_routed_experts": 256}),
                   experts_per_token=c.integer("num_experts_per_tok", 8),
                   expert_ffn_hidden_size=ffn, shared_ffn_hidden_size=shared * ffn,
                   first_dense_layers=c.integer("first_k_dense_replace", 3),
                   router=scoring if scoring in ("sigmoid", "softmax") else "sigmoid",
                   aux_loss_coef=c.number("aux_loss_alpha", 0.0001))


def read_mla(c):
    """MLASpec of a DeepSeek-V3 config (HF DeepseekV3Attention)."""
    if c.flag("attention_bias", False):
        c.refuse("attention_bias true: DeepseekV3Attention's q_a/kv_a projections get biases, "
                 "which ModelSpec's MLA does not have")
    c.ignore("num_key_value_heads", "head_dim", "qk_head_dim", "rope_interleave",
             "pretraining_tp", "hidden_act")  # MLA has no KV heads; head_dim = rope dim
    q_lora = c.integer("q_lora_rank", 1536)
    return MLASpec(q_lora_rank=q_lora or 0, kv_lora_rank=c.integer("kv_lora_rank", 512),
                   qk_nope_head_dim=c.integer("qk_nope_head_dim", 128),
                   qk_rope_head_dim=c.integer("qk_rope_head_dim", 64),
                   v_head_dim=c.integer("v_head_dim", 128))


def ignored_moe_keys(model_type: str) -> tuple:
    """Keys of the family read by transformers that leave the planned model unchanged."""
    return {"mixtral": ("router_jitter_noise", "output_router_logits"),
            "qwen2_moe": ("norm_topk_prob", "output_router_logits"),
            "qwen3_moe": ("norm_topk_prob", "output_router_logits"),
            "deepseek_v3": ("output_router_logits",),
            "gpt_oss": ("swiglu_alpha", "swiglu_limit", "output_router_logits")}.get(
                model_type, ())
