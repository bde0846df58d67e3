"""app/uploads.py: every upload is bounded before it is parsed, and every failure is one line.

The measured.json fixture is a real CPU run's (tests/test_measured.py says how it was made)."""

import json
import math
import time
from pathlib import Path

import pytest

pytest.importorskip("streamlit")
from streamlit.testing.v1 import AppTest  # noqa: E402

from app import backend  # noqa: E402
from app.uploads import (  # noqa: E402
    MAX_UPLOAD_BYTES,
    measured_from_upload,
    model_from_upload,
    parse_json_bytes,
    profile_from_upload,
)
from planner.measured import Measured  # noqa: E402

APP = str(Path(__file__).resolve().parents[1] / "app" / "streamlit_app.py")
FIXTURE = Path(__file__).parent / "fixtures" / "measured_cpu_dp2.json"
PROFILE = Path(__file__).resolve().parents[1] / "hardware_profiles" / "a100-80g.json"


def _raw() -> dict:
    return json.loads(FIXTURE.read_text())


def _one_line(fn, *args, match: str) -> str:
    with pytest.raises(ValueError) as err:
        fn(*args)
    msg = str(err.value)
    assert match in msg, msg
    assert "\n" not in msg and "Traceback" not in msg and len(msg) < 400, msg
    return msg


def test_the_runtimes_cpu_measured_json_is_accepted():
    measured = measured_from_upload(FIXTURE.read_bytes(), "measured.json")
    assert [r["peak_allocated_bytes"] for r in measured["ranks"]] == [None, None]
    plan = backend.plan_from_measured(measured)
    assert plan.estimate is None and plan.layout.dp == 2
    table = backend.compare_table(plan, measured)
    assert {"weights", "step time (s)"} <= set(table.component)


def _rank0(key, value) -> dict:
    raw = _raw()
    raw["ranks"][0][key] = value
    return raw


GARBAGE = {
    "null step time": ({**_raw(), "step_time_s": None}, "step_time_s"),
    "bool tokens/s": ({**_raw(), "tokens_per_s": True}, "tokens_per_s"),
    "negative bytes": (_rank0("weights_bytes", -1), "weights_bytes"),
    "string bytes": (_rank0("max_rss_bytes", "1 GB"), "max_rss_bytes"),
    "bool peak": (_rank0("peak_allocated_bytes", False), "peak_allocated_bytes"),
    "missing key": ({k: v for k, v in _raw().items() if k != "val_loss"}, "val_loss"),
    "unknown key": ({**_raw(), "note": "x"}, "note"),
    "old version": ({**_raw(), "schema_version": 0}, "schema_version"),
}


@pytest.mark.parametrize("name", GARBAGE)
def test_garbage_measured_uploads_are_one_line(name):
    data, key = GARBAGE[name]
    _one_line(measured_from_upload, json.dumps(data).encode(), "m.json", match=key)


@pytest.mark.parametrize("token", ["NaN", "Infinity", "-Infinity", "1e999"])
def test_non_finite_numbers_are_refused_at_parse(token):
    text = json.dumps(_raw()).replace('"step_time_s": ', f'"step_time_s": {token}, "x": ', 1)
    _one_line(measured_from_upload, text.encode(), "m.json", match="not a valid JSON number")


@pytest.mark.parametrize("payload,match", [
    (b"[" * 100_000 + b"]" * 100_000, "nested 100,000 levels"),
    (b'{"a":' * 100_000 + b"1" + b"}" * 100_000, "nested 100,000 levels"),
    (b"[" * 400_000, "nested 400,000 levels"),          # unbalanced: refused before parsing
    (b"{" + b'"k": 1, ' * 10 + b'"x": ' + b"9" * 5000 + b"}", "not valid JSON"),  # 5000 digits
    (b" " * (MAX_UPLOAD_BYTES + 1), "the limit is 1,000,000"),
    (b"\xff\xfe{}", "not UTF-8"),
    (b"[1, 2]", "expected a JSON object"),
    (b"", "not valid JSON"),
])
def test_hostile_uploads_are_refused_quickly_with_one_line(payload, match):
    for fn in (measured_from_upload, model_from_upload, profile_from_upload):
        start = time.perf_counter()
        _one_line(fn, payload, "f.json", match=match)
        assert time.perf_counter() - start < 2.0


def test_depth_within_the_limit_still_parses():
    assert parse_json_bytes(b'{"a": ' + b"[" * 60 + b"]" * 60 + b"}", "f") == \
        json.loads("{\"a\": " + "[" * 60 + "]" * 60 + "}")


def test_file_names_cannot_break_the_line():
    msg = _one_line(measured_from_upload, b"[]", "evil\nname.json" + "x" * 500,
                    match="expected a JSON object")
    assert "evil\\nname.json" in msg


@pytest.mark.parametrize("changes,match", [
    ({"num_layers": 10**9}, "num_layers"),
    ({"num_layers": True}, "num_layers"),
    ({"hidden_size": 2.5}, "hidden_size"),
    ({"num_heads": 10}, "num_heads"),  # 10 heads do not divide hidden 768
])
def test_model_uploads_beyond_the_planners_bounds_are_one_line(changes, match):
    from planner.presets import MODEL_PRESETS
    spec = {**MODEL_PRESETS["gpt2-124m"].to_dict(), **changes}
    _one_line(model_from_upload, json.dumps(spec).encode(), "m.json", match=match)


def test_profile_uploads_beyond_the_planners_bounds_are_one_line():
    profile = json.loads(PROFILE.read_text())
    for key, value in (("gpus_per_node", 2**31), ("gpus_per_node", 0), ("gpu", None)):
        _one_line(profile_from_upload, json.dumps({**profile, key: value}).encode(), "p.json",
                  match=key)


def test_page_compares_the_runtimes_cpu_measured_json():
    at = AppTest.from_file(APP, default_timeout=120)
    at.run()
    at.selectbox(key="model").set_value("gpt2-124m")
    at.number_input(key="nodes").set_value(1)
    at.number_input(key="global_batch").set_value(64)
    at.number_input(key="seq_len").set_value(1024)
    at.run()
    at.file_uploader(key="measured_file").set_value(
        ("measured.json", FIXTURE.read_bytes(), "application/json")).run()
    assert not at.exception, [e.value for e in at.exception]
    assert not at.error, [e.value for e in at.error]
    table = at.dataframe[-1].value
    assert {"predicted", "measured"} <= set(table.columns)
    assert "peak memory" not in set(table["component"])
    m = Measured.load(FIXTURE)
    assert (table["measured"] == m.tokens_per_s).any()
    for payload in (b"[" * 100_000, json.dumps({**_raw(), "val_loss": -math.inf}).encode()):
        at.file_uploader(key="measured_file").set_value(
            ("measured.json", payload, "application/json")).run()
        assert not at.exception, [e.value for e in at.exception]
        assert at.error and "\n" not in at.error[-1].value
