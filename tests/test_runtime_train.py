"""The training CLI: faults end every rank with one line and a non-zero exit; a real torchrun
run writes measured.json, survives a kill and resumes."""

import contextlib
import io
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from runtime_dist import Layout, make_plan, run_world

PLAN2 = Layout(dp=2, micro_batch=2, num_microbatches=2, zero_stage=2)
SLOW = Layout(dp=2, micro_batch=8, num_microbatches=4, zero_stage=2)  # ~0.3 s a step
ROOT = Path(__file__).resolve().parent.parent


def _main_rank(argv: list) -> tuple:
    """runtime.train.main on this rank: (exit code, stderr, stdout)."""
    from runtime.train import main
    err, out = io.StringIO(), io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(out):
        code = main(argv)
    return code, err.getvalue(), out.getvalue()


def _cli(tmp_path, layout, *args, world=2) -> list:
    plan = tmp_path / "plan.json"
    make_plan(layout).save(plan)
    argv = ["--plan", str(plan), "--data-cap-mb", "1", "--timeout", "30", *map(str, args)]
    return run_world(world, _main_rank, argv, timeout_s=120)


def _one_line_everywhere(results, code, text):
    for rank, (got, err, _) in enumerate(results):
        assert got == code
        assert err.count("\n") == 1 and f"[rank {rank}]" in err and text in err, err


def test_wrong_world_size(tmp_path):
    results = _cli(tmp_path, Layout(dp=4, micro_batch=1), "--steps", 1)
    _one_line_everywhere(results, 2, "the plan needs 4 processes")


def test_missing_data(tmp_path):
    results = _cli(tmp_path, PLAN2, "--steps", 1, "--data", tmp_path / "nope.txt")
    _one_line_everywhere(results, 2, "data path not found")


def test_unreadable_checkpoint(tmp_path):
    bad = tmp_path / "ck" / "step_00000002"
    bad.mkdir(parents=True)
    (bad / ".metadata").write_bytes(b"not a checkpoint")
    results = _cli(tmp_path, PLAN2, "--steps", 3, "--checkpoint-dir", tmp_path / "ck",
                   "--resume")
    _one_line_everywhere(results, 2, "is unreadable")


def test_bad_plan_file(tmp_path):
    results = run_world(1, _main_rank, ["--plan", str(tmp_path / "none.json"), "--steps", "1"])
    _one_line_everywhere(results, 2, "plan file not found")


def test_nonfinite_loss_stops_and_keeps_last_good_checkpoint(tmp_path):
    results = _cli(tmp_path, PLAN2, "--steps", 5, "--lr", 1e12, "--grad-clip", 0,
                   "--warmup", 1, "--checkpoint-dir", tmp_path / "ck", "--checkpoint-every", 1)
    _one_line_everywhere(results, 3, "stopping")
    from runtime.checkpoint import latest
    last = latest(tmp_path / "ck")
    step = int(results[0][1].split("loss is ")[1].split("at step ")[1].split(";")[0])
    assert last is not None and int(last.name.split("_")[1]) == step - 1


def _torchrun(plan, steps, *args) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
           "--nproc-per-node=2", "-m", "runtime.train", "--plan", str(plan),
           "--steps", str(steps), "--data-cap-mb", "1", *map(str, args)]
    return subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)


def _kill_tree(pid: int) -> None:
    """SIGKILL a process and all its descendants (torchrun starts workers in new sessions)."""
    def children(p):
        try:
            return [int(c) for c in Path(f"/proc/{p}/task/{p}/children").read_text().split()]
        except OSError:
            return []
    todo, found = [pid], []
    while todo:
        p = todo.pop()
        found.append(p)
        todo += children(p)
    for p in found:
        with contextlib.suppress(ProcessLookupError):
            os.kill(p, signal.SIGKILL)
    # gone (or a zombie: its files, and so the checkpoint directory's flock, are released)
    deadline = time.monotonic() + 60
    while any(_alive(p) for p in found) and time.monotonic() < deadline:
        time.sleep(0.05)


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def _reference_losses(plan: Path, steps: int, out: Path) -> list:
    """The same command, uninterrupted, on forked ranks."""
    argv = ["--plan", str(plan), "--steps", str(steps), "--data-cap-mb", "1", "--out", str(out)]
    assert [r[0] for r in run_world(2, _main_rank, argv)] == [0, 0]
    return [s["loss"] for s in json.loads(out.read_text())["steps"]]


def test_torchrun_kill_and_resume(tmp_path):
    """Real torchrun: killed once a checkpoint exists, then resumed to the end; the resumed
    losses are those of an uninterrupted run, and measured.json compares with the plan."""
    steps, ck = 12, tmp_path / "ck"
    plan = tmp_path / "plan.json"
    make_plan(SLOW).save(plan)
    first = _torchrun(plan, steps, "--checkpoint-dir", ck, "--checkpoint-every", 1)
    deadline = time.monotonic() + 180
    while not (ck / "step_00000003").is_dir() and first.poll() is None:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    _kill_tree(first.pid)
    first.wait()
    second = _torchrun(plan, steps, "--checkpoint-dir", ck, "--resume",
                       "--out", tmp_path / "measured.json")
    log, _ = second.communicate(timeout=240)
    assert second.returncode == 0, log
    assert "resumed from" in log and "validation loss" in log
    measured = json.loads((tmp_path / "measured.json").read_text())
    start = measured["steps"][0]["step"]
    assert 3 <= start < steps and [s["step"] for s in measured["steps"]] == list(
        range(start, steps))
    want = _reference_losses(plan, steps, tmp_path / "ref.json")[start:]
    got = [s["loss"] for s in measured["steps"]]
    assert max(abs(a - b) for a, b in zip(got, want)) < 1e-6
    _check_measured(measured)


