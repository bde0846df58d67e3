"""`--trace-activations`: the activation bytes a Hugging Face implementation saves for backward.

transformers (the optional `hf` extra) builds the model from its config.json on the meta device
(no weights, no download) in the plan's precision, with the plan's attention kernels: flash
runs transformers' "sdpa" path with the kernel's saved-tensor contract (FlashAttention keeps
q, k, v, its output and an fp32 log-sum-exp per row and head, Dao et al. 2022, Alg. 1-2; the
meta device would otherwise pick SDPA's math fallback and its s^2 tensors, which no GPU run
keeps), others transformers' "eager" attention (scores, softmax and dropout materialised). A
forward with labels (causal LM: next token; BERT:
masked LM) and a backward run under `torch.autograd.graph.saved_tensors_hooks`, which count the
bytes of every distinct storage autograd keeps that is not a parameter. One layer is the
difference of a 2-layer and a 1-layer model; the rest (embedding, final norm, head, loss) is the
1-layer model less that layer; both at micro-batches 2 and 3 (planner/cost/traced_bytes.py
explains how the memory model uses them).

Results are cached by a hash of the config, the shape, the precision and the library versions,
under $PLANNER_CACHE_DIR or the user's cache ($XDG_CACHE_HOME or ~/.cache)/parallel-planner.
This module is imported only when the flag is given (the planner imports no torch otherwise)."""

import hashlib
import json
import os
from pathlib import Path
from typing import Any

from planner.cost.traced_bytes import TRACED_MICRO_BATCHES, TracedActivations
from planner.spec import ModelSpec, from_hf_config

# transformers classes of the families the planner reads (planner/hf_config.py)
CLASSES = {"gpt2": "GPT2LMHeadModel", "bert": "BertForMaskedLM", "llama": "LlamaForCausalLM",
           "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM",
           "qwen3": "Qwen3ForCausalLM", "phi3": "Phi3ForCausalLM", "gemma": "GemmaForCausalLM",
           "gemma2": "Gemma2ForCausalLM", "gemma3_text": "Gemma3ForCausalLM"}
LAYER_KEYS = {"gpt2": "n_layer"}  # others: num_hidden_layers
DTYPES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}
CACHE_ENV = "PLANNER_CACHE_DIR"
CACHE_FORMAT = 1  # bump when what a cached entry means changes (points, counting)


def hf_config_of(spec: ModelSpec) -> dict:
    """A transformers config dict describing `spec` exactly (checked by reading it back)."""
    common = {"vocab_size": spec.vocab_size}
    if spec.arch == "gpt":
        cfg = {"model_type": "gpt2", "n_layer": spec.num_layers, "n_embd": spec.hidden_size,
               "n_head": spec.num_heads, "n_inner": spec.ffn_hidden_size,
               "n_positions": spec.max_seq_len, "layer_norm_epsilon": spec.norm_eps,
               "tie_word_embeddings": spec.tie_embeddings,
               **dict.fromkeys(("resid_pdrop", "embd_pdrop", "attn_pdrop"), spec.dropout)}
    elif spec.arch == "bert":
        cfg = {"model_type": "bert", "num_hidden_layers": spec.num_layers,
               "hidden_size": spec.hidden_size, "num_attention_heads": spec.num_heads,
               "intermediate_size": spec.ffn_hidden_size,
               "max_position_embeddings": spec.max_seq_len, "layer_norm_eps": spec.norm_eps,
               "tie_word_embeddings": spec.tie_embeddings,
               **dict.fromkeys(("hidden_dropout_prob", "attention_probs_dropout_prob"),
                               spec.dropout)}
    else:
        cfg = {"model_type": "llama", "num_hidden_layers": spec.num_layers,
               "hidden_size": spec.hidden_size, "num_attention_heads": spec.num_heads,
               "num_key_value_heads": spec.num_kv_heads,
               "intermediate_size": spec.ffn_hidden_size,
               "max_position_embeddings": spec.max_seq_len, "rms_norm_eps": spec.norm_eps,
               "rope_theta": spec.rope_theta, "tie_word_embeddings": spec.tie_embeddings,
               "attention_bias": spec.linear_bias, "mlp_bias": spec.linear_bias,
               "attention_dropout": spec.dropout}
    cfg = {**cfg, **common}
    back = from_hf_config(cfg, name=spec.name)
    if back != spec:
        raise ValueError(f"--trace-activations: model {spec.name!r} has no exact Hugging Face "
                         f"config (attention_head_dim, MoE or MLA are not written)")
    return cfg


