"""`--init-from DIR`: a Hugging Face checkpoint directory mapped onto the runtime's model.

DIR holds `config.json` and `model.safetensors`, or shards listed by
`model.safetensors.index.json` (its `weight_map`). The config must describe the plan's model
(planner/hf_config.py reads it; every ModelSpec field but the name and dropout must match), and
its activation function must be the one runtime/model.py computes.

Each runtime parameter (by canonical name, runtime/model.py) has one source tensor in the
checkpoint, possibly transposed (GPT-2's Conv1D stores (in, out)) and possibly a row block of a
fused tensor (GPT-2's c_attn is q|k|v). A rank reads only the block its parameter holds: the
DTensor's local shape and global offset under TP (column/row shards) and FSDP2 (dim-0 shards),
only its pipeline chunks' layers, through safetensors' `get_slice` (no full tensor is read).
Head tensors the checkpoint lacks (a BertModel without the masked-LM head), LoRA adapters and a
classification head keep their seeded initial values (listed as `kept`); a missing body tensor
is an error naming it."""

import json
from dataclasses import dataclass
from pathlib import Path

from planner.spec import ModelSpec

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"
# The activation runtime/model.py computes for each arch, and the config values that name it
# (transformers' ACT2FN: gelu_new and gelu_pytorch_tanh are both the tanh approximation).
ACTIVATIONS = {"gpt": ("activation_function", "gelu_new", ("gelu_new", "gelu_pytorch_tanh")),
               "bert": ("hidden_act", "gelu", ("gelu",)),  # MLP set to erf GELU on load
               "llama": ("hidden_act", "silu", ("silu", "swish"))}
# the runtime's classifier (runtime/model.py Head) reads the normed hidden state, not
# transformers' pooler (dense + tanh of [CLS]): a *ForSequenceClassification head is not it
NEW_HEADS = ("head.classifier.",)
IGNORED_FIELDS = ("name", "dropout")  # not a property of the weights
BASE_PREFIX = {"gpt2": "transformer.", "bert": "bert.", "llama": "model.", "mistral": "model."}


def _bad(path, what: str) -> ValueError:
    return ValueError(f"--init-from {path}: {what}")


