"""Hugging Face config.json import (planner/hf_config.py): exact or refused, never a silent misread.

Fixtures carry the shapes of real checkpoints.  Parameter counts are checked against the
published totals always, and against transformers' own model of the same config (built on the
meta device, sum of numel) when transformers is installed (the `test` extra installs it)."""

import json
from pathlib import Path

import pytest

from planner.cost.params import count_parameters
from planner.presets import MODEL_PRESETS, load_model
from planner.spec import from_hf_config

FIXTURES = Path(__file__).parent / "fixtures"
NO_TRANSFORMERS = "transformers is not installed (pip install -e '.[test]' installs it)"


def _cfg(fixture: str, **changes) -> dict:
    return {**json.loads((FIXTURES / fixture).read_text()), **changes}


def _transformers_count(cfg: dict) -> int:
    """Parameters of transformers' model for `cfg` (tied weights once), on the meta device."""
    transformers = pytest.importorskip("transformers", reason=NO_TRANSFORMERS)
    import torch

    config = transformers.AutoConfig.for_model(**cfg)
    auto = (transformers.AutoModelForMaskedLM if cfg["model_type"] == "bert"
            else transformers.AutoModelForCausalLM)
    with torch.device("meta"):
        model = auto.from_config(config)
    return sum(p.numel() for p in model.parameters())


# fixture, changes that make it representable ({}: as published), published total
EXACT = [
    ("hf_gpt2.json", {}, 124_439_808),                  # openai-community/gpt2
    ("hf_bert_base.json", {}, 109_514_298),             # bert-base-uncased, BertForMaskedLM
    ("hf_llama2_7b.json", {}, 6_738_415_616),           # meta-llama/Llama-2-7b-hf
    ("hf_llama3_8b.json", {}, 8_030_261_248),           # meta-llama/Meta-Llama-3-8B
    ("hf_llama3_8b_v5.json", {}, 8_030_261_248),        # the same, saved by transformers 5.x
    ("hf_mistral_7b_v03.json", {}, 7_248_023_552),      # mistralai/Mistral-7B-v0.3
    ("hf_gemma_2b.json", {}, 2_506_172_416),            # google/gemma-2b: tied, MQA
    # meta-llama/Llama-3.2-1B: tied embeddings; its llama3 RoPE scaling is refused (below)
    ("hf_llama32_1b.json", {"rope_scaling": None}, 1_235_814_400),
    # microsoft/Phi-3-mini-4k-instruct: fused qkv / gate_up; its sliding window is refused
    ("hf_phi3_mini_4k.json", {"sliding_window": None}, 3_821_079_552),
    # head_dim other than hidden / heads: ModelSpec.attention_head_dim
    ("hf_mistral_nemo_12b.json", {}, 12_247_782_400),   # mistralai/Mistral-Nemo-Base-2407
    ("hf_gemma_7b.json", {}, 8_537_680_896),            # google/gemma-7b: 16 heads of 256
    ("hf_qwen3_8b.json", {}, 8_190_735_360),            # Qwen/Qwen3-8B: q/k norms (qk_norm)
    ("hf_qwen25_05b.json", {}, 494_032_768),            # Qwen/Qwen2.5-0.5B: q/k/v biases only
    # mixture of experts (planner/hf_moe.py)
    ("hf_mixtral_8x7b.json", {}, 46_702_792_704),       # mistralai/Mixtral-8x7B-v0.1
    ("hf_qwen15_moe_a27b.json", {}, 14_315_784_192),    # Qwen/Qwen1.5-MoE-A2.7B (qwen2_moe)
    ("hf_qwen3_30b_a3b.json", {}, 30_532_122_624),      # Qwen/Qwen3-30B-A3B
    ("hf_qwen3_235b_a22b.json", {}, 235_093_634_560),   # Qwen/Qwen3-235B-A22B
    # deepseek-ai/DeepSeek-V3: MLA, 3 dense layers, 256+1 experts; its YaRN RoPE is refused
    ("hf_deepseek_v3.json", {"rope_scaling": None}, 671_026_404_352),
    # openai/gpt-oss-120b: biases, sinks; its sliding windows and YaRN RoPE are refused
    ("hf_gpt_oss_120b.json", {"rope_scaling": None, "layer_types": ["full_attention"] * 36},
     116_829_156_672),
]
# real checkpoints refused as they are: fixture, published total, what the refusal names
REFUSED = [
    ("hf_llama32_1b.json", 1_235_814_400, r"rope_scaling\.rope_type 'llama3': scaled RoPE"),
    ("hf_llama31_8b_v5.json", 8_030_261_248, r"rope_parameters\.rope_type 'llama3'"),
    ("hf_deepseek_v3.json", 671_026_404_352, r"rope_scaling\.rope_type 'yarn'"),
    ("hf_gpt_oss_120b.json", 116_829_156_672,
     r"layer_types: 18 of 36 layers are 'sliding_attention'.*128-token sliding window"),
    ("hf_phi3_mini_4k.json", 3_821_079_552,
     r"sliding_window 2047 < max_position_embeddings 4096"),
    ("hf_gemma2_2b.json", 2_614_341_888,
     (r"sliding_window 4096.*attn_logit_softcapping 50"
      r".*final_logit_softcapping 30.*pre_feedforward_layernorm")),
    ("hf_gemma3_1b.json", 999_885_952,
     (r"sliding_window 512.*rope_local_base_freq 10000 != rope_theta "
      r"1000000.*pre_feedforward_layernorm")),
]


