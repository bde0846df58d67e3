import dataclasses
import json
from pathlib import Path

import pytest

from planner.cost.params import count_parameters, rank_param_tensors
from planner.moe_spec import MLASpec, MoESpec
from planner.plan import Layout
from planner.presets import MODEL_PRESETS, load_model
from planner.spec import OPTIONAL_KEYS, ModelSpec, from_hf_config

FIXTURES = Path(__file__).parent / "fixtures"


@pytest.mark.parametrize("name, expected", [
    ("gpt2-124m", 124_439_808),      # HF gpt2, tied embeddings, 1024 positions
    ("llama2-7b", 6_738_415_616),    # HF meta-llama/Llama-2-7b-hf
    ("llama3-8b", 8_030_261_248),    # HF meta-llama/Meta-Llama-3-8B
    ("llama2-70b", 68_976_648_192),
    ("llama3-405b", 405_853_388_800),
    ("bert-base", 109_514_298),      # HF BertForMaskedLM bert-base-uncased
])
def test_exact_parameter_counts(name, expected):
    assert count_parameters(MODEL_PRESETS[name]) == expected


@pytest.mark.parametrize("fixture, preset", [
    ("hf_gpt2.json", "gpt2-124m"), ("hf_llama2_7b.json", "llama2-7b"),
    ("hf_llama3_8b.json", "llama3-8b"), ("hf_bert_base.json", "bert-base")])
def test_hf_config_import_matches_preset(fixture, preset):
    spec = load_model(str(FIXTURES / fixture))
    assert count_parameters(spec) == count_parameters(MODEL_PRESETS[preset])
    assert spec.arch == MODEL_PRESETS[preset].arch
    assert spec.num_kv_heads == MODEL_PRESETS[preset].num_kv_heads


def test_spec_json_round_trip(tmp_path):
    for spec in MODEL_PRESETS.values():
        path = tmp_path / f"{spec.name}.json"
        path.write_text(json.dumps(spec.to_dict()))
        assert load_model(str(path)) == spec


def test_spec_rejects_unknown_and_missing_keys():
    data = MODEL_PRESETS["tiny"].to_dict()
    with pytest.raises(ValueError, match="unknown key 'colour'"):
        ModelSpec.from_dict({**data, "colour": "red"})
    del data["hidden_size"]
    with pytest.raises(ValueError, match="missing key 'hidden_size'"):
        ModelSpec.from_dict(data)


def test_spec_rejects_bad_shapes():
    data = MODEL_PRESETS["tiny"].to_dict()
    with pytest.raises(ValueError, match="hidden_size 130 is not divisible by num_heads 8"):
        ModelSpec.from_dict({**data, "hidden_size": 130})
    with pytest.raises(ValueError, match=r"num_layers must be in \[1, 10000\], got 0"):
        ModelSpec.from_dict({**data, "num_layers": 0})
    with pytest.raises(ValueError, match="unsupported model_type 't5'"):
        from_hf_config({"model_type": "t5"})


def test_unknown_model_names_the_value():
    with pytest.raises(ValueError, match="unknown model 'llama9-1t'"):
        load_model("llama9-1t")


def test_pipeline_ranks_partition_the_parameters():
    spec = MODEL_PRESETS["llama2-7b"]
    for layout in (Layout(pp=4, num_microbatches=4),
                   Layout(pp=2, virtual_stages=2, schedule="interleaved_1f1b",
                          num_microbatches=4),
                   Layout(pp=2, virtual_stages=2, schedule="zbv", num_microbatches=4)):
        total = sum(t.numel for r in range(layout.pp)
                    for t in rank_param_tensors(spec, layout, r))
        assert total == count_parameters(spec)
    gpt = MODEL_PRESETS["gpt2-124m"]  # tied: the last stage keeps a copy of the embedding
    layout = Layout(pp=2, num_microbatches=2)
    total = sum(t.numel for r in range(2) for t in rank_param_tensors(gpt, layout, r))
    assert total == count_parameters(gpt) + gpt.vocab_size * gpt.hidden_size


