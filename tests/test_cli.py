import json
import subprocess
import sys

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
    import runtime.launch
    seen = {}
    monkeypatch.setattr(runtime.launch, "run_plan",
                        lambda plan, steps, extra: seen.update(steps=steps, extra=extra) or 0)
    plan_path = tmp_path / "plan.json"
    assert main(ESTIMATE + ["--out", str(plan_path)]) == 0
    measured = str(tmp_path / "m.json")
    assert main(["run", str(plan_path), "--steps", "3", "--measured", measured, "--",
                 "--data", "x.txt"]) == 0
    assert seen == {"steps": 3, "extra": ["--out", measured, "--data", "x.txt"]}


def test_double_dash_is_refused_outside_run():
    out = subprocess.run([sys.executable, "-m", "planner.cli", "models", "--", "--x"],
                         capture_output=True, text=True)
    assert out.returncode == 2 and "only for `planner run`" in out.stderr
