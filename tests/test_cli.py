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


def test_bf16_on_v100_one_line_naming_the_default():
    cmd = [sys.executable, "-m", "planner.cli", "estimate", "--model", "gpt2-1.5b", "--cluster",
           "v100-16g", "--global-batch", "8", "--seq-len", "1024", "--dp", "8"]
    out = subprocess.run(cmd, capture_output=True, text=True)
    assert out.returncode == 2
    assert _one_line(out.stderr) == (
        "planner estimate: error: precision bf16 (the default of --precision) is not supported "
        "by profile v100-16g (V100-SXM2-16GB supports fp16, fp32); use --precision fp16")


def test_a_refused_flag_is_named_whether_given_or_default(capsys):
    v100 = ["--model", "gpt2-1.5b", "--cluster", "v100-16g", "--global-batch", "8",
            "--seq-len", "1024"]
    assert main(["suggest", *v100]) == 2
    assert "precision bf16 (the default of --precision) is not supported" in \
        _one_line(capsys.readouterr().err)
    assert main(["estimate", *v100, "--dp", "8", "--precision", "bf16"]) == 2
    assert "error: --precision bf16 is not supported by profile v100-16g" in \
        _one_line(capsys.readouterr().err)
    a100 = ["estimate", "--model", "llama2-7b", "--cluster", "a100-80g", "--global-batch", "8",
            "--seq-len", "1024"]
    assert main([*a100, "--tp", "2"]) == 2
    assert _one_line(capsys.readouterr().err).endswith(
        "does not equal the cluster's 8 GPUs; from --dp 1 (default), --tp 2, --pp 1 (default)")
    assert main([*a100, "--pp", "8", "--micro-batch", "2"]) == 2
    assert _one_line(capsys.readouterr().err).endswith(
        "as stages (pp=8); from --schedule 1f1b (default), --pp 8, --micro-batch 2")


def test_given_flags_tell_a_flag_from_a_default():
    from planner.cli import build_parser, given_flags
    parser = build_parser()
    argv = ["estimate", "--model", "tiny", "--precision", "bf16", "--dp", "1", "--sp"]
    given = given_flags(parser, argv)
    assert {"model", "precision", "dp", "sp", "command"} <= given
    assert not {"tp", "pp", "schedule", "nodes", "json"} & given
    assert parser.parse_args(argv).tp == 1  # the defaults are back


def test_bare_planner_lists_the_commands_and_version_exists():
    out = subprocess.run([sys.executable, "-m", "planner.cli"], capture_output=True, text=True)
    assert out.returncode == 0 and out.stderr == ""
    for command in ("estimate", "suggest", "run", "export", "ui"):
        assert f"    {command}" in out.stdout
    out = subprocess.run([sys.executable, "-m", "planner.cli", "--version"], capture_output=True,
                         text=True)
    assert out.returncode == 0 and out.stdout.startswith("planner ")


def test_every_help_shows_the_defaults():
    import argparse

    from planner.cli import COMMANDS, _parsers, build_parser
    parsers = _parsers(build_parser())
    assert len(parsers) == len(COMMANDS) + 1
    for parser in parsers:
        formatter = parser._get_formatter()
        for action in parser._actions:
            default = action.default
            if (not action.option_strings or default is None or default is argparse.SUPPRESS
                    or isinstance(default, bool)):
                continue
            text = formatter._get_help_string(action)
            assert "default" in text, f"{parser.prog} {action.option_strings[0]}: {text!r}"
    estimate = next(p for p in parsers if p.prog.endswith(" estimate"))
    text = " ".join(estimate.format_help().split())
    assert "(default: bf16)" in text and "--dp DP data-parallel degree (default: 1)" in text


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
    monkeypatch.setattr(planner.cli.run, "cuda_devices", lambda: ("2.13.0", 8))
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


# --- planner run: the plan against this host, before anything starts ------------------------

def _plan_file(tmp_path, name, *flags):
    path = tmp_path / name
    assert main(["estimate", *flags, "--out", str(path)]) == 0
    return str(path)


GPU_PLAN = ESTIMATE[1:]  # llama2-7b on 8 A100s
CPU_PLAN = ["--model", "tiny", "--cluster", "cpu", "--global-batch", "16", "--seq-len", "64",
            "--precision", "fp32", "--dp", "8", "--micro-batch", "2"]