def test_every_spec_key_is_required():
    data = MODEL_PRESETS["llama2-7b"].to_dict()
    for key in set(data) - set(OPTIONAL_KEYS):  # dropout, norm_eps, rope_theta: no silent default
        with pytest.raises(ValueError, match=f"model spec: missing key '{key}'"):
            ModelSpec.from_dict({k: v for k, v in data.items() if k != key})


def test_a_spec_written_before_moe_and_mla_is_the_dense_model():
    spec = MODEL_PRESETS["llama2-7b"]
    data = {k: v for k, v in spec.to_dict().items() if k not in OPTIONAL_KEYS}
    assert ModelSpec.from_dict(data) == spec and not spec.is_moe and spec.mla is None


def test_moe_and_mla_round_trip_and_reject_unknown_keys():
    spec = dataclasses.replace(
        MODEL_PRESETS["llama2-7b"],
        moe=MoESpec(num_experts=8, experts_per_token=2, expert_ffn_hidden_size=1024,
                    first_dense_layers=1, moe_layer_every=2),
        mla=MLASpec(q_lora_rank=0, kv_lora_rank=64, qk_nope_head_dim=32, qk_rope_head_dim=16,
                    v_head_dim=32))
    assert ModelSpec.from_dict(json.loads(json.dumps(spec.to_dict()))) == spec
    assert [spec.moe.is_moe_layer(i) for i in range(5)] == [False, True, False, True, False]
    data = spec.to_dict()
    data["moe"]["experts"] = 8
    with pytest.raises(ValueError, match="model spec moe: unknown key 'experts'"):
        ModelSpec.from_dict(data)
    with pytest.raises(ValueError, match="experts_per_token"):
        MoESpec(num_experts=4, experts_per_token=5, expert_ffn_hidden_size=8)
    with pytest.raises(ValueError, match="capacity_factor must be 0 .dropless. or >= 1"):
        MoESpec(num_experts=4, experts_per_token=1, expert_ffn_hidden_size=8,
                capacity_factor=0.5)


@pytest.mark.parametrize("key, value, message", [
    ("num_layers", 10**9, r"num_layers must be in \[1, 10000\]"),
    ("num_layers", 2**63, "num_layers must be in"),
    ("hidden_size", 10**400, "about 10\\^400"),
    ("vocab_size", 2**40, "vocab_size must be in"),
    ("max_seq_len", 1.5, "max_seq_len must be an integer"),
    ("dropout", 1.0, "dropout must be < 1"),
    ("dropout", float("nan"), "dropout must be a finite number"),
    ("norm_eps", 0.0, r"norm_eps must be in \(0.0, 1.0\]"),
    ("rope_theta", float("inf"), "rope_theta must be a finite number"),
    ("name", "x" * 300, "at most 256 printable characters"),
    ("name", "two\nlines", "printable"),
])
def test_absurd_shapes_are_refused(key, value, message):
    data = MODEL_PRESETS["tiny"].to_dict()
    with pytest.raises(ValueError, match=message) as err:
        ModelSpec.from_dict({**data, key: value})
    assert "\n" not in str(err.value)


def test_hf_config_with_overflowing_numbers_is_one_line(tmp_path):
    base = json.loads((FIXTURES / "hf_llama2_7b.json").read_text())
    for key, raw in (("rope_theta", "1e999"), ("rms_norm_eps", "Infinity"),
                     ("num_hidden_layers", "1" + "0" * 30)):
        path = tmp_path / "config.json"
        path.write_text(json.dumps({**base, key: "@"}).replace('"@"', raw))
        with pytest.raises(ValueError) as err:
            load_model(str(path))
        assert "\n" not in str(err.value)
    with pytest.raises(ValueError, match="bad value"):
        from_hf_config({**base, "attention_dropout": 10**400})
