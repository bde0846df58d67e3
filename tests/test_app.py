"""The Streamlit page, headless (streamlit.testing.v1.AppTest), and its upload parsing."""

import json
import pickle
import re
from pathlib import Path

import pytest

pytest.importorskip("streamlit")
from streamlit.testing.v1 import AppTest  # noqa: E402

from app.uploads import (  # noqa: E402
    measured_from_upload,
    model_from_upload,
    parse_json_bytes,
    profile_from_upload,
)

APP = str(Path(__file__).resolve().parents[1] / "app" / "streamlit_app.py")
HF_LLAMA = {"model_type": "llama", "num_hidden_layers": 4, "hidden_size": 256,
            "num_attention_heads": 8, "num_key_value_heads": 4, "intermediate_size": 688,
            "vocab_size": 1000, "max_position_embeddings": 512}


def _app(model="llama3-8b", nodes=1, batch=64, seq=2048) -> AppTest:
    at = AppTest.from_file(APP, default_timeout=60)
    at.run()
    at.selectbox(key="model").set_value(model)
    at.number_input(key="nodes").set_value(nodes)
    at.number_input(key="global_batch").set_value(batch)
    at.number_input(key="seq_len").set_value(seq)
    return at.run()


def _ok(at: AppTest) -> None:
    assert not at.exception, [e.value for e in at.exception]


def _charts(at: AppTest) -> list:
    return [c.proto.spec for c in at.get("vega_lite_chart")]


def _ranked(at: AppTest) -> list:
    return [o for o in at.selectbox(key="pick").options if o.startswith("#")]


def _text(element) -> str:
    """An st.error / st.warning / st.caption body as it reads on the page (escapes removed)."""
    return re.sub(r"\\(.)", r"\1", element.value)


def test_page_runs_without_exception():
    at = AppTest.from_file(APP, default_timeout=60).run()
    _ok(at)
    assert at.title[0].value == "Parallelism planner"
    assert at.sidebar.number_input(key="nodes").value == 4
    assert not at.error and at.selectbox(key="pick").options[0].startswith("#1")


def test_node_count_reranks_plans():
    at = _app(nodes=1)
    _ok(at)
    one_node = _ranked(at)
    assert one_node and not at.error
    at.number_input(key="nodes").set_value(4).run()
    _ok(at)
    four_nodes = _ranked(at)
    assert four_nodes and four_nodes != one_node
    assert "32 x" in at.caption[0].value


def test_selecting_a_plan_updates_charts():
    at = _app()
    ranked = _ranked(at)
    assert len(ranked) >= 2 and len(_charts(at)) >= 3
    before = _charts(at)
    metrics_before = [m.value for m in at.metric]
    at.selectbox(key="pick").set_value(ranked[1]).run()
    _ok(at)
    after = _charts(at)
    assert after != before
    assert "datum.plan === '#1'" in before[0] and "datum.plan === '#2'" in after[0]
    assert "datum.plan === '#2'" in after[1]          # memory and time bars highlight #2
    assert [m.value for m in at.metric] != metrics_before


def test_hand_set_layout_gives_estimate_or_one_line_error():
    at = _app(batch=64)
    at.selectbox(key="pick").set_value("set by hand").run()
    for k, v in {"hand_dp": 2, "hand_tp": 2, "hand_pp": 2, "hand_micro_batch": 1,
                 "hand_num_microbatches": 32}.items():
        at.number_input(key=k).set_value(v)
    at.number_input(key="hand_virtual_stages").set_value(1)
    at.selectbox(key="hand_schedule").set_value("1f1b")
    at.selectbox(key="hand_zero_stage").set_value(1)
    at.checkbox(key="hand_sp").uncheck()
    at.run()
    _ok(at)
    assert not at.error, [e.value for e in at.error]
    assert [m.label for m in at.metric][:3] == ["memory / GPU", "step time", "tokens / s"]
    assert len(_charts(at)) >= 3                      # memory, time, timeline
    assert at.get("download_button")
    at.number_input(key="hand_tp").set_value(3).run()
    _ok(at)
    assert len(at.error) == 1 and "\n" not in at.error[0].value
    assert "does not equal the cluster's 8 GPUs" in at.error[0].value
    at.number_input(key="hand_tp").set_value(2)
    at.selectbox(key="hand_mesh_order").set_value("tp,pp,dp")
    at.text_input(key="hand_layers").set_value("3,x").run()
    _ok(at)
    assert len(at.error) == 1 and "layers_per_stage must be a list" in _text(at.error[0])
    steps = []
    for layers in ("", "4,28"):  # llama3-8b: 32 layers over pp=2
        at.text_input(key="hand_layers").set_value(layers).run()
        _ok(at)
        assert not at.error, [e.value for e in at.error]
        steps.append(at.metric[1].value)
    assert steps[0] != steps[1]                       # an uneven split moves the step time
    at.text_input(key="hand_layers").set_value("1,2").run()
    assert "layers_per_stage sums to 3" in _text(at.error[0])