def _transformers():
    try:
        import transformers
    except ImportError:
        raise ValueError("--trace-activations needs the transformers package (pip install "
                         "'parallel-planner[hf]')") from None
    return transformers


def model_class(cfg: dict):
    kind = cfg.get("model_type")
    if kind not in CLASSES:
        raise ValueError(f"--trace-activations: model_type {kind!r} is not a family it traces "
                         f"(known: {', '.join(sorted(CLASSES))})")
    return getattr(_transformers(), CLASSES[kind])


def cache_dir() -> Path:
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "parallel-planner" / "traced"


def _versions() -> str:
    import torch
    return f"transformers {_transformers().__version__}, torch {torch.__version__}"


def _key(cfg: dict, seq_len: int, precision: str, attention: str, versions: str) -> str:
    text = json.dumps({"config": cfg, "seq_len": seq_len, "precision": precision,
                       "attention": attention, "versions": versions,
                       "micro_batches": TRACED_MICRO_BATCHES, "format": CACHE_FORMAT},
                      sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:32]


def _flash_contract():
    """An SDPA stand-in saving what a flash kernel saves (output computed on meta only)."""
    import torch

    class Flash(torch.autograd.Function):
        @staticmethod
        def forward(ctx, q, k, v):
            out = q.new_empty(q.shape[:-1] + (v.shape[-1],))
            lse = torch.empty(q.shape[:-1], dtype=torch.float32, device=q.device)
            ctx.save_for_backward(q, k, v, out, lse)
            return out

        @staticmethod
        def backward(ctx, grad):
            q, k, v, _, _ = ctx.saved_tensors
            return torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)

    def sdpa(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None,
             enable_gqa=False):
        return Flash.apply(q, k, v)
    return sdpa


def saved_bytes(cfg: dict, layers: int, micro_batch: int, seq_len: int, precision: str,
                attention: str, device: str = "meta") -> int:
    """Bytes of the distinct non-parameter storages saved by forward + backward (`device`:
    "cpu" runs the same on real tensors, for tests)."""
    import torch
    transformers = _transformers()
    cls = model_class(cfg)
    verbosity = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()  # config notes about unused defaults
    try:
        config = transformers.AutoConfig.for_model(
            **{**cfg, LAYER_KEYS.get(cfg["model_type"], "num_hidden_layers"): layers})
        config._attn_implementation = "sdpa" if attention == "flash" else "eager"
        with torch.device(device):
            model = cls(config).to(getattr(torch, DTYPES[precision]))
        return _run(model, micro_batch, seq_len, attention, device)
    finally:
        transformers.logging.set_verbosity(verbosity)


def _run(model, micro_batch: int, seq_len: int, attention: str, device: str) -> int:
    import torch
    model.train()
    params = {p.untyped_storage()._cdata for p in model.parameters()}
    saved = {}

    def pack(t):
        st = t.untyped_storage()
        if st._cdata not in params:
            saved[st._cdata] = (t, st.nbytes())  # the tensor keeps the storage (and id) alive
        return t

    ids = torch.zeros((micro_batch, seq_len), dtype=torch.long, device=device)
    functional, real = torch.nn.functional, torch.nn.functional.scaled_dot_product_attention
    if attention == "flash":
        functional.scaled_dot_product_attention = _flash_contract()
    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            out = model(input_ids=ids, labels=ids)
            out.loss.backward()
    finally:
        functional.scaled_dot_product_attention = real
    return sum(n for _, n in saved.values())


