"""Named model presets with the shapes their papers publish, and `load_model` for any source."""

from pathlib import Path

from planner.moe_spec import MLASpec, MoESpec
from planner.schema import load_json_file, short_repr
from planner.spec import ModelSpec, from_hf_config


def _gpt(name, layers, hidden, heads, vocab=50257, seq=1024, ffn=None, dropout=0.1):
    return ModelSpec(name=name, arch="gpt", num_layers=layers, hidden_size=hidden,
                     num_heads=heads, num_kv_heads=heads, ffn_hidden_size=ffn or 4 * hidden,
                     vocab_size=vocab, max_seq_len=seq, tie_embeddings=True, linear_bias=True,
                     dropout=dropout)


def _llama(name, layers, hidden, heads, kv, ffn, vocab, seq, theta, eps=1e-5):
    return ModelSpec(name=name, arch="llama", num_layers=layers, hidden_size=hidden,
                     num_heads=heads, num_kv_heads=kv, ffn_hidden_size=ffn, vocab_size=vocab,
                     max_seq_len=seq, tie_embeddings=False, linear_bias=False,
                     norm_eps=eps, rope_theta=theta)


def _bert(name, layers, hidden, heads):
    return ModelSpec(name=name, arch="bert", num_layers=layers, hidden_size=hidden,
                     num_heads=heads, num_kv_heads=heads, ffn_hidden_size=4 * hidden,
                     vocab_size=30522, max_seq_len=512, tie_embeddings=True, linear_bias=True,
                     dropout=0.1, norm_eps=1e-12)


def _moe(name, layers, hidden, heads, kv, ffn, vocab, seq, theta, eps, moe, **extra):
    """A Llama-shaped decoder (RMSNorm, SwiGLU, RoPE, GQA) whose MLPs are MoESpec `moe`."""
    return ModelSpec(name=name, arch="llama", num_layers=layers, hidden_size=hidden,
                     num_heads=heads, num_kv_heads=kv, ffn_hidden_size=ffn, vocab_size=vocab,
                     max_seq_len=seq, tie_embeddings=False, linear_bias=extra.pop("bias", False),
                     norm_eps=eps, rope_theta=theta, moe=moe, **extra)


def _qwen3_moe(name, layers, hidden, heads, ffn, expert_ffn):
    """Qwen3-MoE (Qwen Team 2025, Table 2; HF Qwen/Qwen3-30B-A3B, Qwen3-235B-A22B config.json):
    128 experts, top-8, no shared expert, 4 KV heads of 128 dims, q/k norms, aux loss 0.001."""
    moe = MoESpec(num_experts=128, experts_per_token=8, expert_ffn_hidden_size=expert_ffn,
                  aux_loss_coef=0.001)
    return _moe(name, layers, hidden, heads, 4, ffn, 151936, 40960, 1e6, 1e-6, moe,
                attention_head_dim=128, qk_norm=True)


_MOE_PRESETS = [
    # Mixtral 8x7B (Jiang et al. 2024, Table 1; HF mistralai/Mixtral-8x7B-v0.1 config.json:
    # router_aux_loss_coef 0.02, no sliding window).
    _moe("mixtral-8x7b", 32, 4096, 32, 8, 14336, 32000, 32768, 1e6, 1e-5,
         MoESpec(num_experts=8, experts_per_token=2, expert_ffn_hidden_size=14336,
                 aux_loss_coef=0.02)),
    _qwen3_moe("qwen3-30b-a3b", 48, 2048, 32, 6144, 768),
    _qwen3_moe("qwen3-235b-a22b", 94, 4096, 64, 12288, 1536),
    # DeepSeek-V3 (DeepSeek-AI 2024, Sec. 4.2; HF deepseek-ai/DeepSeek-V3 config.json): MLA,
    # 3 dense layers, then 256 routed experts (top-8, sigmoid router) + 1 shared expert;
    # sequence-wise balance loss alpha = 0.0001 (Sec. 4.2).  Its multi-token-prediction module
    # (14B, Sec. 2.2) is not part of the 671B and not modelled.
    _moe("deepseek-v3", 61, 7168, 128, 128, 18432, 129280, 163840, 10000.0, 1e-6,
         MoESpec(num_experts=256, experts_per_token=8, expert_ffn_hidden_size=2048,
                 shared_ffn_hidden_size=2048, first_dense_layers=3, router="sigmoid",
                 aux_loss_coef=0.0001),
         mla=MLASpec(q_lora_rank=1536, kv_lora_rank=512, qk_nope_head_dim=128,
                     qk_rope_head_dim=64, v_head_dim=128)),
    # GPT-OSS-120B (OpenAI 2025 model card, Table 1; HF openai/gpt-oss-120b config.json): 128
    # experts top-4, biases on every linear, attention sinks, 64 heads of 64 dims.  Its
    # alternate layers attend through a 128-token sliding window, which ModelSpec does not
    # represent: this preset attends fully in every layer (the attention FLOPs of those layers
    # are over-counted), and its YaRN-scaled RoPE is plain RoPE at theta 150000.
    _moe("gpt-oss-120b", 36, 2880, 64, 8, 2880, 201088, 131072, 150000.0, 1e-5,
         MoESpec(num_experts=128, experts_per_token=4, expert_ffn_hidden_size=2880,
                 aux_loss_coef=0.9),
         bias=True, attention_head_dim=64, attention_sinks=True),
]