def _check_measured(measured: dict) -> None:
    assert measured["schema_version"] == 1 and measured["val_loss"] > 0
    assert measured["step_time_s"] > 0 and measured["tokens_per_s"] > 0
    for rank in measured["ranks"]:
        assert set(rank) >= {"rank", "coords", "weights_bytes", "gradients_bytes",
                             "optimizer_bytes", "activation_bytes_per_microbatch",
                             "peak_allocated_bytes", "max_rss_bytes"}
        assert rank["peak_allocated_bytes"] is None and rank["max_rss_bytes"] > 0
    from planner.calibration.compare import compare
    from planner.plan import Plan
    table = compare(Plan.from_dict(measured["plan"]), measured)
    states = table[table.component.isin(["weights", "gradients", "optimizer"])]
    assert (states.error_pct.abs() < 1e-9).all()


def _scaler_rank():
    import torch

    from runtime.amp import INIT_SCALE, LossScaler
    from runtime.mesh import init_distributed
    ctx = init_distributed(Layout())
    p = torch.nn.Parameter(torch.ones(3))
    scaler = LossScaler(True)
    p.grad = torch.full((3,), INIT_SCALE)
    clean = scaler.unscale([p], ctx.device)
    scaler.update(clean)
    p.grad = torch.tensor([1.0, float("inf"), 0.0])
    overflow = scaler.unscale([p], ctx.device)
    scaler.update(overflow)
    return clean, overflow, scaler.scale / INIT_SCALE


def test_fp16_loss_scaler_skips_overflow_and_backs_off():
    assert run_world(1, _scaler_rank)[0] == (False, True, 0.5)


BAD_FLAGS = [("--lr", "inf"), ("--lr", "nan"), ("--lr", "0"), ("--timeout", "-1"),
             ("--timeout", "inf"), ("--timeout", "nan"), ("--grad-clip", "nan"),
             ("--grad-clip", "-1"), ("--data-cap-mb", "nan"), ("--data-cap-mb", "0"),
             ("--seed", "-1"), ("--steps", "0"), ("--warmup", "-2"), ("--lr", "fast"),
             ("--checkpoint-every", "-1")]


@pytest.mark.parametrize("flag, value", BAD_FLAGS)
def test_bad_flag_is_one_line_before_any_process_group(tmp_path, monkeypatch, flag, value):
    import torch.distributed as dist
    monkeypatch.delenv("RANK", raising=False)
    make_plan(PLAN2).save(tmp_path / "plan.json")
    argv = ["--plan", str(tmp_path / "plan.json"), "--steps", "2", flag, value]
    code, err, _ = _main_rank(argv)
    assert code == 2 and not dist.is_initialized()
    assert err.count("\n") == 1 and err.startswith("runtime.train: error: ")
    assert flag in err and value in err, err


def test_debug_adds_the_traceback(tmp_path, monkeypatch):
    monkeypatch.delenv("RANK", raising=False)
    code, err, _ = _main_rank(["--plan", str(tmp_path / "none.json"), "--steps", "1",
                               "--debug"])
    assert code == 2 and "Traceback" in err
    assert err.splitlines()[-1] == \
        f"runtime.train: error: plan file not found: {tmp_path}/none.json"


def test_fifo_as_data_is_refused_at_once(tmp_path):
    """Not opened (a FIFO blocks the reader until a writer comes): one line, exit 2."""
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    plan = tmp_path / "plan.json"
    make_plan(Layout(micro_batch=2, num_microbatches=2)).save(plan)
    done = subprocess.run([sys.executable, "-m", "runtime.train", "--plan", str(plan),
                           "--steps", "1", "--data", str(fifo)],
                          check=False, cwd=ROOT, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 2
    assert done.stderr == f"runtime.train: error: data path {fifo} is not a regular file or a " \
                          f"directory (a FIFO)\n"


def _stalling_rank(argv: list) -> tuple:
    """Rank 1 stops answering at its second step for longer than the collective timeout."""
    from runtime import engine
    if os.environ["RANK"] == "1":
        step, calls = engine.Engine.train_step, []

        def stalled(self, *args, **kwargs):
            calls.append(1)
            if len(calls) == 2:
                time.sleep(6)
            return step(self, *args, **kwargs)
        engine.Engine.train_step = stalled
    return _main_rank(argv)


def test_silent_peer_is_a_collective_timeout_exit_4(tmp_path):
    make_plan(PLAN2).save(tmp_path / "plan.json")
    argv = ["--plan", str(tmp_path / "plan.json"), "--steps", "3", "--data-cap-mb", "1",
            "--timeout", "2"]
    (code0, err0, _), (code1, err1, _) = run_world(2, _stalling_rank, argv, timeout_s=120)
    assert code0 == 4 and err0.count("\n") == 1, err0
    assert err0.startswith("runtime.train [rank 0]: error: lost a peer or a collective timed "
                           "out (--timeout 2 s): ")
    assert code1 == 4 and err1.count("\n") == 1, err1  # it finds rank 0 gone