@pytest.mark.parametrize("fixture, changes, published", EXACT, ids=[e[0] for e in EXACT])
def test_exact_families_count_the_published_total(fixture, changes, published):
    spec = from_hf_config(_cfg(fixture, **changes))
    assert count_parameters(spec) == published


@pytest.mark.parametrize("fixture, changes, published", EXACT, ids=[e[0] for e in EXACT])
def test_exact_families_count_what_transformers_builds(fixture, changes, published):
    spec = from_hf_config(_cfg(fixture, **changes))
    # transformers' model of the config as published: the changes do not touch a shape
    assert count_parameters(spec) == _transformers_count(_cfg(fixture)) == published


@pytest.mark.parametrize("fixture, published, message", REFUSED, ids=[r[0] for r in REFUSED])
def test_unrepresentable_checkpoints_are_refused_by_key(fixture, published, message):
    with pytest.raises(ValueError, match=message) as err:
        load_model(str(FIXTURES / fixture))
    assert str(err.value).startswith("Hugging Face config (model_type ")
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("fixture, published, message", REFUSED, ids=[r[0] for r in REFUSED])
def test_refused_fixtures_have_the_real_shapes(fixture, published, message):
    assert _transformers_count(_cfg(fixture)) == published


def test_head_dim_was_the_nemo_misread():
    """Ignoring Mistral-Nemo's head_dim gave 12.77B parameters against transformers' 12.25B."""
    cfg = _cfg("hf_mistral_nemo_12b.json")
    naive = count_parameters(from_hf_config({k: v for k, v in cfg.items() if k != "head_dim"}))
    assert naive == 12_772_070_400  # q/k/v/o at 160 dims per head: +4.3%
    assert naive != _transformers_count(cfg)


# --- RoPE: both config generations ------------------------------------------------------------

def test_rope_theta_of_both_config_generations():
    v4, v5 = load_model(str(FIXTURES / "hf_llama3_8b.json")), \
        load_model(str(FIXTURES / "hf_llama3_8b_v5.json"))
    assert "rope_theta" not in _cfg("hf_llama3_8b_v5.json")  # 5.x keeps it in rope_parameters
    assert v4.rope_theta == v5.rope_theta == 500000.0
    assert v4.to_dict() | {"name": ""} == v5.to_dict() | {"name": ""}
    mistral = _cfg("hf_mistral_7b_v03.json")
    del mistral["rope_theta"]
    spec = from_hf_config({**mistral, "rope_parameters": {"rope_type": "default",
                                                          "rope_theta": 1e6}})
    assert spec.rope_theta == 1e6
    # 4.x: rope_scaling null and a top-level theta; absent everywhere: transformers' 10000
    assert from_hf_config(_cfg("hf_mistral_7b_v03.json", rope_scaling=None)).rope_theta == 1e6
    assert load_model(str(FIXTURES / "hf_llama2_7b.json")).rope_theta == 10000.0
    # a rope_parameters without a theta takes the top-level one (transformers' setdefault)
    both = _cfg("hf_llama3_8b.json", rope_parameters={"rope_type": "default"})
    assert from_hf_config(both).rope_theta == 500000.0
    # the legacy "type" spelling of rope_type
    legacy = _cfg("hf_llama3_8b.json", rope_scaling={"type": "default"})
    assert from_hf_config(legacy).rope_theta == 500000.0