@pytest.fixture
def host(monkeypatch):
    """planner run with the launch recorded (argv and the CUDA_VISIBLE_DEVICES it ran with)
    and torch's GPU count set by the test."""
    import planner.cli.run
    seen = []
    monkeypatch.setattr(planner.cli.run, "launch", lambda cmd: seen.append(
        (cmd, os.environ.get("CUDA_VISIBLE_DEVICES"))) or 0)
    state = {"gpus": 0, "version": "2.13.0+cpu"}
    monkeypatch.setattr(planner.cli.run, "cuda_devices", lambda: (state["version"],
                                                                  state["gpus"]))
    state["launches"] = seen
    return state


def test_run_refuses_a_gpu_plan_without_cuda_saying_how_to_plan_here(tmp_path, host, capsys):
    plan = _plan_file(tmp_path, "gpu.json", *GPU_PLAN)
    capsys.readouterr()
    assert main(["run", plan]) == 2
    line = _one_line(capsys.readouterr().err)
    assert line.startswith("planner run: error: the plan is for 8 GPU(s) (profile a100-80g, "
                           "A100-SXM4-80GB) but torch 2.13.0+cpu, a CPU-only build, finds no "
                           "CUDA device on this host")
    assert "--cluster cpu (planner suggest --model llama2-7b --cluster cpu" in line
    # a multi-node GPU plan: the missing GPUs are said first
    two = _plan_file(tmp_path, "gpu2.json", *GPU_PLAN, "--nodes", "2", "--dp", "8")
    capsys.readouterr()
    assert main(["run", two]) == 2
    assert "finds no CUDA device" in _one_line(capsys.readouterr().err)
    assert host["launches"] == []


def test_run_refuses_more_gpus_or_nodes_than_the_host_has(tmp_path, host, capsys):
    plan = _plan_file(tmp_path, "gpu.json", *GPU_PLAN)
    two = _plan_file(tmp_path, "gpu2.json", *GPU_PLAN, "--nodes", "2", "--dp", "8")
    host.update(gpus=1, version="2.13.0")
    capsys.readouterr()
    assert main(["run", plan]) == 2
    assert "the plan needs 8 GPUs on this host and torch sees 1; plan for 1 with --gpus 1" in \
        _one_line(capsys.readouterr().err)
    host.update(gpus=8)
    assert main(["run", two]) == 2
    assert "the plan spans 2 nodes and `planner run` starts this host only" in \
        _one_line(capsys.readouterr().err)
    assert host["launches"] == []
    assert main(["run", plan, "--steps", "2"]) == 0  # 8 GPUs here: it starts, on them
    ((_, visible),) = host["launches"]
    assert visible == os.environ.get("CUDA_VISIBLE_DEVICES")


def test_run_of_a_cpu_plan_hides_cuda_and_checks_cores_and_memory(tmp_path, host, capsys,
                                                                   monkeypatch):
    import planner.cli.run
    plan = _plan_file(tmp_path, "cpu.json", *CPU_PLAN)
    assert main(["run", plan, "--steps", "2", "--measured", str(tmp_path / "m.json")]) == 0
    ((_, visible),) = host["launches"]
    assert visible == ""  # the ranks run on the CPU the plan is for, CUDA or not
    assert "CUDA_VISIBLE_DEVICES" not in os.environ or os.environ["CUDA_VISIBLE_DEVICES"] != ""
    monkeypatch.setattr(planner.cli.run, "host_cores", lambda: 1)
    monkeypatch.setattr(planner.cli.run, "MAX_PROCS_PER_CORE", 4)
    capsys.readouterr()
    assert main(["run", plan]) == 2
    assert "the plan starts 8 processes and this host has 1 core(s)" in \
        _one_line(capsys.readouterr().err)
    monkeypatch.setattr(planner.cli.run, "MAX_PROCS_PER_CORE", 8)
    monkeypatch.setattr(planner.cli.run, "available_memory_bytes", lambda: 2**30)
    assert main(["run", plan]) == 2
    assert "GiB available" in _one_line(capsys.readouterr().err)
    assert len(host["launches"]) == 1


def test_cuda_devices_asks_torch_in_a_subprocess():
    from planner.cli.run import cuda_devices
    version, count = cuda_devices()
    assert version[0].isdigit() and count >= 0


