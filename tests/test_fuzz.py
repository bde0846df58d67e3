"""Bad input to every loader gives a ValueError (one line), never a deep traceback."""

import json

from hypothesis import given, settings
from hypothesis import strategies as st

from planner.hardware import HardwareProfile, load_profile
from planner.job import Job
from planner.plan import Layout, Plan
from planner.presets import MODEL_PRESETS
from planner.spec import ModelSpec, from_hf_config

JSON = st.recursive(st.none() | st.booleans() | st.integers(-10**6, 10**6) | st.floats()
                    | st.text(max_size=8),
                    lambda children: st.lists(children, max_size=4)
                    | st.dictionaries(st.text(max_size=8), children, max_size=4), max_leaves=12)


def _only_value_error(fn, *args):
    try:
        fn(*args)
    except ValueError as exc:
        assert "\n" not in str(exc)


def _mutations(base: dict):
    """Strategy: the valid dict with one key set to arbitrary JSON, or one key removed."""
    keys = sorted(base)
    setter = st.tuples(st.sampled_from(keys), JSON).map(lambda kv: {**base, kv[0]: kv[1]})
    dropper = st.sampled_from(keys).map(lambda k: {x: v for x, v in base.items() if x != k})
    return setter | dropper | JSON


@settings(max_examples=150, deadline=None)
@given(_mutations(MODEL_PRESETS["tiny"].to_dict()))
def test_model_spec_loader(data):
    _only_value_error(ModelSpec.from_dict, data)


@settings(max_examples=150, deadline=None)
@given(_mutations({"model_type": "llama", "hidden_size": 64, "num_attention_heads": 4,
                   "num_hidden_layers": 2, "intermediate_size": 128, "vocab_size": 100,
                   "max_position_embeddings": 64}))
def test_hf_config_loader(data):
    _only_value_error(from_hf_config, data)


@settings(max_examples=150, deadline=None)
@given(_mutations(load_profile("a100-80g").to_dict()))
def test_profile_loader(data):
    _only_value_error(HardwareProfile.from_dict, data)


@settings(max_examples=150, deadline=None)
@given(_mutations(Layout(dp=2, num_microbatches=2).to_dict()))
def test_layout_loader(data):
    _only_value_error(Layout.from_dict, data)


@settings(max_examples=100, deadline=None)
@given(_mutations(Job(global_batch=8, seq_len=128).to_dict()))
def test_job_loader(data):
    _only_value_error(Job.from_dict, data)


@settings(max_examples=100, deadline=None)
@given(st.text(max_size=200))
def test_plan_file_loader(tmp_path_factory, text):
    path = tmp_path_factory.mktemp("plans") / "plan.json"
    path.write_text(text)
    _only_value_error(Plan.load, path)


def test_plan_file_with_wrong_nested_types(tmp_path):
    base = Plan(model=MODEL_PRESETS["tiny"], cluster=__import__("planner.hardware").hardware
                .load_cluster("cpu", 1), job=Job(global_batch=8, seq_len=128, precision="fp32"),
                layout=Layout(dp=8)).to_dict()
    for key in ("model", "cluster", "job", "layout"):
        for bad in (None, [], "x", 3, {"unexpected": 1}):
            path = tmp_path / "p.json"
            path.write_text(json.dumps({**base, key: bad}))
            _only_value_error(Plan.load, path)