BAD_MODEL_UPLOADS = [
    (b"{not json", "not valid JSON"),
    (pickle.dumps({"a": 1}), "not"),
    (b"[1, 2]", "expected a JSON object"),
    (json.dumps({"name": "x"}).encode(), "missing key"),
    (json.dumps({**HF_LLAMA, "model_type": "t5"}).encode(), "unsupported model_type"),
    (b" " * 1_000_001, "limit"),
]


def test_bad_model_upload_shows_error_not_traceback():
    at = AppTest.from_file(APP, default_timeout=60).run()
    at.selectbox(key="model").set_value("upload a JSON file...").run()
    for payload, phrase in BAD_MODEL_UPLOADS:
        at.sidebar.file_uploader[0].set_value(("model.json", payload, "application/json")).run()
        _ok(at)
        assert at.error and phrase in _text(at.error[0]), [e.value for e in at.error]
        assert "Traceback" not in at.error[0].value and "\n" not in at.error[0].value
    at.sidebar.file_uploader[0].set_value(
        ("tiny-llama.json", json.dumps(HF_LLAMA).encode(), "application/json")).run()
    _ok(at)
    assert not at.error and "tiny-llama on 32 x" in at.caption[0].value


def test_bad_measured_upload_shows_error():
    at = _app(model="gpt2-124m", batch=64, seq=1024)
    at.selectbox(key="pick").set_value("set by hand").run()
    for k, v in {"hand_dp": 8, "hand_tp": 1, "hand_pp": 1, "hand_micro_batch": 1,
                 "hand_num_microbatches": 8, "hand_virtual_stages": 1}.items():
        at.number_input(key=k).set_value(v)
    at.selectbox(key="hand_schedule").set_value("1f1b")
    at.checkbox(key="hand_sp").uncheck()
    at.run()
    assert not at.error, [e.value for e in at.error]
    measured = json.loads((Path(__file__).parent / "fixtures" / "measured_cpu_dp2.json")
                          .read_text())  # a real CPU run's measured.json (tests/test_measured.py)
    at.file_uploader(key="measured_file").set_value(
        ("measured.json", json.dumps({**measured, "step_time_s": "fast"}).encode(),
         "application/json"))
    at.run()
    _ok(at)
    assert any("step_time_s must be a" in _text(e) and "'fast'" in _text(e) for e in at.error)


def test_upload_parsing_is_strict():
    assert model_from_upload(json.dumps(HF_LLAMA).encode(), "tiny-llama.json").num_layers == 4
    with pytest.raises(ValueError, match="not a valid JSON number"):
        parse_json_bytes(b'{"x": NaN}', "f")
    with pytest.raises(ValueError, match="not UTF-8"):
        parse_json_bytes(b"\xff\xfe{}", "f")
    with pytest.raises(ValueError, match="hardware profile"):
        profile_from_upload(b'{"name": "x"}', "p.json")
    with pytest.raises(ValueError, match="schema_version"):
        measured_from_upload(b'{"schema_version": 2}', "m.json")
    path = Path(__file__).resolve().parents[1] / "hardware_profiles" / "a100-80g.json"
    assert profile_from_upload(path.read_bytes()).gpus_per_node == 8


