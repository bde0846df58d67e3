"""Hugging Face `config.json` -> ModelSpec, exactly or not at all.

Every key of a config is either read into the spec, checked against what ModelSpec can
represent, known to leave the network unchanged (token ids, generation settings, dtype, ...), or
unknown.  Anything that would change the model and that ModelSpec cannot express (a head_dim
other than hidden_size / num_attention_heads, biases on the attention projections only, q/k
norms, extra norms per layer, sliding-window attention, scaled or partial RoPE, logit
soft-capping, an unknown key that looks like a shape key) is refused with one line naming the
key(s) and value(s); nothing is dropped silently.

A key a config omits takes transformers' own default for its model_type (its
`configuration_<family>.py`, transformers 5.x), so a config written with its non-default keys
only means what transformers makes of it.  RoPE is read from both config generations: the
top-level `rope_theta` / `rope_scaling` of transformers 4.x and the `rope_parameters` object of
5.x (`{"rope_type": "default", "rope_theta": 500000.0}`), with transformers' precedence.

Families (model_type): gpt2 and bert, and the Llama-shaped decoders (RMSNorm, gated MLP, RoPE,
grouped-query attention) llama, mistral, qwen2, qwen3, phi3 (fused qkv / gate_up projections:
the same tensors, so the same parameter count), gemma, gemma2, gemma3_text and gemma3.  What
ModelSpec does not describe and does not change the parameter count or the cost model is
accepted: the MLP's activation function (Gemma's gated GELU is computed as SwiGLU by the
runtime), Gemma's sqrt(hidden_size) embedding scale and (1 + weight) RMSNorm."""

import os
from dataclasses import dataclass
from pathlib import PurePath

from planner.schema import short_repr
from planner.spec import BERT_TYPE_VOCAB, MAX_NAME_LEN, ModelSpec

PREFIX = "Hugging Face config"
_REQUIRED = object()

# Keys every transformers config may carry that leave the network unchanged: bookkeeping, token
# ids, dtype, generation and label settings.  (Base keys that do change it are checked below:
# pruned_heads, add_cross_attention, cross_attention_hidden_size.)
BASE_KEYS = frozenset({
    "_name_or_path", "architectures", "auto_map", "model_type", "transformers_version",
    "torch_dtype", "dtype", "use_bfloat16", "_attn_implementation",
    "_attn_implementation_autoset", "attn_implementation", "_commit_hash", "use_cache",
    "return_dict", "use_return_dict", "output_hidden_states", "output_attentions",
    "torchscript", "tf_legacy_loss", "xla_device", "initializer_range", "gradient_checkpointing",
    "tokenizer_class", "prefix", "bos_token_id", "eos_token_id", "pad_token_id", "sep_token_id",
    "decoder_start_token_id", "unk_token_id", "task_specific_params", "finetuning_task",
    "id2label", "label2id", "num_labels", "problem_type", "is_encoder_decoder", "is_decoder",
    "tie_encoder_decoder", "chunk_size_feed_forward", "max_length", "min_length", "do_sample",
    "early_stopping", "num_beams", "num_beam_groups", "diversity_penalty", "temperature",
    "top_k", "top_p", "typical_p", "repetition_penalty", "length_penalty",
    "no_repeat_ngram_size", "encoder_no_repeat_ngram_size", "bad_words_ids",
    "num_return_sequences", "output_scores", "return_dict_in_generate", "forced_bos_token_id",
    "forced_eos_token_id", "remove_invalid_values", "exponential_decay_length_penalty",
    "suppress_tokens", "begin_suppress_tokens", "cache_implementation", "quantization_config",
})
# An unknown key whose name contains one of these may change the model's shape or arithmetic:
# it is refused by name.  Other unknown keys are taken as cosmetic and ignored.
SHAPE_FRAGMENTS = ("head", "expert", "layer", "hidden", "intermediate", "vocab", "window",
                   "dim", "embed", "position", "rope", "rotary", "bias", "norm", "attention",
                   "attn", "mlp", "ffn", "proj", "kv", "moe", "lora", "rank", "softcap", "tie",
                   "shared", "group", "sparse", "scal", "multiplier")
HEAD_DIM_NOTE = ("ModelSpec derives head_dim = hidden_size / num_heads; an explicit head_dim "
                 "needs cost-model and runtime support that is not there yet")