@pytest.mark.parametrize("changes, message", [
    ({"rope_scaling": {"type": "linear", "factor": 2.0}}, r"rope_scaling\.rope_type 'linear'"),
    ({"rope_scaling": {"rope_type": "yarn", "factor": 4.0,
                       "original_max_position_embeddings": 32768}},
     r"rope_scaling\.rope_type 'yarn'"),
    ({"rope_scaling": {"rope_type": "dynamic", "factor": 2.0}}, r"rope_type 'dynamic'"),
    ({"rope_parameters": {"rope_type": "default", "rope_theta": 1e6}},
     r"rope_theta 500000 and rope_parameters\.rope_theta 1000000 disagree"),
    ({"partial_rotary_factor": 0.75}, r"partial_rotary_factor 0\.75: RoPE on part"),
    ({"rope_parameters": {"rope_type": "default", "rope_theta": 500000.0,
                          "partial_rotary_factor": 0.5}},
     r"rope_parameters\.partial_rotary_factor 0\.5"),
    ({"rope_parameters": {"full_attention": {"rope_type": "default", "rope_theta": 1e6},
                          "sliding_attention": {"rope_type": "default", "rope_theta": 1e4}}},
     r"differ: ModelSpec has one rope_theta"),
])
def test_rope_that_changes_the_model_is_refused(changes, message):
    with pytest.raises(ValueError, match=message) as err:
        from_hf_config(_cfg("hf_llama3_8b.json", **changes))
    assert "\n" not in str(err.value)


# --- biases -----------------------------------------------------------------------------------

def test_llama_biases_on_every_linear_are_exact():
    cfg = {"model_type": "llama", "hidden_size": 64, "num_attention_heads": 4,
           "num_key_value_heads": 2, "num_hidden_layers": 2, "intermediate_size": 96,
           "vocab_size": 100, "max_position_embeddings": 64, "attention_bias": True,
           "mlp_bias": True}
    spec = from_hf_config(cfg)
    assert spec.linear_bias
    assert count_parameters(spec) == _transformers_count(cfg)


@pytest.mark.parametrize("fixture, changes, message", [
    ("hf_llama3_8b.json", {"attention_bias": True},
     "attention_bias true with mlp_bias false: ModelSpec.linear_bias"),
    ("hf_llama3_8b.json", {"mlp_bias": True}, "attention_bias false with mlp_bias true"),
    ("hf_gemma_2b.json", {"attention_bias": True}, "attention_bias true: gemma has no MLP bias"),
    ("hf_qwen3_8b.json", {"attention_bias": True}, "attention_bias true: qwen3 has no MLP bias"),
    # keys transformers does not read for the family are refused as unknown, never dropped
    ("hf_mistral_7b_v03.json", {"attention_bias": True}, r"unknown key\(s\) 'attention_bias'"),
])
def test_partial_biases_are_refused_with_their_keys(fixture, changes, message):
    with pytest.raises(ValueError, match=message):
        from_hf_config(_cfg(fixture, **changes))


# --- sliding windows, layer types, family structure -------------------------------------------

