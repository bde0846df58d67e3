"""ModelSpec: the shape of a transformer, with strict JSON round trip (Hugging Face config.json
import: planner/hf_config.py, re-exported here as `from_hf_config`).

Three families:
  gpt   - decoder-only, LayerNorm, GELU MLP, learned positions (GPT-2/GPT-3, Radford et al. 2019)
  llama - decoder-only, RMSNorm, SwiGLU MLP, RoPE, grouped-query attention (Touvron et al. 2023)
  bert  - bidirectional encoder with token-type embeddings and a masked-LM head (Devlin et al. 2019)
"""

import dataclasses
from dataclasses import dataclass

from planner import limits
from planner.limits import check_int, check_range
from planner.moe_spec import MLASpec, MoESpec
from planner.schema import check_keys, require_bool, require_choice, require_str

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
    attention_head_dim: int = 0        # 0 = hidden_size / num_heads (Qwen3, GPT-OSS set it)
    moe: MoESpec | None = None         # None = a dense FFN in every layer (planner/moe_spec.py)
    mla: MLASpec | None = None         # None = standard multi-/grouped-query attention
    qkv_bias: bool = False             # biases on q/k/v only (Qwen2, Qwen2-MoE); see linear_bias
    qk_norm: bool = False              # per-head RMSNorm of q and k (Qwen3; Dehghani et al. 2023)
    attention_sinks: bool = False      # one learned softmax-sink logit per head (GPT-OSS)

    def __post_init__(self):
        require_str(self.name, "model name", MAX_NAME_LEN)
        require_choice(self.arch, "model arch", ARCHES)
        for key, hi in SHAPE_LIMITS.items():
            check_int(getattr(self, key), key, 1, hi)
        require_bool(self.tie_embeddings, "tie_embeddings")
        require_bool(self.linear_bias, "linear_bias")
        require_bool(self.qkv_bias, "qkv_bias")
        if self.qkv_bias and self.linear_bias:
            raise ValueError("qkv_bias (biases on q/k/v only) and linear_bias (on every linear) "
                             "exclude each other")
        require_bool(self.qk_norm, "qk_norm")
        require_bool(self.attention_sinks, "attention_sinks")
        check_range(self.dropout, "dropout", 0.0, 1.0)
        if self.dropout == 1:
            raise ValueError(f"dropout must be < 1, got {self.dropout}")
        check_range(self.norm_eps, "norm_eps", 0.0, 1.0, lo_open=True)
        check_range(self.rope_theta, "rope_theta", 0.0, limits.MAX_ROPE_THETA, lo_open=True)
        check_int(self.attention_head_dim, "attention_head_dim", 0, limits.MAX_HIDDEN_SIZE)
        for key, cls in (("moe", MoESpec), ("mla", MLASpec)):
            if getattr(self, key) is not None and not isinstance(getattr(self, key), cls):
                raise ValueError(f"{key} must be a {cls.__name__} or None, got "
                                 f"{type(getattr(self, key)).__name__}")
        if self.hidden_size % self.num_heads:
            raise ValueError(f"hidden_size {self.hidden_size} is not divisible by "
                             f"num_heads {self.num_heads}")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_heads {self.num_heads} is not divisible by "
                             f"num_kv_heads {self.num_kv_heads}")
        mla_off = ("linear_bias", "qkv_bias", "qk_norm", "attention_sinks", "attention_head_dim")
        on = [k for k in mla_off if getattr(self, k)]
        if self.mla is not None and on:
            raise ValueError(f"mla (multi-head latent attention) sets its own head dims and has "
                             f"no biases, q/k norms or sinks: {', '.join(on)} must be off")
        if self.arch != "llama" and self.num_kv_heads != self.num_heads:
            raise ValueError(f"grouped-query attention (num_kv_heads {self.num_kv_heads} != "
                             f"num_heads {self.num_heads}) is only supported for arch 'llama'")

    # Derived shape facts, used by the cost model and the runtime alike.
    @property
    def head_dim(self) -> int:
        return self.attention_head_dim or self.hidden_size // self.num_heads

    @property
    def q_hidden_size(self) -> int:
        """Width of the attention's query (and output-projection input): heads x head_dim."""
        return self.head_dim * self.num_heads

    @property
    def is_moe(self) -> bool:
        return self.moe is not None

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
    def from_dict(cls, data: dict, strict: bool = False) -> "ModelSpec":
        """Every key is required (dropout, norm_eps and rope_theta too: a dropped key must not
        silently become a default), except OPTIONAL_KEYS in a spec file (not `strict`, as in a
        plan of schema 4): absent means a dense model with standard
        attention, as every spec written before they existed describes."""
        fields = dict(check_keys(data, cls, "model spec", () if strict else OPTIONAL_KEYS))
        for key, sub in (("moe", MoESpec), ("mla", MLASpec)):
            if fields.get(key) is not None:
                fields[key] = sub.from_dict(fields[key])
        return cls(**fields)


OPTIONAL_KEYS = ("attention_head_dim", "moe", "mla", "qkv_bias", "qk_norm", "attention_sinks")


def from_hf_config(cfg: dict, name=None, source=None) -> ModelSpec:
    """Build a ModelSpec from a Hugging Face config.json dict, exactly or not at all (a one-line
    ValueError naming what ModelSpec cannot represent): planner/hf_config.py."""
    from planner.hf_config import from_hf_config as read  # it imports ModelSpec from here
    return read(cfg, name=name, source=source)