def _show(value) -> str:
    return short_repr(value, 40)


def _fmt(value) -> str:
    """A number as the config writes it (500000.0 -> 500000), anything else by its repr."""
    if isinstance(value, float) and value.is_integer() and abs(value) < 1e16:
        return str(int(value))
    return _show(value)


class _Config:
    """A config dict that records which keys were read and collects what cannot be represented.

    `value(key, default)`: transformers' value of `key` (absent: `default`; JSON null stays
    None, because for some keys null means 'none' where absent means the class default)."""

    def __init__(self, cfg: dict, model_type: str):
        self.read: set[str] = set()
        self.problems: list[str] = []
        self.cfg, self.model_type = cfg, model_type

    def value(self, key: str, default=None):
        self.read.add(key)
        if key not in self.cfg:
            if default is _REQUIRED:
                raise ValueError(f"{PREFIX}: missing key {key!r}")
            return default
        return self.cfg[key]

    def integer(self, key: str, default=_REQUIRED):
        value = self.value(key, default)
        if value is None and default is _REQUIRED:
            raise ValueError(f"{PREFIX}: missing key {key!r}")
        if value is not None and (isinstance(value, bool) or not isinstance(value, int)):
            raise ValueError(f"{PREFIX}: {key} must be an integer, got {_show(value)}")
        return value

    def number(self, key: str, default) -> float:
        value = self.value(key, default)
        if value is None:
            value = default
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError(f"{PREFIX}: {key} must be a number, got {_show(value)}")
        return float(value)

    def flag(self, key: str, default: bool) -> bool:
        value = self.value(key, default)
        if value is None:
            return default
        if not isinstance(value, bool):
            raise ValueError(f"{PREFIX}: {key} must be true or false, got {_show(value)}")
        return value

    def ignore(self, *keys: str) -> None:
        self.read.update(keys)

    def refuse(self, text: str) -> None:
        self.problems.append(text)

    def unknown_shape_keys(self) -> list:
        """Keys nobody read, not base keys, named like a shape key and set (not null/false)."""
        return sorted(k for k, v in self.cfg.items()
                      if k not in self.read and k not in BASE_KEYS
                      and v is not None and v is not False
                      and any(f in str(k).lower() for f in SHAPE_FRAGMENTS))


# --- the Llama-shaped decoders ----------------------------------------------------------------

@dataclass(frozen=True)
class _Decoder:
    """What transformers' class for one model_type reads, and its defaults for absent keys."""
    kv_heads: object = None        # absent num_key_value_heads (None: num_attention_heads)
    head_dim: object = None        # absent head_dim (None: hidden_size / num_attention_heads)
    tie: bool = False              # absent tie_word_embeddings
    eps: float = 1e-6              # absent rms_norm_eps
    bias: str = "none"             # "llama": attention_bias + mlp_bias; "attention":
    #                                attention_bias (q/k/v/o, never the MLP); "qkv": q/k/v always
    dropout_keys: tuple = ("attention_dropout",)
    window: object = None          # absent sliding_window; "absent" = the class reads none
    qwen_window: bool = False      # sliding_window applies only with use_sliding_window
    gemma: int = 0                 # Gemma generation (1, 2, 3): GELU gate, softcapping, ...
    structure: str = ""            # tensors ModelSpec has no place for (q/k norms, extra norms)
    ignored: tuple = ()            # keys the class reads that leave ModelSpec's model unchanged


_NO_WINDOW = "absent"
_LLAMA_IGNORED = ("hidden_act", "pretraining_tp")
_GEMMA2_NORMS = ("pre_feedforward_layernorm and post_feedforward_layernorm (4 RMSNorms per "
                 "layer, ModelSpec has 2)")