def test_measured_upload_shows_predicted_vs_measured():
    from planner.hardware import load_cluster
    from planner.job import Job
    from planner.plan import Layout, Plan
    from planner.presets import load_model

    plan = Plan(model=load_model("gpt2-124m"), cluster=load_cluster("a100-80g", 1),
                job=Job(global_batch=64, seq_len=1024),
                layout=Layout(dp=8, micro_batch=1, num_microbatches=8))
    ranks = [{"rank": r, "coords": {"pp": 0, "dp": r, "tp": 0}, "weights_bytes": 2.5e8,
              "gradients_bytes": 2.5e8, "optimizer_bytes": 1.5e9,
              "activation_bytes_per_microbatch": 1e9, "activation_peak_bytes": 1e9,
              "peak_allocated_bytes": 6e9, "max_rss_bytes": 1e9} for r in range(8)]
    measured = {"schema_version": 1, "plan": plan.to_dict(), "steps": [], "val_loss": 3.0,
                "step_time_s": 0.5, "tokens_per_s": 131072.0, "ranks": ranks}
    at = _app(model="gpt2-124m", batch=64, seq=1024)
    at.file_uploader(key="measured_file").set_value(
        ("measured.json", json.dumps(measured).encode(), "application/json")).run()
    _ok(at)
    assert not at.error, [e.value for e in at.error]
    table = at.dataframe[-1].value
    assert {"predicted", "measured"} <= set(table.columns)
    assert (table["measured"] == 131072.0).any()


def test_by_hand_starts_from_the_inspected_plan():
    at = _app()
    second = _ranked(at)[1]
    at.selectbox(key="pick").set_value(second).run()
    metrics = [m.value for m in at.metric]
    at.selectbox(key="pick").set_value("set by hand").run()
    _ok(at)
    assert [m.value for m in at.metric] == metrics   # same layout, now editable
    assert f"dp={at.number_input(key='hand_dp').value} " in second


def test_planner_ui_command():
    import argparse

    from planner.cli.ui import APP as UI_APP
    from planner.cli.ui import command
    cmd = command(argparse.Namespace(port=8999, headless=True))
    assert UI_APP.is_file() and cmd[1:4] == ["-m", "streamlit", "run"]
    assert "8999" in cmd and "--server.maxUploadSize" in cmd


def test_memory_chart_draws_the_search_limit_after_headroom():
    from app.charts import memory_chart
    from planner.cost.estimate import estimate
    from planner.hardware import load_cluster
    from planner.job import Job
    from planner.plan import Layout, Plan
    from planner.presets import MODEL_PRESETS
    plan = Plan(model=MODEL_PRESETS["llama2-7b"], cluster=load_cluster("a100-80g", 1),
                job=Job(global_batch=64, seq_len=4096),
                layout=Layout(dp=8, zero_stage=1, micro_batch=1, num_microbatches=8))
    est = estimate(plan).to_dict()
    capacity = est["memory"]["capacity_bytes"]

    def rules(chart) -> dict:
        spec = chart.to_dict()
        rows = [r for data in spec["datasets"].values() for r in data if "label" in r]
        return {r["label"]: r["GiB"] for r in rows}
    limits = rules(memory_chart({"#1": est}, capacity, "#1", headroom=0.1))
    assert limits["search limit (10% headroom)"] == pytest.approx(0.9 * limits["GPU memory"])
    assert list(rules(memory_chart({"#1": est}, capacity, "#1"))) == ["GPU memory"]


def test_messages_are_shown_literally_not_as_markdown():
    from app.streamlit_app import plain
    assert plain("dp*tp*pp = 8*4*2 = 64") == "dp\\*tp\\*pp = 8\\*4\\*2 = 64"
    assert plain("layers_per_stage $5 <b> [x](y)") == \
        "layers\\_per\\_stage \\$5 \\<b\\> \\[x\\](y)"
    assert plain("- a\n12. b\n# c") == "\\- a\n12\\. b\n\\# c"
    at = _app(batch=64)
    at.selectbox(key="pick").set_value("set by hand").run()
    at.number_input(key="hand_tp").set_value(3).run()
    _ok(at)
    (error,) = at.error
    assert "dp\\*tp\\*pp = " in error.value            # markdown shows dp*tp*pp, not italics
    assert re.search(r"dp\*tp\*pp = \d+\*3\*\d+ = \d+ does not equal", _text(error))


def test_what_if_starts_again_when_the_inputs_change():
    at = _app(batch=64)                                   # llama3-8b: 32 heads
    at.selectbox(key="pick").set_value("set by hand").run()
    for k, v in {"hand_dp": 1, "hand_tp": 8, "hand_pp": 1, "hand_micro_batch": 1,
                 "hand_num_microbatches": 64, "hand_virtual_stages": 1}.items():
        at.number_input(key=k).set_value(v)
    at.selectbox(key="hand_zero_stage").set_value(0)
    at.selectbox(key="hand_schedule").set_value("1f1b")
    at.run()
    _ok(at)
    assert not at.error, [e.value for e in at.error]
    at.selectbox(key="model").set_value("gpt2-124m")      # 12 heads: tp=8 is invalid there
    at.number_input(key="seq_len").set_value(1024).run()
    _ok(at)
    assert not at.error, [e.value for e in at.error]      # not the old layout, shown as invalid
    hand = {k: at.number_input(key=f"hand_{k}").value for k in ("dp", "tp", "pp")}
    assert f"dp={hand['dp']} tp={hand['tp']} pp={hand['pp']} " in _ranked(at)[0]