def read_config(path) -> dict:
    cfg_path = Path(path) / "config.json"
    if not Path(path).is_dir():
        raise _bad(path, "not a directory")
    if not cfg_path.is_file():
        raise _bad(path, "no config.json")
    try:
        cfg = json.loads(cfg_path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise _bad(path, f"config.json is not readable JSON ({exc})") from None
    if not isinstance(cfg, dict):
        raise _bad(path, "config.json is not a JSON object")
    return cfg


def check_config(path, spec: ModelSpec) -> dict:
    """The checkpoint's config.json, if it describes `spec` (else a one-line ValueError naming
    the first field that differs)."""
    from planner.spec import from_hf_config
    cfg = read_config(path)
    try:
        theirs = from_hf_config(cfg, name=spec.name)
    except ValueError as exc:
        raise _bad(path, str(exc)) from None
    mine, other = spec.to_dict(), theirs.to_dict()
    for key, value in mine.items():
        if key not in IGNORED_FIELDS and other.get(key) != value:
            raise _bad(path, f"config.json has {key} {other.get(key)!r} but the plan's model "
                             f"{spec.name!r} has {key} {value!r}")
    key, default, allowed = ACTIVATIONS[spec.arch]
    act = cfg.get(key, default)
    if act not in allowed:
        raise _bad(path, f"config.json {key} {act!r}: the runtime computes {allowed[0]!r} "
                         f"for arch {spec.arch!r}")
    return cfg


@dataclass(frozen=True, kw_only=True)
class Source:
    """Where a runtime tensor lives: `key`, transposed or not, and (fused tensors) the offset
    of its block along the runtime's dim 0 within `parts` equal blocks."""
    key: str
    transpose: bool = False
    offset: int = 0
    parts: int = 1


def _gpt2(name: str, spec: ModelSpec):
    h = spec.hidden_size
    top = {"embed.wte.weight": "wte.weight", "embed.wpe.weight": "wpe.weight",
           "head.norm.weight": "ln_f.weight", "head.norm.bias": "ln_f.bias"}
    if name in top:
        return Source(key=top[name])
    if name == "head.output.weight":
        return Source(key="!lm_head.weight")
    _, i, mod, rest = name.split(".", 3)
    leaf = rest.rsplit(".", 1)[-1]
    conv = leaf == "weight"  # Conv1D: (in, out)
    if mod in ("attn_norm", "mlp_norm"):
        return Source(key=f"h.{i}.{'ln_1' if mod == 'attn_norm' else 'ln_2'}.{leaf}")
    sub = rest.split(".")[0]
    if sub in ("q", "k", "v"):
        return Source(key=f"h.{i}.attn.c_attn.{leaf}", transpose=conv,
                      offset="qkv".index(sub) * h, parts=3)
    hf = {"o": "attn.c_proj", "fc": "mlp.c_fc", "proj": "mlp.c_proj"}[sub]
    return Source(key=f"h.{i}.{hf}.{leaf}", transpose=conv)


_LLAMA_LAYER = {"attn_norm": "input_layernorm", "mlp_norm": "post_attention_layernorm",
                "attn.q": "self_attn.q_proj", "attn.k": "self_attn.k_proj",
                "attn.v": "self_attn.v_proj", "attn.o": "self_attn.o_proj",
                "mlp.gate": "mlp.gate_proj", "mlp.up": "mlp.up_proj",
                "mlp.down": "mlp.down_proj"}


def _llama(name: str, spec: ModelSpec):
    top = {"embed.wte.weight": "embed_tokens.weight", "head.norm.weight": "norm.weight",
           "head.output.weight": "!lm_head.weight"}
    if name in top:
        return Source(key=top[name])
    _, i, rest = name.split(".", 2)
    mod, leaf = rest.rsplit(".", 1)
    return Source(key=f"layers.{i}.{_LLAMA_LAYER[mod]}.{leaf}")


_BERT_LAYER = {"attn.q": "attention.self.query", "attn.k": "attention.self.key",
               "attn.v": "attention.self.value", "attn.o": "attention.output.dense",
               "attn_norm": "attention.output.LayerNorm", "mlp.fc": "intermediate.dense",
               "mlp.proj": "output.dense", "mlp_norm": "output.LayerNorm"}
_BERT_TOP = {"embed.wte.weight": "embeddings.word_embeddings.weight",
             "embed.wpe.weight": "embeddings.position_embeddings.weight",
             "embed.wtt.weight": "embeddings.token_type_embeddings.weight",
             "embed.norm.weight": "embeddings.LayerNorm.weight",
             "embed.norm.bias": "embeddings.LayerNorm.bias",
             # the masked-LM head sits outside the base model ("!": no base prefix)
             "head.dense.weight": "!cls.predictions.transform.dense.weight",
             "head.dense.bias": "!cls.predictions.transform.dense.bias",
             "head.norm.weight": "!cls.predictions.transform.LayerNorm.weight",
             "head.norm.bias": "!cls.predictions.transform.LayerNorm.bias",
             "head.output.bias": "!cls.predictions.bias",
             "head.output.weight": "!cls.predictions.decoder.weight"}


def _bert(name: str, spec: ModelSpec):
    if name in _BERT_TOP:
        return Source(key=_BERT_TOP[name])
    _, i, rest = name.split(".", 2)
    mod, leaf = rest.rsplit(".", 1)
    return Source(key=f"encoder.layer.{i}.{_BERT_LAYER[mod]}.{leaf}")


MAPPERS = {"gpt2": _gpt2, "bert": _bert, "llama": _llama, "mistral": _llama}


class Checkpoint:
    """The safetensors files of one directory, opened lazily; `read` returns one block."""

    def __init__(self, path, spec: ModelSpec):
        self.path, self.spec = Path(path), spec
        self.model_type = check_config(path, spec)["model_type"]
        # BERT's GELU is exact (erf) in transformers; the runtime's default is GPT-2's tanh
        self.gelu_approximate = "none" if spec.arch == "bert" else "tanh"
        if self.model_type not in MAPPERS:
            raise _bad(path, f"model_type {self.model_type!r} has no weight mapping "
                             f"(known: {sorted(MAPPERS)})")
        self.files = self._weight_map()
        self._open: dict = {}

    def _weight_map(self) -> dict:
        index = self.path / INDEX
        if index.is_file():
            try:
                wmap = json.loads(index.read_text())["weight_map"]
            except (OSError, ValueError, KeyError, TypeError) as exc:
                raise _bad(self.path, f"{INDEX} has no readable weight_map ({exc})") from None
            for name in sorted(set(wmap.values())):
                if not (self.path / name).is_file():
                    raise _bad(self.path, f"{INDEX} names {name!r}, which is missing")
            return dict(wmap)
        if not (self.path / SINGLE).is_file():
            raise _bad(self.path, f"neither {SINGLE} nor {INDEX}")
        from safetensors import safe_open
        with safe_open(self.path / SINGLE, framework="pt") as f:
            return dict.fromkeys(f.keys(), SINGLE)

    def key_for(self, source_key: str):
        """The checkpoint key of a mapped key (with or without the base model's prefix)."""
        if source_key.startswith("!"):
            key = source_key[1:]
            return key if key in self.files else None
        for key in (BASE_PREFIX[self.model_type] + source_key, source_key):
            if key in self.files:
                return key
        return None

    def source(self, name: str):
        """(Source, checkpoint key or None) of runtime parameter `name` (canonical); (None,
        None) for tensors a Hugging Face checkpoint has no counterpart of: LoRA adapters and
        the classification head (new tensors, trained from their initial values)."""
        if name.rsplit(".", 1)[-1].startswith("lora_") or name.startswith(NEW_HEADS):
            return None, None
        src = MAPPERS[self.model_type](name, self.spec)
        return src, self.key_for(src.key)

    def _slice(self, key):
        fname = self.files[key]
        if fname not in self._open:
            from safetensors import safe_open
            self._open[fname] = safe_open(self.path / fname, framework="pt")
        return self._open[fname].get_slice(key)

    def read(self, name: str, key: str, src: Source, global_shape, offsets, sizes):
        """The block [offsets, offsets + sizes) of runtime tensor `name` (global_shape)."""
        piece = self._slice(key)
        want = list(global_shape)
        want[0] *= src.parts
        if src.transpose:
            want = want[::-1]
        if list(piece.get_shape()) != want:
            raise _bad(self.path, f"{key} has shape {list(piece.get_shape())}, expected {want} "
                                  f"for {name}")
        ranges = [slice(o, o + s) for o, s in zip(offsets, sizes)]
        ranges[0] = slice(ranges[0].start + src.offset, ranges[0].stop + src.offset)
        if src.transpose:
            return piece[ranges[1], ranges[0]].T
        return piece[tuple(ranges)]


def _local_block(param):
    """(tensor to fill, global shape, offsets, sizes) of a parameter or DTensor shard."""
    from torch.distributed.tensor import DTensor
    if not isinstance(param, DTensor):
        return param.data, tuple(param.shape), (0,) * param.ndim, tuple(param.shape)
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset
    sizes, offsets = compute_local_shape_and_global_offset(param.shape, param.device_mesh,
                                                           param.placements)
    local = param.to_local()
    if tuple(local.shape) != tuple(sizes):
        raise ValueError(f"shard of shape {tuple(local.shape)} is not the block "
                         f"{tuple(sizes)} its placements {param.placements} describe")
    return local, tuple(param.shape), tuple(offsets), tuple(sizes)


def load_into(model, ckpt: Checkpoint) -> dict:
    """Fill a materialised (possibly parallelised) model chunk from the checkpoint.
    Returns {"loaded": [names], "kept": [head names the checkpoint lacks]}."""
    import torch

    from runtime.model import canonical_name
    loaded, kept = [], []
    for block in model.layers.values():
        block.mlp.gelu_approximate = ckpt.gelu_approximate
    with torch.no_grad():
        for fqn, param in model.named_parameters():
            name = canonical_name(model.spec, fqn)
            src, key = ckpt.source(name)
            if key is None:
                if src is None or name.startswith("head."):
                    kept.append(name)
                    continue
                raise _bad(ckpt.path, f"no tensor {src.key.lstrip('!')!r} for {name}")
            local, shape, offsets, sizes = _local_block(param)
            block = ckpt.read(name, key, src, shape, offsets, sizes)
            local.copy_(block.to(local.dtype))
            loaded.append(name)
    return {"loaded": loaded, "kept": kept}
