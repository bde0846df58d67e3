import json
import os
import subprocess
import sys

import pytest

from planner.cli import main

ESTIMATE = ["estimate", "--model", "llama2-7b", "--cluster", "a100-80g", "--nodes", "1",
            "--global-batch", "64", "--seq-len", "4096", "--dp", "4", "--tp", "2",
            "--micro-batch", "2", "--sp", "--zero", "1"]


def test_estimate_json_contract(capsys):
    assert main(ESTIMATE + ["--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert isinstance(out["fits"], bool)
    for key in ("total_bytes", "weights_bytes", "gradients_bytes", "optimizer_bytes",
                "activations_bytes"):
        assert out["memory"][key] > 0
    assert out["time"]["step_s"] > 0
    for key in ("tokens_per_s", "tflops_per_gpu", "mfu", "hfu"):
        assert out[key] > 0
    assert out["plan"]["layout"]["dp"] == 4 and out["plan"]["layout"]["zero_stage"] == 1


def test_estimate_text_and_plan_file(tmp_path, capsys):
    assert main(ESTIMATE) == 0
    text = capsys.readouterr().out
    assert "Memory per GPU" in text and "Step time" in text and "MFU" in text
    assert main(ESTIMATE + ["--json"]) == 0
    plan = json.loads(capsys.readouterr().out)["plan"]
    path = tmp_path / "plan.json"
    path.write_text(json.dumps(plan))
    assert main(["estimate", "--plan", str(path), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["plan"] == plan


def test_user_errors_are_one_line_with_exit_code_2():
    cmd = [sys.executable, "-m", "planner.cli"] + ESTIMATE + ["--tp", "3"]
    out = subprocess.run(cmd, capture_output=True, text=True)
    assert out.returncode == 2
    assert out.stderr.strip().count("\n") == 0
    assert "tp=3 must divide num_heads 32" in out.stderr or "does not equal" in out.stderr


def test_usage_errors_are_one_line_too():
    cmd = [sys.executable, "-m", "planner.cli", "estimate", "--micro-batch"]
    out = subprocess.run(cmd, capture_output=True, text=True)
    assert out.returncode == 2
    assert out.stderr.strip().count("\n") == 0 and "--micro-batch" in out.stderr


def test_bf16_on_v100_one_line():
    cmd = [sys.executable, "-m", "planner.cli", "estimate", "--model", "gpt2-1.5b", "--cluster",
           "v100-16g", "--global-batch", "8", "--seq-len", "1024", "--dp", "8"]
    out = subprocess.run(cmd, capture_output=True, text=True)
    assert out.returncode == 2
    assert "precision bf16 is not supported by profile v100-16g" in out.stderr


def test_models_and_profiles_list(capsys):
    assert main(["models"]) == 0
    assert "llama3-405b" in capsys.readouterr().out
    assert main(["profiles", "--json"]) == 0
    names = {p["name"] for p in json.loads(capsys.readouterr().out)}
    assert {"a100-80g", "v100-16g", "cpu"} <= names


def test_run_passes_flags_after_double_dash(monkeypatch, tmp_path):
    import planner.cli.run
    seen = []
    monkeypatch.setattr(planner.cli.run, "launch", lambda cmd: seen.append(cmd) or 0)
    plan_path = tmp_path / "plan.json"
    assert main(ESTIMATE + ["--out", str(plan_path)]) == 0
    measured = str(tmp_path / "m.json")
    assert main(["run", str(plan_path), "--steps", "3", "--measured", measured, "--",
                 "--data", "x.txt"]) == 0
    (cmd,) = seen
    assert cmd[cmd.index("--steps") + 1] == "3"
    assert cmd[-4:] == ["--out", measured, "--data", "x.txt"]


def test_double_dash_is_refused_outside_run():
    out = subprocess.run([sys.executable, "-m", "planner.cli", "models", "--", "--x"],
                         capture_output=True, text=True)
    assert out.returncode == 2 and "only for `planner run`" in out.stderr


def _one_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    return lines[0]


@pytest.mark.parametrize("flag, value", [
    ("--nodes", "1000000000"), ("--nodes", "0"), ("--global-batch", "1e309"),
    ("--seq-len", "9" * 400), ("--micro-batch", "0"), ("--dp", "-1"), ("--zero", "4"),
    ("--virtual-stages", "nan"),
])
def test_numeric_flags_are_bounded_before_anything_runs(flag, value, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(ESTIMATE + [flag, value])
    assert exit_.value.code == 2
    assert f"argument {flag}: " in _one_line(capsys.readouterr().err)


@pytest.mark.parametrize("flag, value", [
    ("--headroom", "1"), ("--headroom", "nan"), ("--token-budget", "inf"),
    ("--target-tokens-per-s", "-1"), ("--top", "0"), ("--rank", "100000"), ("--gpus", "-8"),
    ("--max-tp", "2147483648"),
])
def test_suggest_flags_are_bounded(flag, value, capsys):
    with pytest.raises(SystemExit):
        main(["suggest", "--model", "tiny", "--cluster", "cpu", "--global-batch", "8",
              "--seq-len", "64", flag, value])
    assert f"argument {flag}: " in _one_line(capsys.readouterr().err)


def test_output_paths_are_checked_before_the_work(tmp_path, monkeypatch, capsys):
    import planner.cost.estimate
    monkeypatch.setattr(planner.cost.estimate, "estimate", lambda plan: 1 / 0)
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    for out, message in ((tmp_path / "missing" / "p.json", "does not exist"),
                         ("/dev/full", "is not a regular file"), (fifo, "is not a regular file"),
                         (tmp_path, "is a directory"), ("x" * 300, "File name too long")):
        assert main(ESTIMATE + ["--out", str(out)]) == 2
        assert message in _one_line(capsys.readouterr().err)
    assert main(["simulate", "--plan", "p.json", "--out", str(tmp_path / "t.gif")]) == 2
    assert "unknown format 'gif'" in capsys.readouterr().err


def test_plan_files_are_written_as_plan_save_writes_them(tmp_path):
    from planner.plan import Plan
    out = tmp_path / "plan.json"
    assert main(ESTIMATE + ["--out", str(out)]) == 0
    plan = Plan.load(out)
    plan.save(tmp_path / "again.json")
    assert out.read_text() == (tmp_path / "again.json").read_text()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["again.json", "plan.json"]  # no temp


def test_json_output_is_strict(capsys):
    from planner.cli.common import print_json
    with pytest.raises(ValueError, match=r"non-finite number \(inf\) at \$\.a\[1\]"):
        print_json({"a": [1.0, float("inf")]})
    assert capsys.readouterr().out == ""
    assert main(ESTIMATE + ["--json"]) == 0
    json.loads(capsys.readouterr().out, parse_constant=lambda t: 1 / 0)


def test_unexpected_failures_are_one_line_and_debug_shows_the_traceback(monkeypatch, capsys):
    import planner.cli.models
    monkeypatch.setattr(planner.cli.models, "run", lambda args: [][1])
    assert main(["models"]) == 2
    line = _one_line(capsys.readouterr().err)
    assert line.startswith("planner models: error: internal error (IndexError")
    assert line.endswith("(--debug shows the traceback)")
    assert main(["models", "--debug"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("Traceback") and "IndexError" in err
    assert err.strip().splitlines()[-1].startswith("planner models: error: internal error")


def test_interrupt_exits_130_quietly_and_os_errors_are_one_line(monkeypatch, capsys):
    import planner.cli.models

    def interrupted(args):
        raise KeyboardInterrupt

    monkeypatch.setattr(planner.cli.models, "run", interrupted)
    assert main(["models"]) == 130
    assert capsys.readouterr().err == ""

    def disk_full(args):
        raise OSError(28, "No space left on device", "/data/plan.json")

    monkeypatch.setattr(planner.cli.models, "run", disk_full)
    assert main(["models"]) == 2
    assert _one_line(capsys.readouterr().err) == \
        "planner models: error: No space left on device: /data/plan.json"


def test_control_characters_never_break_the_line(capsys):
    assert main(["estimate", "--model", "two\nlines.json", "--cluster", "cpu",
                 "--global-batch", "8", "--seq-len", "64"]) == 2
    assert "two\\nlines.json" in _one_line(capsys.readouterr().err)
    with pytest.raises(SystemExit):
        main(["models", "a\nb"])
    assert "a\\nb" in _one_line(capsys.readouterr().err)


def test_suggest_json_with_nothing_fitting_keeps_stderr_to_one_line(capsys):
    assert main(["suggest", "--model", "llama2-70b", "--cluster", "a100-80g", "--gpus", "7",
                 "--global-batch", "7", "--seq-len", "4096", "--json"]) == 2
    captured = capsys.readouterr()
    assert json.loads(captured.out) == []
    assert "nothing fits on 7 GPUs" in _one_line(captured.err)


def test_a_fifo_input_and_a_closed_pipe_in_a_real_process(tmp_path):
    fifo = tmp_path / "model.json"
    os.mkfifo(fifo)
    cmd = [sys.executable, "-m", "planner.cli", "estimate", "--model", str(fifo), "--cluster",
           "cpu", "--global-batch", "8", "--seq-len", "64"]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    assert out.returncode == 2 and "is not a regular file" in _one_line(out.stderr)
    reader = subprocess.Popen([sys.executable, "-m", "planner.cli", "models", "--json"],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    reader.stdout.close()  # the reader goes away before the output is written (`| head -0`)
    assert reader.wait(timeout=60) == 0
    assert reader.stderr.read() == b""