def test_run_takes_the_training_flags_itself(tmp_path, host, capsys):
    plan = _plan_file(tmp_path, "cpu.json", *CPU_PLAN)
    data = tmp_path / "corpus.txt"
    data.write_text("text " * 100)
    argv = ["run", plan, "--steps", "3", "--lr", "1e-3", "--resume", "--checkpoint-dir", "ck",
            "--data", str(data), "--", "--warmup", "1"]
    assert main(argv) == 0
    ((cmd, _),) = host["launches"]
    tail = cmd[cmd.index("--out"):]
    assert tail[2:] == ["--data", str(data), "--checkpoint-dir", "ck", "--resume", "--lr",
                        "1e-3", "--warmup", "1"]
    with pytest.raises(SystemExit):
        main(["run", plan, "--lr", "fast"])
    assert "argument --lr: expected float, got 'fast'" in _one_line(capsys.readouterr().err)
    assert main(["run", plan, "--data", str(tmp_path / "missing.txt")]) == 2
    assert "no such file or directory" in _one_line(capsys.readouterr().err)
    out = subprocess.run([sys.executable, "-m", "planner.cli", "run", "--help"],
                         capture_output=True, text=True)
    for flag in ("--checkpoint-dir DIR", "--resume", "--data PATH", "--lr LR", "--timeout"):
        assert flag in out.stdout


# --- estimate --gpus: part of a node, as suggest --gpus (planner.hardware.with_gpus) ---------
ONE_H100 = ["--model", "llama3-8b", "--cluster", "h100-80g", "--global-batch", "8",
            "--seq-len", "2048", "--micro-batch", "1", "--zero", "0"]


def test_estimate_on_part_of_a_node(capsys):
    assert main(["estimate", *ONE_H100, "--gpus", "1", "--json"]) == 0
    one = json.loads(capsys.readouterr().out)
    assert one["plan"]["cluster"]["num_gpus"] == 1 and one["plan"]["layout"]["dp"] == 1
    assert one["memory"]["nccl_buffers_bytes"] == 0  # one rank: no communicator
    assert main(["estimate", *ONE_H100, "--gpus", "4", "--dp", "4", "--json"]) == 0
    four = json.loads(capsys.readouterr().out)
    assert four["plan"]["cluster"]["num_gpus"] == 4
    # the world group is the dp group (an axis spanning the world): one communicator
    assert four["memory"]["num_communicators"] == 1
    assert four["memory"]["nccl_buffers_bytes"] > 0
    assert main(["estimate", *ONE_H100, "--gpus", "4", "--dp", "4"]) == 0
    text = capsys.readouterr().out
    assert "on 4 x H100-SXM5-80GB" in text and "NCCL buffers" in text
    assert "1 communicator(s)" in text


def test_estimate_and_suggest_share_the_gpus_refusals(capsys):
    for command in (["estimate", *ONE_H100], ["suggest", *ONE_H100[:-4]]):
        assert main([*command, "--gpus", "9"]) == 2
        assert _one_line(capsys.readouterr().err).endswith(
            "num_gpus 9 exceeds 1 node(s) x 8 GPUs; from --gpus 9, --nodes 1 (default)")
        assert main([*command, "--gpus", "4", "--nodes", "2"]) == 2
        assert "num_gpus 4 fills 1 node(s) of 8 GPUs but 2 were given; give 1 node(s)" in \
            _one_line(capsys.readouterr().err)


def test_estimate_gpus_refuses_a_layout_of_another_size_and_a_plan_file(tmp_path, capsys):
    assert main(["estimate", *ONE_H100, "--gpus", "4", "--dp", "2"]) == 2
    assert "does not equal the cluster's 4 GPUs; from --dp 2, --tp 1 (default), --pp 1 " \
           "(default), --gpus 4" in _one_line(capsys.readouterr().err)
    plan = tmp_path / "plan.json"
    assert main(["estimate", *ONE_H100, "--gpus", "1", "--out", str(plan)]) == 0
    capsys.readouterr()
    assert main(["estimate", "--plan", str(plan), "--gpus", "2"]) == 2
    assert "--gpus 2 cannot change a --plan" in _one_line(capsys.readouterr().err)
    assert main(["estimate", "--plan", str(plan), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["plan"]["cluster"]["num_gpus"] == 1