DECODERS = {
    "llama": _Decoder(bias="llama", window=_NO_WINDOW, ignored=_LLAMA_IGNORED),
    "mistral": _Decoder(kv_heads=8, window=4096, ignored=("hidden_act",)),
    "qwen2": _Decoder(kv_heads=32, bias="qkv", window=4096, qwen_window=True,
                      ignored=("hidden_act",)),
    "qwen3": _Decoder(kv_heads=32, head_dim=128, bias="attention", window=4096,
                      qwen_window=True, ignored=("hidden_act",),
                      structure="Qwen3Attention's per-head q_norm and k_norm RMSNorm weights"),
    "phi3": _Decoder(eps=1e-5, window=None,
                     dropout_keys=("attention_dropout", "resid_pdrop", "embd_pdrop"),
                     ignored=("hidden_act", "original_max_position_embeddings")),
    "gemma": _Decoder(kv_heads=16, head_dim=256, tie=True, bias="attention", window=_NO_WINDOW,
                      gemma=1, ignored=("hidden_act", "hidden_activation")),
    "gemma2": _Decoder(kv_heads=4, head_dim=256, tie=True, bias="attention", window=4096,
                       gemma=2, ignored=("hidden_act", "hidden_activation"),
                       structure=_GEMMA2_NORMS),
    "gemma3_text": _Decoder(kv_heads=4, head_dim=256, tie=True, bias="attention", window=4096,
                            gemma=3, ignored=("hidden_act", "hidden_activation"),
                            structure="per-head q_norm and k_norm RMSNorm weights, "
                                      + _GEMMA2_NORMS),
}


