"""ModelSpec: the shape of a transformer, with strict JSON round trip and Hugging Face import.

Three families:
  gpt   - decoder-only, LayerNorm, GELU MLP, learned positions (GPT-2/GPT-3, Radford et al. 2019)
  llama - decoder-only, RMSNorm, SwiGLU MLP, RoPE, grouped-query attention (Touvron et al. 2023)
  bert  - bidirectional encoder with token-type embeddings and a masked-LM head (Devlin et al. 2019)
"""

import dataclasses
from dataclasses import dataclass

from planner import limits
from planner.limits import check_int, check_range
from planner.schema import check_keys, require_bool, require_choice, require_str, short_repr

ARCHES = ("gpt", "llama", "bert")
BERT_TYPE_VOCAB = 2  # segment A/B embeddings (Devlin et al. 2019, Sec. 3)
MAX_NAME_LEN = 256
# Upper bound of each integer shape field (planner/limits.py).
SHAPE_LIMITS = {"num_layers": limits.MAX_LAYERS, "hidden_size": limits.MAX_HIDDEN_SIZE,
                "num_heads": limits.MAX_HEADS, "num_kv_heads": limits.MAX_HEADS,
                "ffn_hidden_size": limits.MAX_FFN_HIDDEN_SIZE,
                "vocab_size": limits.MAX_VOCAB_SIZE, "max_seq_len": limits.MAX_SEQ_LEN}


@dataclass(frozen=True, kw_only=True)
class ModelSpec:
    name: str
    arch: str
    num_layers: int
    hidden_size: int
    num_heads: int
    num_kv_heads: int
    ffn_hidden_size: int
    vocab_size: int
    max_seq_len: int
    tie_embeddings: bool
    linear_bias: bool
    dropout: float = 0.0
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0

    def __post_init__(self):
        require_str(self.name, "model name", MAX_NAME_LEN)
        require_choice(self.arch, "model arch", ARCHES)
        for key, hi in SHAPE_LIMITS.items():
            check_int(getattr(self, key), key, 1, hi)
        require_bool(self.tie_embeddings, "tie_embeddings")
        require_bool(self.linear_bias, "linear_bias")
        check_range(self.dropout, "dropout", 0.0, 1.0)
        if self.dropout == 1:
            raise ValueError(f"dropout must be < 1, got {self.dropout}")
        check_range(self.norm_eps, "norm_eps", 0.0, 1.0, lo_open=True)
        check_range(self.rope_theta, "rope_theta", 0.0, limits.MAX_ROPE_THETA, lo_open=True)
        if self.hidden_size % self.num_heads:
            raise ValueError(f"hidden_size {self.hidden_size} is not divisible by "
                             f"num_heads {self.num_heads}")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_heads {self.num_heads} is not divisible by "
                             f"num_kv_heads {self.num_kv_heads}")
        if self.arch != "llama" and self.num_kv_heads != self.num_heads:
            raise ValueError(f"grouped-query attention (num_kv_heads {self.num_kv_heads} != "
                             f"num_heads {self.num_heads}) is only supported for arch 'llama'")

    # Derived shape facts, used by the cost model and the runtime alike.
    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def kv_hidden_size(self) -> int:
        return self.head_dim * self.num_kv_heads

    @property
    def norm(self) -> str:
        return "rmsnorm" if self.arch == "llama" else "layernorm"

    @property
    def mlp(self) -> str:
        return "swiglu" if self.arch == "llama" else "gelu"

    @property
    def learned_positions(self) -> bool:
        return self.arch != "llama"

    @property
    def causal(self) -> bool:
        return self.arch != "bert"

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "ModelSpec":
        """Every key is required (dropout, norm_eps and rope_theta too: a dropped key must not
        silently become a default)."""
        return cls(**check_keys(data, cls, "model spec"))


def _hf_get(cfg: dict, key: str, default=None):
    if key in cfg and cfg[key] is not None:
        return cfg[key]
    if default is None:
        raise ValueError(f"Hugging Face config: missing key {key!r}")
    return default