@pytest.mark.parametrize("fixture, changes, message", [
    # Mistral-7B-v0.1: a 4096-token window within 32768 positions
    ("hf_mistral_7b_v03.json", {"sliding_window": 4096}, "sliding_window 4096 < max_position"),
    # an absent sliding_window is MistralConfig's default 4096, not "none"
    ("hf_mistral_7b_v03.json", {"sliding_window": "absent"}, "sliding_window 4096 <"),
    ("hf_llama3_8b.json", {"layer_types": ["sliding_attention"] + ["full_attention"] * 31},
     "layer_types: 1 of 32 layers are 'sliding_attention'"),
    ("hf_llama3_8b.json", {"sliding_window": 4096}, r"unknown key\(s\) 'sliding_window'"),
    ("hf_gemma_2b.json", {"use_bidirectional_attention": True},
     "use_bidirectional_attention true"),
])
def test_attention_patterns_that_are_not_represented_are_refused(fixture, changes, message):
    cfg = _cfg(fixture, **changes)
    cfg = {k: v for k, v in cfg.items() if v != "absent"}
    with pytest.raises(ValueError, match=message):
        from_hf_config(cfg)


def test_windows_that_change_nothing_are_accepted():
    mistral = from_hf_config(_cfg("hf_mistral_7b_v03.json", sliding_window=32768))
    assert count_parameters(mistral) == 7_248_023_552
    layer_types = ["full_attention"] * 32  # as transformers 5.x writes it
    assert from_hf_config(_cfg("hf_llama3_8b.json", layer_types=layer_types)).num_layers == 32
    # Qwen's window applies only with use_sliding_window (Qwen2.5-0.5B carries 32768, off)
    cfg = _cfg("hf_qwen25_05b.json")
    assert from_hf_config(cfg).qkv_bias
    with pytest.raises(ValueError, match="use_sliding_window true: layers 21 and up"):
        from_hf_config({**cfg, "use_sliding_window": True, "sliding_window": 4096,
                        "max_window_layers": 21})


def test_gemma3_multimodal_is_refused():
    text = {k: v for k, v in _cfg("hf_gemma3_1b.json").items() if k != "model_type"}
    with pytest.raises(ValueError, match="vision_config: the vision tower.*text_config: "
                                         ".*pre_feedforward_layernorm"):
        from_hf_config({"model_type": "gemma3", "text_config": text,
                        "vision_config": {"model_type": "siglip_vision_model"}})


# --- unknown keys -----------------------------------------------------------------------------

def test_unknown_shape_keys_are_refused_by_name_and_cosmetic_keys_ignored():
    cfg = _cfg("hf_llama3_8b.json", num_experts=8, moe_intermediate_size=1024,
               num_nextn_predict_layers=1)
    with pytest.raises(ValueError, match=r"unknown key\(s\) 'moe_intermediate_size', "
                                         r"'num_experts', 'num_nextn_predict_layers'"):
        from_hf_config(cfg)
    base = load_model(str(FIXTURES / "hf_llama3_8b.json"))
    cosmetic = _cfg("hf_llama3_8b.json", my_note="fine-tuned on x", temperature=0.6,
                    num_experts=None, output_hidden_states=False, pretraining_tp=4,
                    _name_or_path="")
    assert from_hf_config(cosmetic, name="hf_llama3_8b") == base


@pytest.mark.parametrize("fixture, changes, message", [
    ("hf_gpt2.json", {"add_cross_attention": True}, "add_cross_attention true"),
    ("hf_gpt2.json", {"pruned_heads": {"0": [1, 2]}}, "pruned_heads"),
    ("hf_gpt2.json", {"scale_attn_by_inverse_layer_idx": True},
     "scale_attn_by_inverse_layer_idx true"),
    ("hf_gpt2.json", {"attn_pdrop": 0.0}, "resid_pdrop 0.1, embd_pdrop 0.1, attn_pdrop 0 differ"),
    ("hf_bert_base.json", {"position_embedding_type": "relative_key"},
     "position_embedding_type 'relative_key'"),
    ("hf_phi3_mini_4k.json", {"sliding_window": None, "resid_pdrop": 0.1},
     "attention_dropout 0, resid_pdrop 0.1, embd_pdrop 0 differ"),
    ("hf_gemma2_2b.json", {"query_pre_attn_scalar": 144}, "query_pre_attn_scalar 144"),
])
def test_other_model_changing_keys_are_refused(fixture, changes, message):
    with pytest.raises(ValueError, match=message):
        from_hf_config(_cfg(fixture, **changes))