def _head_dim(c: _Config, fam: _Decoder, hidden: int, heads: int) -> None:
    head_dim = c.integer("head_dim", fam.head_dim)
    if head_dim is None:  # transformers: hidden_size // num_attention_heads
        return
    if head_dim * heads != hidden:
        derived = f"{hidden / heads:g}" if hidden % heads else str(hidden // heads)
        c.refuse(f"head_dim {head_dim} != hidden_size / num_attention_heads = "
                 f"{hidden} / {heads} = {derived} ({HEAD_DIM_NOTE})")


def _linear_bias(c: _Config, fam: _Decoder) -> bool:
    """ModelSpec.linear_bias puts a bias on every linear of the block (q, k, v, o and the MLP)
    or on none; any other combination is refused with its keys."""
    if fam.bias == "llama":
        attn, mlp = c.flag("attention_bias", False), c.flag("mlp_bias", False)
        if attn != mlp:
            c.refuse(f"attention_bias {str(attn).lower()} with mlp_bias {str(mlp).lower()}: "
                     f"ModelSpec.linear_bias gives every linear (attention and MLP) a bias, "
                     f"or none")
        return attn and mlp
    if fam.bias == "attention":
        if c.flag("attention_bias", False):
            c.refuse(f"attention_bias true: {c.model_type} has no MLP bias (no mlp_bias key); "
                     f"ModelSpec.linear_bias gives every linear a bias, or none")
        return False
    if fam.bias == "qkv":
        c.refuse("Qwen2Attention's q/k/v projections always have biases, o_proj and the MLP "
                 "none (attention-only bias); ModelSpec.linear_bias gives every linear a bias, "
                 "or none")
    return False


def _rope_theta(c: _Config) -> float:
    """rope_theta from `rope_parameters` (transformers 5.x) or the top-level `rope_theta` and
    `rope_scaling` (4.x), with transformers' precedence: a non-empty rope_scaling, else
    rope_parameters; a theta inside it, else the top-level one, else 10000.  Only plain RoPE
    ("default") is represented; the two thetas must agree when both are given."""
    scaling, params = c.value("rope_scaling"), c.value("rope_parameters")
    source, rope = ("rope_scaling", scaling) if scaling else ("rope_parameters", params)
    rope = rope or {}
    if not isinstance(rope, dict):
        raise ValueError(f"{PREFIX}: {source} must be an object or null, got {_show(rope)}")
    # 5.x may nest one object per attention type (Gemma 3: full_attention, sliding_attention)
    nested = rope and all(isinstance(v, dict) or v is None for v in rope.values()) \
        and set(rope) <= {"full_attention", "sliding_attention"}
    parts = ([(f"{source}.{k}", v or {}) for k, v in sorted(rope.items())] if nested
             else [(source, rope)])
    top = c.value("rope_theta")
    if top is not None and (isinstance(top, bool) or not isinstance(top, (int, float))):
        raise ValueError(f"{PREFIX}: rope_theta must be a number, got {_show(top)}")
    thetas = {}
    for path, part in parts:
        kind = part.get("rope_type", part.get("type", "default"))
        if kind != "default":
            c.refuse(f"{path}.rope_type {_show(kind)}: scaled RoPE changes the model and "
                     f"ModelSpec has only rope_theta (with rope_type 'default' it is planned "
                     f"with plain RoPE: same parameters and cost)")
        theta = part.get("rope_theta")
        if theta is None:
            continue
        if isinstance(theta, bool) or not isinstance(theta, (int, float)):
            raise ValueError(f"{PREFIX}: {path}.rope_theta must be a number, got {_show(theta)}")
        if top is not None and theta != top:
            c.refuse(f"rope_theta {_fmt(top)} and {path}.rope_theta {_fmt(theta)} disagree")
        thetas[path] = theta
    if len(set(thetas.values())) > 1:
        c.refuse(" and ".join(f"{p}.rope_theta {_fmt(t)}" for p, t in thetas.items())
                 + " differ: ModelSpec has one rope_theta")
    partial = [(p, part.get("partial_rotary_factor")) for p, part in parts]
    partial.append(("partial_rotary_factor", c.value("partial_rotary_factor")))
    for path, factor in partial:
        if factor is not None and factor != 1:
            key = path if path == "partial_rotary_factor" else f"{path}.partial_rotary_factor"
            c.refuse(f"{key} {_fmt(factor)}: RoPE on part of each head is not represented")
    theta = next(iter(thetas.values()), top if top is not None else 10000.0)
    return float(theta)


def _windows(c: _Config, fam: _Decoder, layers: int, max_pos: int) -> None:
    """Sliding-window attention is not represented (ModelSpec attends over the whole
    sequence); a window of at least max_position_embeddings changes nothing."""
    layer_types = c.value("layer_types")
    if layer_types is not None:
        if not isinstance(layer_types, list):
            raise ValueError(f"{PREFIX}: layer_types must be a list, got {_show(layer_types)}")
        other = [t for t in layer_types if t != "full_attention"]
        if other:
            c.refuse(f"layer_types: {len(other)} of {len(layer_types)} layers are "
                     f"{_show(other[0])}, not 'full_attention'")
    if fam.window == _NO_WINDOW:
        return
    window = c.integer("sliding_window", fam.window)
    if fam.qwen_window:
        use = c.flag("use_sliding_window", False)
        first = c.integer("max_window_layers", 28)
        if not use or window is None or first >= layers:
            return
        where = f"use_sliding_window true: layers {first} and up attend through a"
    elif fam.gemma:
        c.ignore("sliding_window_pattern")
        if layer_types is not None and all(t == "full_attention" for t in layer_types):
            return
        where = "its sliding_attention layers attend through a"
    else:
        where = "every layer attends through a"
    if window is not None and window < max_pos:
        c.refuse(f"sliding_window {window} < max_position_embeddings {max_pos}: {where} "
                 f"{window}-token sliding window, which ModelSpec does not represent")


def _gemma_checks(c: _Config, fam: _Decoder, head_dim, theta: float) -> None:
    for key, default in (("attn_logit_softcapping", 50.0 if fam.gemma == 2 else None),
                         ("final_logit_softcapping", 30.0 if fam.gemma == 2 else None)):
        value = c.value(key, default)
        if value is not None:
            c.refuse(f"{key} {_fmt(value)}: logit soft-capping is not represented")
    if c.flag("use_bidirectional_attention", False):
        c.refuse("use_bidirectional_attention true: ModelSpec's decoders are causal")
    if fam.gemma >= 2:
        scalar = c.value("query_pre_attn_scalar", 256)
        if scalar != head_dim:
            c.refuse(f"query_pre_attn_scalar {_fmt(scalar)} != head_dim {head_dim}: "
                     f"ModelSpec scales attention by 1/sqrt(head_dim)")
    if fam.gemma == 3:
        local = c.value("rope_local_base_freq", 10000.0)  # 4.x: the sliding layers' theta
        if local is not None and local != theta and "rope_parameters" not in c.cfg:
            c.refuse(f"rope_local_base_freq {_fmt(local)} != rope_theta {_fmt(theta)}: "
                     f"ModelSpec has one rope_theta")


def _dropout(c: _Config, keys: tuple, default: float) -> float:
    values = {k: c.number(k, default) for k in keys}
    if len(set(values.values())) > 1:
        c.refuse(", ".join(f"{k} {_fmt(v)}" for k, v in values.items())
                 + " differ: ModelSpec has one dropout")
    return max(values.values())


def _from_decoder(c: _Config, name: str) -> ModelSpec:
    fam = DECODERS[c.model_type]
    layers = c.integer("num_hidden_layers")
    hidden = c.integer("hidden_size")
    heads = c.integer("num_attention_heads")
    kv_heads = c.integer("num_key_value_heads", fam.kv_heads)
    kv_heads = heads if kv_heads is None else kv_heads  # transformers: null = no grouping
    max_pos = c.integer("max_position_embeddings")
    if heads < 1 or hidden < 1:
        raise ValueError(f"{PREFIX}: hidden_size {hidden} and num_attention_heads {heads} "
                         f"must be >= 1")
    _head_dim(c, fam, hidden, heads)
    bias = _linear_bias(c, fam)
    theta = _rope_theta(c)
    _windows(c, fam, layers, max_pos)
    if fam.gemma:
        _gemma_checks(c, fam, c.cfg.get("head_dim") or fam.head_dim, theta)
    if fam.structure:
        c.refuse(f"{fam.structure}: not represented by ModelSpec")
    c.ignore(*fam.ignored)
    dropout = _dropout(c, fam.dropout_keys, 0.0)
    return _finish(
        c, name,
        arch="llama", num_layers=layers, hidden_size=hidden, num_heads=heads,
        num_kv_heads=kv_heads, ffn_hidden_size=c.integer("intermediate_size"),
        vocab_size=c.integer("vocab_size"), max_seq_len=max_pos,
        tie_embeddings=c.flag("tie_word_embeddings", fam.tie), linear_bias=bias,
        dropout=dropout, norm_eps=c.number("rms_norm_eps", fam.eps), rope_theta=theta)


# --- GPT-2 and BERT ---------------------------------------------------------------------------

def _from_gpt2(c: _Config, name: str) -> ModelSpec:
    hidden = c.integer("n_embd")
    heads = c.integer("n_head")
    if not c.flag("scale_attn_weights", True):
        c.refuse("scale_attn_weights false: ModelSpec scales attention by 1/sqrt(head_dim)")
    if c.flag("scale_attn_by_inverse_layer_idx", False):
        c.refuse("scale_attn_by_inverse_layer_idx true: per-layer attention scaling is not "
                 "represented")
    c.ignore("n_ctx", "activation_function", "reorder_and_upcast_attn", "summary_type",
             "summary_use_proj", "summary_activation", "summary_proj_to_labels",
             "summary_first_dropout")
    return _finish(
        c, name,
        arch="gpt", num_layers=c.integer("n_layer"), hidden_size=hidden, num_heads=heads,
        num_kv_heads=heads, ffn_hidden_size=_or(c.integer("n_inner", None), 4 * hidden),
        vocab_size=c.integer("vocab_size"), max_seq_len=c.integer("n_positions"),
        tie_embeddings=c.flag("tie_word_embeddings", True), linear_bias=True,
        dropout=_dropout(c, ("resid_pdrop", "embd_pdrop", "attn_pdrop"), 0.1),
        norm_eps=c.number("layer_norm_epsilon", 1e-5))


def _or(value, default):
    return default if value is None else value


def _from_bert(c: _Config, name: str) -> ModelSpec:
    heads = c.integer("num_attention_heads")
    type_vocab = c.value("type_vocab_size", BERT_TYPE_VOCAB)
    if type_vocab != BERT_TYPE_VOCAB:
        raise ValueError(f"{PREFIX}: type_vocab_size {_show(type_vocab)} is not supported "
                         f"(only {BERT_TYPE_VOCAB})")
    positions = c.value("position_embedding_type", "absolute")
    if positions not in (None, "absolute"):
        c.refuse(f"position_embedding_type {_show(positions)}: only 'absolute' (learned "
                 f"positions) is represented")
    c.ignore("hidden_act", "classifier_dropout")
    return _finish(
        c, name,
        arch="bert", num_layers=c.integer("num_hidden_layers"),
        hidden_size=c.integer("hidden_size"), num_heads=heads, num_kv_heads=heads,
        ffn_hidden_size=c.integer("intermediate_size"), vocab_size=c.integer("vocab_size"),
        max_seq_len=c.integer("max_position_embeddings"),
        tie_embeddings=c.flag("tie_word_embeddings", True), linear_bias=True,
        dropout=_dropout(c, ("hidden_dropout_prob", "attention_probs_dropout_prob"), 0.1),
        norm_eps=c.number("layer_norm_eps", 1e-12))


def _finish(c: _Config, name: str, **fields) -> ModelSpec:
    """Base keys that change the model, unknown shape keys, then one refusal or the spec."""
    pruned = c.value("pruned_heads")
    if pruned:
        c.refuse(f"pruned_heads {_show(pruned)}: pruned attention heads are not represented")
    if c.flag("add_cross_attention", False):
        c.refuse("add_cross_attention true: cross-attention layers are not represented")
    c.ignore("cross_attention_hidden_size")  # read by encoder-decoder models only
    unknown = c.unknown_shape_keys()
    if unknown:
        shown = ", ".join(_show(k) for k in unknown[:6])
        more = f" and {len(unknown) - 6} more" if len(unknown) > 6 else ""
        c.refuse(f"unknown key(s) {shown}{more}, named like shape keys: not understood for "
                 f"model_type {c.model_type!r}")
    if c.problems:
        raise ValueError(f"{PREFIX} (model_type {c.model_type!r}) cannot be represented "
                         f"exactly: " + "; ".join(c.problems))
    return ModelSpec(name=name, **fields)


_READERS = {"gpt2": _from_gpt2, "bert": _from_bert, **{t: _from_decoder for t in DECODERS}}
MODEL_TYPES = tuple(sorted([*_READERS, "gemma3"]))


# --- name -------------------------------------------------------------------------------------

def _valid_name(text) -> bool:
    return (isinstance(text, str) and bool(text) and len(text) <= MAX_NAME_LEN
            and text.isprintable() and text != "config")


def model_name(cfg: dict, name=None, source=None) -> str:
    """The config's `_name_or_path` (its last component: 'meta-llama/Llama-3.2-1B' ->
    'Llama-3.2-1B'), else `name` (a caller's file name), else the config file's name when it is
    not 'config.json', else its directory's name, else the model_type."""
    candidates: list = []
    hub = cfg.get("_name_or_path")
    if isinstance(hub, str):
        parts = [p for p in hub.replace("\\", "/").split("/") if p]
        candidates.append(parts[-1] if parts else "")
    candidates.append(name)
    if isinstance(source, (str, os.PathLike)):
        try:
            path = PurePath(os.path.abspath(source))
            candidates += [path.stem, path.parent.name]
        except (OSError, ValueError):
            pass
    candidates.append(cfg.get("model_type"))
    return next((n for n in candidates if _valid_name(n)), "hf-model")


# --- entry point ------------------------------------------------------------------------------

def from_hf_config(cfg: dict, name=None, source=None) -> ModelSpec:
    """Build a ModelSpec from a Hugging Face config.json dict, or raise a one-line ValueError
    naming what it cannot represent.  `name`: the model's name when the config has no
    `_name_or_path` ('config' is no name); `source`: the config file's path (for its name)."""
    if not isinstance(cfg, dict):
        raise ValueError(f"{PREFIX}: expected a JSON object")
    model_type = cfg.get("model_type")
    if not isinstance(model_type, str) or model_type not in MODEL_TYPES:
        raise ValueError(f"{PREFIX}: unsupported model_type {_show(model_type)}; "
                         f"expected one of {list(MODEL_TYPES)}")
    spec_name = model_name(cfg, name, source)
    try:
        if model_type == "gemma3":
            return _from_gemma3(cfg, spec_name)
        return _READERS[model_type](_Config(cfg, model_type), spec_name)
    except (TypeError, KeyError, AttributeError, OverflowError) as exc:
        raise ValueError(f"{PREFIX}: bad value ({short_repr(str(exc), 200)})") from None


def _from_gemma3(cfg: dict, name: str) -> ModelSpec:
    """Gemma 3 from 4B up is multimodal: a text model (text_config, a gemma3_text) plus a
    SigLIP vision tower (vision_config) that ModelSpec has no place for."""
    problems = []
    if cfg.get("vision_config") is not None or "text_config" in cfg:
        problems.append("vision_config: the vision tower and projector of the multimodal "
                        "model are not represented")
    text = cfg.get("text_config")
    if isinstance(text, dict):
        try:
            _from_decoder(_Config({**text, "model_type": "gemma3_text"}, "gemma3_text"), name)
        except ValueError as exc:
            problems.append(f"text_config: {str(exc).split(': ', 1)[-1]}")
    raise ValueError(f"{PREFIX} (model_type 'gemma3') cannot be represented exactly: "
                     + "; ".join(problems or ["multimodal model without a text_config"]))