_PRESETS = [
    # Small models for real CPU runs: byte-level vocabulary (256), trained from scratch here.
    _llama("tiny", 8, 128, 8, 4, 384, 256, 256, 10000.0),
    _gpt("tiny-gpt", 4, 128, 8, vocab=256, seq=256, dropout=0.0),
    # GPT-2 (Radford et al. 2019, Table 2; HF configs gpt2, gpt2-medium, -large, -xl).
    _gpt("gpt2-124m", 12, 768, 12),
    _gpt("gpt2-355m", 24, 1024, 16),
    _gpt("gpt2-774m", 36, 1280, 20),
    _gpt("gpt2-1.5b", 48, 1600, 25),
    # GPT-3 family (Brown et al. 2020, Table 2.1; context 2048).  GPT-3 XL is printed with 24
    # heads of 128 dims, which does not multiply to 2048: 16 heads of 128 is used.  13B is printed
    # with d_model 5140, not divisible by its 40 heads: 5120 is used (as in later reproductions).
    _gpt("gpt3-125m", 12, 768, 12, seq=2048),
    _gpt("gpt3-350m", 24, 1024, 16, seq=2048),
    _gpt("gpt3-760m", 24, 1536, 16, seq=2048),
    _gpt("gpt3-1.3b", 24, 2048, 16, seq=2048),
    _gpt("gpt3-2.7b", 32, 2560, 32, seq=2048),
    _gpt("gpt3-6.7b", 32, 4096, 32, seq=2048),
    _gpt("gpt3-13b", 40, 5120, 40, seq=2048),
    _gpt("gpt3-175b", 96, 12288, 96, seq=2048),
    # Llama 2 (Touvron et al. 2023, Table 1; HF configs meta-llama/Llama-2-*-hf).
    _llama("llama2-7b", 32, 4096, 32, 32, 11008, 32000, 4096, 10000.0),
    _llama("llama2-13b", 40, 5120, 40, 40, 13824, 32000, 4096, 10000.0),
    _llama("llama2-70b", 80, 8192, 64, 8, 28672, 32000, 4096, 10000.0),
    # Llama 3 (Dubey et al. 2024, Table 3; HF configs meta-llama/Meta-Llama-3*).
    _llama("llama3-8b", 32, 4096, 32, 8, 14336, 128256, 8192, 500000.0),
    _llama("llama3-70b", 80, 8192, 64, 8, 28672, 128256, 8192, 500000.0),
    _llama("llama3-405b", 126, 16384, 128, 8, 53248, 128256, 8192, 500000.0),
    # BERT (Devlin et al. 2019, Sec. 3; HF bert-base-uncased / bert-large-uncased).
    _bert("bert-base", 12, 768, 12),
    _bert("bert-large", 24, 1024, 16),
    *_MOE_PRESETS,
]

MODEL_PRESETS = {spec.name: spec for spec in _PRESETS}


def load_model(source: str) -> ModelSpec:
    """A preset name, a path to our own spec JSON, or a path to a Hugging Face config.json."""
    if not isinstance(source, str) or not source:
        raise ValueError(f"model must be a preset name or a path, got {short_repr(source)}")
    if source in MODEL_PRESETS:
        return MODEL_PRESETS[source]
    if not source.endswith(".json") and not _exists(source):
        raise ValueError(f"unknown model {short_repr(source)}: not a preset "
                         f"({', '.join(MODEL_PRESETS)}) and not a JSON file")
    data = load_json_file(source, "model")
    if isinstance(data, dict) and "model_type" in data:
        return from_hf_config(data, source=source)
    return ModelSpec.from_dict(data)


def _exists(path: str) -> bool:
    try:
        return Path(path).exists()
    except (OSError, ValueError):  # a name too long for the file system, a NUL byte
        return False