def test_family_defaults_are_transformers_defaults():
    """An absent key means transformers' default for that model_type, not Llama's."""
    gemma = _cfg("hf_gemma_2b.json")
    assert "tie_word_embeddings" not in gemma and from_hf_config(gemma).tie_embeddings
    no_head_dim = {k: v for k, v in gemma.items() if k != "head_dim"}
    assert from_hf_config(no_head_dim).head_dim == 256  # GemmaConfig.head_dim = 256
    no_kv = {k: v for k, v in _cfg("hf_mistral_7b_v03.json").items()
             if k != "num_key_value_heads"}
    assert from_hf_config(no_kv).num_kv_heads == 8  # MistralConfig: 8
    assert from_hf_config({**no_kv, "num_key_value_heads": None}).num_kv_heads == 32
    assert from_hf_config(_cfg("hf_llama32_1b.json", rope_scaling=None)).tie_embeddings
    assert not load_model(str(FIXTURES / "hf_llama3_8b.json")).tie_embeddings  # Llama: False


# --- names ------------------------------------------------------------------------------------

def test_imported_models_are_named(tmp_path):
    cfg = _cfg("hf_mistral_7b_v03.json")
    folder = tmp_path / "Mistral-7B-v0.3"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(cfg))
    assert load_model(str(folder / "config.json")).name == "Mistral-7B-v0.3"
    (folder / "config.json").write_text(json.dumps({**cfg, "_name_or_path":
                                                    "mistralai/Mistral-7B-v0.3-base"}))
    assert load_model(str(folder / "config.json")).name == "Mistral-7B-v0.3-base"
    assert load_model(str(FIXTURES / "hf_gpt2.json")).name == "hf_gpt2"
    assert from_hf_config(cfg).name == "mistral"
    assert from_hf_config(cfg, name="config").name == "mistral"  # an upload's file name
    assert from_hf_config(_cfg("hf_phi3_mini_4k.json", sliding_window=None)).name == \
        "Phi-3-mini-4k-instruct"


def test_presets_and_imports_agree():
    for fixture, preset in (("hf_llama3_8b_v5.json", "llama3-8b"), ("hf_gpt2.json", "gpt2-124m"),
                            ("hf_mixtral_8x7b.json", "mixtral-8x7b"),
                            ("hf_qwen3_30b_a3b.json", "qwen3-30b-a3b"),
                            ("hf_qwen3_235b_a22b.json", "qwen3-235b-a22b")):
        spec = load_model(str(FIXTURES / fixture))
        assert spec.to_dict() | {"name": ""} == MODEL_PRESETS[preset].to_dict() | {"name": ""}


@pytest.mark.parametrize("fixture, changes, preset", [
    # the config's aux_loss_alpha 0.001 is DeepSeek-V2's; V3 trained with 0.0001 (Sec. 4.2)
    ("hf_deepseek_v3.json", {"rope_scaling": None, "aux_loss_alpha": 0.0001}, "deepseek-v3"),
    ("hf_gpt_oss_120b.json", {"rope_scaling": None, "layer_types": ["full_attention"] * 36},
     "gpt-oss-120b"),
])
def test_moe_presets_are_their_configs_without_the_refused_keys(fixture, changes, preset):
    spec = from_hf_config(_cfg(fixture, **changes))
    assert spec.to_dict() | {"name": ""} == MODEL_PRESETS[preset].to_dict() | {"name": ""}


# --- mixture of experts: which layers, which tensors (planner/hf_moe.py) ----------------------