def trace(cfg: dict, *, seq_len: int, precision: str, attention: str = "flash",
          use_cache: bool = True) -> TracedActivations:
    """One layer's and the rest's saved bytes at micro-batches 2 and 3 (cached)."""
    model_class(cfg)  # unknown family / no transformers: one line before anything else
    versions = _versions()
    path = cache_dir() / f"{_key(cfg, seq_len, precision, attention, versions)}.json"
    if use_cache and path.is_file():
        try:
            return TracedActivations.from_dict(json.loads(path.read_text()))
        except (OSError, ValueError):
            pass  # a damaged cache entry is traced again
    points = {(n, b): saved_bytes(cfg, n, b, seq_len, precision, attention)
              for n in (1, 2) for b in TRACED_MICRO_BATCHES}
    layer = tuple(points[2, b] - points[1, b] for b in TRACED_MICRO_BATCHES)
    rest = tuple(points[1, b] - layer[i] for i, b in enumerate(TRACED_MICRO_BATCHES))
    result = TracedActivations(model_class=CLASSES[cfg["model_type"]], seq_len=seq_len,
                               precision=precision, attention=attention, layer_bytes=layer,
                               rest_bytes=rest, versions=versions)
    if use_cache:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(".tmp")
            tmp.write_text(json.dumps(result.to_dict()))
            tmp.replace(path)
        except OSError:
            pass  # an unwritable cache only costs the next run a trace
    return result


def config_for(spec: ModelSpec, model_source) -> dict:
    """The config.json behind --model when it is one (and describes `spec`), else the config
    written from the spec (presets, spec files, plans)."""
    if isinstance(model_source, str) and model_source.endswith(".json"):
        try:
            data = json.loads(Path(model_source).read_text())
        except (OSError, ValueError):
            data = None
        if isinstance(data, dict) and "model_type" in data:
            return data
    return hf_config_of(spec)


def for_job(spec: ModelSpec, job, model_source=None) -> TracedActivations:
    return trace(config_for(spec, model_source), seq_len=job.seq_len,
                 precision=job.precision, attention=job.attention)


def comparison(trace_: TracedActivations, spec: ModelSpec, job, micro_batch: int) -> dict:
    """Traced and analytic bytes of one layer and of the rest (one rank, no TP, no recompute)."""
    from planner.cost import activations as act
    shape: dict[str, Any] = {"tp": 1, "sequence_parallel": False, "micro_batch": micro_batch}
    at = TracedActivations._at
    return {"micro_batch": micro_batch,
            "layer_traced_bytes": at(trace_.layer_bytes, micro_batch),
            "layer_analytic_bytes": act.layer_bytes(spec, job, **shape, recompute="none"),
            "rest_traced_bytes": at(trace_.rest_bytes, micro_batch),
            "rest_analytic_bytes": act.embedding_bytes(spec, job, **shape)
            + act.head_bytes(spec, job, **shape)}


def comparison_text(trace_: TracedActivations, spec: ModelSpec, job, micro_batch: int) -> str:
    from planner.units import fmt_bytes
    c = comparison(trace_, spec, job, micro_batch)
    return (f"activations traced from transformers {trace_.model_class} (meta device, "
            f"micro-batch {micro_batch}, seq {job.seq_len}, {job.precision}, {job.attention} "
            f"attention): per layer {fmt_bytes(c['layer_traced_bytes'])} traced vs "
            f"{fmt_bytes(c['layer_analytic_bytes'])} analytic "
            f"(x{c['layer_traced_bytes'] / c['layer_analytic_bytes']:.2f}); embedding, head "
            f"and loss {fmt_bytes(c['rest_traced_bytes'])} traced vs "
            f"{fmt_bytes(c['rest_analytic_bytes'])} analytic; the memory model uses the "
            f"traced bytes")