def _from_hf_gpt2(cfg: dict, name: str) -> ModelSpec:
    hidden = _hf_get(cfg, "n_embd")
    return ModelSpec(
        name=name, arch="gpt", num_layers=_hf_get(cfg, "n_layer"), hidden_size=hidden,
        num_heads=_hf_get(cfg, "n_head"), num_kv_heads=_hf_get(cfg, "n_head"),
        ffn_hidden_size=cfg.get("n_inner") or 4 * hidden,
        vocab_size=_hf_get(cfg, "vocab_size"), max_seq_len=_hf_get(cfg, "n_positions"),
        tie_embeddings=cfg.get("tie_word_embeddings", True), linear_bias=True,
        dropout=float(cfg.get("resid_pdrop", 0.1)),
        norm_eps=float(cfg.get("layer_norm_epsilon", 1e-5)))


def _from_hf_llama(cfg: dict, name: str) -> ModelSpec:
    heads = _hf_get(cfg, "num_attention_heads")
    return ModelSpec(
        name=name, arch="llama", num_layers=_hf_get(cfg, "num_hidden_layers"),
        hidden_size=_hf_get(cfg, "hidden_size"), num_heads=heads,
        num_kv_heads=cfg.get("num_key_value_heads") or heads,
        ffn_hidden_size=_hf_get(cfg, "intermediate_size"),
        vocab_size=_hf_get(cfg, "vocab_size"),
        max_seq_len=_hf_get(cfg, "max_position_embeddings"),
        tie_embeddings=cfg.get("tie_word_embeddings", False),
        linear_bias=bool(cfg.get("attention_bias", False)) and bool(cfg.get("mlp_bias", False)),
        dropout=float(cfg.get("attention_dropout", 0.0)),
        norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
        rope_theta=float(cfg.get("rope_theta", 10000.0)))


def _from_hf_bert(cfg: dict, name: str) -> ModelSpec:
    heads = _hf_get(cfg, "num_attention_heads")
    return ModelSpec(
        name=name, arch="bert", num_layers=_hf_get(cfg, "num_hidden_layers"),
        hidden_size=_hf_get(cfg, "hidden_size"), num_heads=heads, num_kv_heads=heads,
        ffn_hidden_size=_hf_get(cfg, "intermediate_size"),
        vocab_size=_hf_get(cfg, "vocab_size"),
        max_seq_len=_hf_get(cfg, "max_position_embeddings"),
        tie_embeddings=cfg.get("tie_word_embeddings", True), linear_bias=True,
        dropout=float(cfg.get("hidden_dropout_prob", 0.1)),
        norm_eps=float(cfg.get("layer_norm_eps", 1e-12)))


_HF_IMPORTERS = {"gpt2": _from_hf_gpt2, "llama": _from_hf_llama, "mistral": _from_hf_llama,
                 "bert": _from_hf_bert}


def from_hf_config(cfg: dict, name: str = "hf-model") -> ModelSpec:
    """Build a ModelSpec from a Hugging Face config.json dict (gpt2, llama, mistral, bert)."""
    if not isinstance(cfg, dict):
        raise ValueError("Hugging Face config: expected a JSON object")
    model_type = cfg.get("model_type")
    if not isinstance(model_type, str) or model_type not in _HF_IMPORTERS:
        raise ValueError(f"Hugging Face config: unsupported model_type {short_repr(model_type)}; "
                         f"expected one of {sorted(_HF_IMPORTERS)}")
    if model_type == "bert" and cfg.get("type_vocab_size", BERT_TYPE_VOCAB) != BERT_TYPE_VOCAB:
        raise ValueError(f"Hugging Face config: type_vocab_size "
                         f"{short_repr(cfg['type_vocab_size'])} is not supported "
                         f"(only {BERT_TYPE_VOCAB})")
    try:
        return _HF_IMPORTERS[model_type](cfg, name)
    except (TypeError, KeyError, AttributeError, OverflowError) as exc:
        raise ValueError(f"Hugging Face config: bad value ({short_repr(str(exc), 200)})") from None