SMALL_MOE = {
    "mixtral": dict(hidden_size=64, intermediate_size=96, num_hidden_layers=3,
                    num_attention_heads=4, num_key_value_heads=2, num_local_experts=4,
                    num_experts_per_tok=2),
    "qwen2_moe": dict(hidden_size=64, intermediate_size=96, moe_intermediate_size=32,
                      shared_expert_intermediate_size=48, num_hidden_layers=4,
                      num_attention_heads=4, num_key_value_heads=2, num_experts=6,
                      num_experts_per_tok=2, decoder_sparse_step=2),
    "qwen3_moe": dict(hidden_size=64, intermediate_size=96, moe_intermediate_size=32,
                      num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
                      head_dim=24, num_experts=6, num_experts_per_tok=2, mlp_only_layers=[0, 1]),
    "deepseek_v3": dict(hidden_size=64, intermediate_size=96, moe_intermediate_size=32,
                        num_hidden_layers=4, num_attention_heads=4, n_routed_experts=8,
                        n_shared_experts=2, num_experts_per_tok=2, first_k_dense_replace=1,
                        q_lora_rank=24, kv_lora_rank=16, qk_nope_head_dim=8,
                        qk_rope_head_dim=4, v_head_dim=12, n_group=2, topk_group=1),
    "gpt_oss": dict(hidden_size=64, intermediate_size=32, num_hidden_layers=2,
                    num_attention_heads=4, num_key_value_heads=2, head_dim=24,
                    num_local_experts=4, num_experts_per_tok=2,
                    layer_types=["full_attention"] * 2,
                    rope_parameters={"rope_type": "default", "rope_theta": 150000.0}),
}
# which layers have experts, as transformers builds them
MOE_LAYERS = {"mixtral": [0, 1, 2], "qwen2_moe": [1, 3], "qwen3_moe": [2, 3],
              "deepseek_v3": [1, 2, 3], "gpt_oss": [0, 1]}


@pytest.mark.parametrize("model_type", sorted(SMALL_MOE))
def test_small_moe_configs_count_what_transformers_builds(model_type):
    cfg = {"model_type": model_type, "vocab_size": 100, "max_position_embeddings": 128,
           **SMALL_MOE[model_type]}
    spec = from_hf_config(cfg)
    assert [i for i in range(spec.num_layers) if spec.moe.is_moe_layer(i)] == \
        MOE_LAYERS[model_type]
    assert count_parameters(spec) == _transformers_count(cfg)


def test_moe_details_of_each_family():
    qwen2 = from_hf_config(_cfg("hf_qwen15_moe_a27b.json"))
    assert qwen2.moe.shared_expert_gate and qwen2.moe.shared_ffn_hidden_size == 5632
    assert qwen2.qkv_bias and not qwen2.linear_bias
    ds = from_hf_config(_cfg("hf_deepseek_v3.json", rope_scaling=None))
    assert (ds.mla.q_lora_rank, ds.mla.kv_lora_rank, ds.mla.qk_head_dim) == (1536, 512, 192)
    assert ds.moe.router == "sigmoid" and ds.moe.first_dense_layers == 3
    assert ds.num_kv_heads == ds.num_heads  # MLA has no KV-head grouping
    oss = MODEL_PRESETS["gpt-oss-120b"]
    assert oss.linear_bias and oss.attention_sinks and oss.q_hidden_size == 4096


@pytest.mark.parametrize("model_type, changes, message", [
    ("qwen3_moe", {"mlp_only_layers": [1, 3]},
     r"mlp_only_layers \[1, 3\] with decoder_sparse_step 1: only the first k layers"),
    ("deepseek_v3", {"moe_layer_freq": 2}, "moe_layer_freq 2: transformers builds every layer"),
    ("deepseek_v3", {"attention_bias": True}, "attention_bias true: DeepseekV3Attention"),
    ("deepseek_v3", {"scoring_func": "tanh"}, "scoring_func 'tanh'"),
    ("gpt_oss", {"attention_bias": False}, "attention_bias false: GPT-OSS's experts"),
    ("gpt_oss", {"experts_per_token": 3}, "experts_per_token 3 and num_experts_per_tok 2"),
    ("mixtral", {"num_experts": 6}, "num_local_experts 4 and num_experts 6 disagree"),
])
def test_moe_keys_that_cannot_be_represented_are_refused(model_type, changes, message):
    cfg = {"model_type": model_type, "vocab_size": 100, "max_position_embeddings": 128,
           **SMALL_MOE[model_type], **changes}
    with pytest.raises(ValueError, match=message) as err:
        from_hf_config(cfg)
    assert "\n" not in str(err.value)
