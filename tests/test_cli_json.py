"""--json on the commands that write files or start processes (run, profile, calibrate, ui,
export): one JSON object on stdout describing the result; errors stay one line on stderr."""

import json
import os
import sys

import pytest

import planner.cli.profile
import planner.cli.run
import planner.cli.ui
from planner.cli import main
from planner.hardware import load_cluster
from planner.job import Job
from planner.measured import ProfileMeasurements
from planner.plan import Layout, Plan
from planner.presets import MODEL_PRESETS
from tests.measured_fixtures import measured_dict

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures")


def _plan(tmp_path):
    plan = Plan(model=MODEL_PRESETS["tiny"], cluster=load_cluster("cpu", 1, num_gpus=2),
                job=Job(global_batch=8, seq_len=64, precision="fp32"),
                layout=Layout(dp=2, micro_batch=2, num_microbatches=2))
    path = tmp_path / "plan.json"
    plan.save(path)
    return plan, path


def _one_object(capsys) -> dict:
    out = capsys.readouterr().out
    obj = json.loads(out)
    assert isinstance(obj, dict)
    return obj


def test_export_json_names_the_file_or_carries_the_text(tmp_path, capsys):
    _, path = _plan(tmp_path)
    assert main(["export", str(path), "--to", "deepspeed", "--json"]) == 0
    obj = _one_object(capsys)
    assert obj["to"] == "deepspeed" and obj["wrote"] is None
    assert json.loads(obj["text"])["train_batch_size"] == 8 and obj["notes"]
    out = tmp_path / "ds.json"
    assert main(["export", str(path), "--to", "torchrun", "--out", str(out), "--json"]) == 0
    obj = _one_object(capsys)
    assert obj == {"to": "torchrun", "wrote": str(out), "bytes": len(out.read_bytes()),
                   "text": None, "notes": []}
    assert "runtime.train" in out.read_text()


def test_run_json_keeps_the_ranks_log_off_stdout(tmp_path, capsys, monkeypatch):
    plan, path = _plan(tmp_path)
    measured = tmp_path / "m.json"

    def fake_launch(cmd):  # what the ranks do: log on descriptor 1, write measured.json
        os.write(1, b"step 1/3 loss 5.0\n")
        measured.write_text(json.dumps(measured_dict(plan, 0.5)))
        return 0
    monkeypatch.setattr(planner.cli.run, "launch", fake_launch)
    assert main(["run", str(path), "--steps", "3", "--measured", str(measured), "--json"]) == 0
    obj = _one_object(capsys)
    assert obj["measured"] == str(measured) and obj["steps"] == 3
    assert obj["step_time_s"] == 0.5 and obj["tokens_per_s"] == pytest.approx(8 * 64 / 0.5)
    assert any(row["component"] == "step time (s)" for row in obj["compare"]), obj["compare"]


def test_run_json_stdout_is_only_the_object(tmp_path, capfd, monkeypatch):
    _, path = _plan(tmp_path)
    monkeypatch.setattr(planner.cli.run, "launch", lambda cmd: os.write(1, b"log\n") and 0)
    assert main(["run", str(path), "--steps", "3", "--measured", str(tmp_path / "m.json"),
                 "--json"]) == 0
    out, err = capfd.readouterr()
    assert json.loads(out)["measured"] is None and "log" in err and "log" not in out


def test_run_json_failure_is_the_ranks_exit_code_and_no_object(tmp_path, capfd, monkeypatch):
    _, path = _plan(tmp_path)
    monkeypatch.setattr(planner.cli.run, "launch", lambda cmd: 3)
    assert main(["run", str(path), "--steps", "3", "--json"]) == 3
    assert capfd.readouterr().out == ""


def test_calibrate_json(tmp_path, capsys):
    from planner.calibration.calibrate import _scaled
    from planner.hardware import load_profile
    from tests.test_calibrate import SINGLE_RANK, _runs_on
    from tests.test_calibrate import _plan as cal_plan
    plans = [cal_plan(layout, seq, num_gpus=1) for seq, layout in SINGLE_RANK]
    _, paths = _runs_on(_scaled(load_profile("cpu"), efficiency=0.5), plans, tmp_path)
    out = tmp_path / "cal.json"
    assert main(["calibrate", *map(str, paths), "--profile", "cpu", "--out", str(out),
                 "--json"]) == 0
    obj = _one_object(capsys)
    assert obj["wrote"] == str(out) and out.is_file()
    assert obj["fitted"]["efficiency"] == pytest.approx(0.5, rel=0.1)
    assert "latency" in obj["left_alone"]
    assert [r["measured"] for r in obj["runs"]] == list(map(str, paths))
    assert obj["mean_abs_error_after"] < obj["mean_abs_error_before"]


def test_profile_json(tmp_path, capsys, monkeypatch):
    from tests.test_profile import _measurements
    m = ProfileMeasurements.from_dict(_measurements())
    monkeypatch.setattr(planner.cli.profile, "_measure", lambda args, tmp: m)
    out = tmp_path / "mine.json"
    assert main(["profile", "--base", "a100-80g", "--out", str(out), "--json"]) == 0
    obj = _one_object(capsys)
    written = json.loads(out.read_text())
    assert obj["wrote"] == str(out) and obj["name"] == "mine" == written["name"]
    assert obj["gemm_efficiency_max"] == written["gpu"]["gemm_efficiency_max"]
    assert obj["allreduce_bandwidth_bytes_per_s"] > 0 and obj["gemm_rms_residual"] < 0.05


def test_ui_json_prints_the_address_then_serves(capfd, monkeypatch):
    calls = []
    monkeypatch.setattr(planner.cli.ui.subprocess, "call",
                        lambda cmd, **kw: calls.append((cmd, kw)) or 0)
    assert main(["ui", "--port", "8600", "--headless", "--json"]) == 0
    obj = json.loads(capfd.readouterr().out)
    assert obj["url"] == "http://localhost:8600" and obj["command"] == calls[0][0]
    assert calls[0][1] == {"stdout": 2}  # Streamlit's own lines on stderr


def test_ui_without_streamlit_names_the_extra(capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "streamlit", None)  # not importable
    assert main(["ui", "--json"]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.strip() == ('planner ui: error: the UI needs streamlit: pip install '
                                    '"parallel-planner[ui]"')


@pytest.mark.parametrize("argv", [["export", "missing.json", "--to", "torchrun", "--json"],
                                  ["run", "missing.json", "--json"],
                                  ["calibrate", "missing.json", "--profile", "cpu", "--out",
                                   "x.json", "--json"]])
def test_json_errors_stay_one_line_on_stderr(argv, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(argv) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and len(captured.err.strip().splitlines()) == 1
