"""Tiny random Hugging Face checkpoints built from config dicts (nothing is downloaded), and
their ModelSpecs. Dropout 0 everywhere, so logits are comparable."""

import json
from pathlib import Path

CONFIGS = {
    "gpt2": {"model_type": "gpt2", "n_layer": 4, "n_embd": 32, "n_head": 4, "vocab_size": 96,
             "n_positions": 32, "resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0,
             "bos_token_id": 0, "eos_token_id": 0},
    "llama": {"model_type": "llama", "num_hidden_layers": 4, "hidden_size": 32,
              "num_attention_heads": 4, "num_key_value_heads": 2, "intermediate_size": 64,
              "vocab_size": 96, "max_position_embeddings": 32, "tie_word_embeddings": False,
              "rope_theta": 10000.0},
    "mistral": {"model_type": "mistral", "num_hidden_layers": 4, "hidden_size": 32,
                "num_attention_heads": 4, "num_key_value_heads": 2, "intermediate_size": 64,
                "vocab_size": 96, "max_position_embeddings": 32, "sliding_window": None,
                "tie_word_embeddings": False},
    "bert": {"model_type": "bert", "num_hidden_layers": 4, "hidden_size": 32,
             "num_attention_heads": 4, "intermediate_size": 64, "vocab_size": 96,
             "max_position_embeddings": 32, "hidden_dropout_prob": 0.0,
             "attention_probs_dropout_prob": 0.0},
}
CLASSES = {"gpt2": "GPT2LMHeadModel", "llama": "LlamaForCausalLM",
           "mistral": "MistralForCausalLM", "bert": "BertForMaskedLM"}


def hf_model(family: str, seed: int = 0, **overrides):
    """A random transformers model of `family` (eval mode, fp32)."""
    import torch
    import transformers
    cfg = {**CONFIGS[family], **overrides}
    config = transformers.AutoConfig.for_model(**cfg)
    torch.manual_seed(seed)
    model = getattr(transformers, CLASSES[family])(config).eval()
    with torch.no_grad():  # non-trivial norms and biases, so a mix-up shows in the logits
        for p in model.parameters():
            if p.ndim == 1:
                p.add_(torch.randn_like(p) * 0.1)
    return model


def save(model, path, max_shard_size=None) -> Path:
    path = Path(path)
    kw = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(path, **kw)
    return path


def spec_of(path):
    from planner.spec import from_hf_config
    return from_hf_config(json.loads((Path(path) / "config.json").read_text()), name="tiny")