def test_nothing_fits_box_says_what_would_fit():
    at = _app(model="llama3-70b", nodes=1, batch=8, seq=4096)
    at.select_slider(key="max_tp").set_value(2).run()
    _ok(at)
    box = _text(at.error[0])
    assert box.startswith("Nothing fits: every valid layout of 8 GPUs needs more than")
    assert "least memory:" in box and "more node(s)" in box and "fit:" in box
    # the what-if starts from that least-memory layout: valid, and it does not fit
    assert not any("Invalid layout" in e.value for e in at.error), [e.value for e in at.error]
    assert _text(at.error[1]).startswith("Does not fit") and at.metric[4].value == "NO"


def test_step_times_are_shown_in_their_unit():
    at = AppTest.from_file(APP, default_timeout=60).run()  # llama3-70b, 4 nodes, 256 x 4096
    _ok(at)
    steps = list(at.dataframe[0].value["step"])
    assert steps and all(s.endswith(" s") and float(s[:-2]) > 1 for s in steps), steps


def test_compile_checkbox_speeds_up_the_hand_set_layout_or_names_the_rule():
    at = _app(batch=64)
    at.selectbox(key="pick").set_value("set by hand").run()
    for k, v in {"hand_dp": 8, "hand_tp": 1, "hand_pp": 1, "hand_micro_batch": 1,
                 "hand_num_microbatches": 8, "hand_virtual_stages": 1}.items():
        at.number_input(key=k).set_value(v)
    at.selectbox(key="hand_schedule").set_value("1f1b")
    at.selectbox(key="hand_zero_stage").set_value(3)
    at.checkbox(key="hand_sp").uncheck()
    at.checkbox(key="hand_compile").uncheck().run()
    _ok(at)
    assert not at.error, [e.value for e in at.error]
    eager = at.metric[1].value
    at.checkbox(key="hand_compile").check().run()
    _ok(at)
    assert not at.error, [e.value for e in at.error]
    assert at.metric[1].value != eager                # compiled blocks move the step time
    at.number_input(key="hand_dp").set_value(4)
    at.number_input(key="hand_tp").set_value(2)
    at.number_input(key="hand_num_microbatches").set_value(16).run()
    _ok(at)
    assert len(at.error) == 1 and "compile with tp=2 fails" in _text(at.error[0])


def test_fp8_recipe_selector_and_gain():
    at = _app(nodes=1, batch=8, seq=4096)
    assert "fp8_recipe" not in [s.key for s in at.selectbox]  # only under fp8
    at.selectbox(key="profile").set_value("h100-80g")
    at.selectbox(key="precision").set_value("fp8")
    at.run()
    _ok(at)
    assert at.selectbox(key="fp8_recipe").options == ["tensorwise", "rowwise", "delayed"]
    at.selectbox(key="fp8_recipe").set_value("rowwise")
    at.run()
    _ok(at)
    assert any("FP8 (rowwise)" in _text(i) for i in at.info)


def test_lora_widgets_change_the_ranked_plans_and_their_memory():
    at = _app(batch=64)
    _ok(at)
    full = _ranked(at)
    at.checkbox(key="lora").check().run()
    at.number_input(key="lora_rank").set_value(16)
    at.multiselect(key="lora_targets").set_value(["q", "v"]).run()
    _ok(at)
    assert not at.error, [e.value for e in at.error]
    lora = _ranked(at)
    assert lora and lora != full
    at.multiselect(key="lora_targets").set_value(["fc"]).run()
    _ok(at)
    assert any("lora target 'fc' is not in llama3-8b" in _text(e) for e in at.error)
    at.multiselect(key="lora_targets").set_value(["q"])
    at.selectbox(key="task").set_value("classify").run()
    _ok(at)
    assert at.number_input(key="num_labels").value == 2 and _ranked(at)
