"""`planner run`: the command is planner.export's torchrun line started through runtime.launch,
which exits with the failing rank's code (runtime/faults.py) and no launcher traceback."""

import os
import re
import shlex
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
from runtime_dist import SPEC, Layout, make_plan

from planner import export
from planner.cli.run import LAUNCHER, launch_command
from planner.hardware import load_cluster
from planner.job import Job
from planner.plan import Plan
from runtime import faults
from runtime.launch import verdict

ROOT = Path(__file__).resolve().parent.parent
PLAN2 = Layout(dp=2, micro_batch=2, num_microbatches=2, zero_stage=2)


def test_planner_run_does_not_import_the_runtime_or_torch():
    code = ("import sys, planner.cli, planner.cli.run; "
            "bad = [m for m in sys.modules if m.split('.')[0] in ('runtime', 'torch')]; "
            "assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_command_is_the_exported_torchrun_line(tmp_path):
    plan = make_plan(Layout(pp=2, dp=2, micro_batch=1, num_microbatches=4))
    path = tmp_path / "my plan.json"
    cmd = launch_command(plan, path, 7, ["--data", "x.txt"])
    exported = shlex.split(export.torchrun_lines(plan, plan_path=str(path), steps=7)[0])
    assert exported[0] == "torchrun"
    assert cmd == [*LAUNCHER, *exported[1:], "--data", "x.txt"]
    assert cmd[cmd.index("--nproc-per-node") + 1] == "4"
    assert cmd[-8:] == ["-m", "runtime.train", "--plan", str(path), "--steps", "7",
                        "--data", "x.txt"]


def test_multi_node_plan_is_refused():
    layout = Layout(dp=16, micro_batch=1)
    plan = Plan(model=SPEC, cluster=load_cluster("cpu", 2), layout=layout,
                job=Job(global_batch=16, seq_len=32, precision="fp32"))
    with pytest.raises(ValueError, match="spans 2 nodes.*--to torchrun"):
        launch_command(plan, "plan.json", 5)


def _failure(exitcode, explained=True, pid=100):
    return SimpleNamespace(exitcode=exitcode, pid=pid,
                           error_file="/tmp/error.json" if explained else "<N/A>")


def test_verdict_picks_the_cause_not_its_consequences():
    # rank 1 diverged; rank 0 lost its peer; torchrun terminated rank 2
    failures = {0: _failure(4), 1: _failure(3), 2: _failure(-signal.SIGTERM, False)}
    assert verdict(failures) == (faults.EXIT_DIVERGED, None)
    # a rank that died without a word is named, with its code
    code, line = verdict({0: _failure(4), 1: _failure(1, explained=False)})
    assert code == 1 and "rank 1 exited with code 1 without a message" in line
    # a peer lost (explained) before a SIGTERM that torchrun sent
    assert verdict({0: _failure(4), 1: _failure(-signal.SIGTERM, False)}) == (4, None)
    # a rank killed by a signal: code 4 and the signal named (SIGKILL before SIGTERM)
    code, line = verdict({0: _failure(-signal.SIGTERM, False),
                          1: _failure(-signal.SIGKILL, False, pid=7)})
    assert code == faults.EXIT_PEER_LOST and line == "rank 1 (pid 7) was killed by SIGKILL"


def _no_launcher_noise(log: str) -> None:
    for noise in ("Traceback", "ChildFailedError", "Root Cause", "elastic"):
        assert noise not in log, log


def test_planner_run_returns_the_ranks_code_with_one_line_each(tmp_path):
    """A diverging run (2 ranks, real torchrun): exit code 3, not torchrun's 1."""
    plan = tmp_path / "plan.json"
    make_plan(PLAN2).save(plan)
    done = subprocess.run(
        [sys.executable, "-m", "planner.cli", "run", str(plan), "--steps", "4",
         "--measured", str(tmp_path / "m.json"), "--", "--data-cap-mb", "1", "--lr", "1e12",
         "--grad-clip", "0", "--warmup", "1", "--timeout", "20"],
        check=False, cwd=ROOT, capture_output=True, text=True, timeout=240)
    assert done.returncode == faults.EXIT_DIVERGED, done.stdout + done.stderr
    errors = done.stderr.strip().splitlines()
    assert 1 <= len(errors) <= 2, done.stderr
    assert all(e.startswith("runtime.train [rank ") and "loss is" in e for e in errors)
    _no_launcher_noise(done.stdout + done.stderr)
    assert not (tmp_path / "m.json").exists()


# rank 1 misbehaves at its second step; rank 0 is then inside a collective
_SCRIPT = """
import os, signal, sys
from runtime import engine, faults, train
FAULT = sys.argv[1]
if os.environ["RANK"] == "1":
    step = engine.Engine.train_step
    calls = []
    def faulty(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            if FAULT == "raise":
                raise RuntimeError("injected fault")
            os.kill(os.getpid(), signal.SIGKILL)
        return step(self, *args, **kwargs)
    engine.Engine.train_step = faulty
faults.hard_exit(train.main(sys.argv[2:]) or 0)
"""


@pytest.mark.parametrize("fault, code, text", [
    ("raise", faults.EXIT_OTHER, "runtime.train [rank 1]: error: RuntimeError: injected fault"),
    ("kill", faults.EXIT_PEER_LOST, None),
])
def test_launcher_reports_a_rank_fault_mid_run(tmp_path, fault, code, text):
    plan, script = tmp_path / "plan.json", tmp_path / "faulty_rank.py"
    make_plan(PLAN2).save(plan)
    script.write_text(textwrap.dedent(_SCRIPT))
    done = subprocess.run(
        [*LAUNCHER, "--nproc-per-node", "2", str(script), fault, "--plan", str(plan),
         "--steps", "4", "--data-cap-mb", "1", "--timeout", "20"],
        check=False, cwd=ROOT, capture_output=True, text=True, timeout=240,
        env={**os.environ, "PYTHONPATH": str(ROOT)})
    log = done.stdout + done.stderr
    assert done.returncode == code, log
    _no_launcher_noise(log)
    errors = done.stderr.strip().splitlines()
    assert 1 <= len(errors) <= 2 and all(": error: " in e for e in errors), log
    if text:
        assert any(e.startswith(text) for e in errors), log
    else:  # rank 0 lost its peer, or the launcher names the killed rank
        assert any("lost a peer" in e or "was killed by SIGKILL" in e for e in errors), log


def test_planner_run_shows_runtime_train_flags_as_runtime_train_defines_them():
    """planner.cli.run.RUNTIME_FLAGS is a copy (the planner never imports the runtime)."""
    from planner.cli.run import RUNTIME_FLAGS
    from runtime.train import build_parser
    own = {"--plan", "--steps", "--out", "--debug", "--help"}  # `planner run` sets these
    theirs = {}
    for action in build_parser()._actions:
        flag = action.option_strings[-1]
        if flag in own:
            continue
        kind = bool if action.nargs == 0 else (action.type or str)
        theirs[flag] = (kind, action.default, action.help)
    assert {flag: (kind, default, text) for flag, kind, default, text in RUNTIME_FLAGS} == theirs


def _stop_with_ctrl_c(tmp_path, when: str):
    """`planner run` of a 2-rank plan in a process group of its own, as a terminal starts it;
    SIGINT to that group (what Ctrl-C sends) when the ranks exist ('start': they are still in
    the interpreter's start-up) or after the first training step ('step')."""
    from planner.cli.run import children
    plan = tmp_path / "plan.json"
    make_plan(PLAN2).save(plan)
    proc = subprocess.Popen(
        [sys.executable, "-m", "planner.cli", "run", str(plan), "--steps", "500",
         "--measured", str(tmp_path / "m.json"), "--data-cap-mb", "1"],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        start_new_session=True,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        if when == "start":
            deadline = time.monotonic() + 120
            while time.monotonic() < deadline:
                launchers = children(proc.pid)
                if launchers and len(children(min(launchers))) == 2:
                    break
                time.sleep(0.01)
        else:
            for line in proc.stdout:
                if " step " in line:
                    break
        os.killpg(proc.pid, signal.SIGINT)
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    return proc.returncode, err


@pytest.mark.parametrize("when", ["start", "step"])
def test_ctrl_c_stops_a_run_with_one_line_per_rank(tmp_path, when):
    """Not torchrun's forwarded SIGINT landing in a starting interpreter (50 lines of "Fatal
    Python error" per rank) or in torchrun's own start-up (swallowed: the run went on)."""
    code, err = _stop_with_ctrl_c(tmp_path, when)
    assert code == faults.EXIT_INTERRUPTED, err
    lines = err.strip().splitlines()
    assert len(lines) <= 2 and (lines or when == "start"), err
    assert all(re.fullmatch(r"runtime\.train \[rank [01]\]: error: interrupted", line)
               for line in lines), err
    assert not (tmp_path / "m.json").exists()


def test_zero1_uses_no_deprecated_collective():
    """ShardedAdamW's all-gather: no FutureWarning on every rank at every step."""
    code = textwrap.dedent("""
        import warnings
        import torch, torch.distributed as dist
        from runtime.zero1 import ShardedAdamW
        warnings.simplefilter("error", FutureWarning)
        dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
        params = [("w", torch.nn.Parameter(torch.ones(5))),
                  ("b", torch.nn.Parameter(torch.ones(3)))]
        opt = ShardedAdamW(params, dist.group.WORLD, [0, 0], [{}], lr=0.1)
        for _, p in params:
            p.grad = torch.ones_like(p)
        opt.step()
        assert float(params[0][1][0]) < 1
        dist.destroy_process_group()
    """)
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                          timeout=120, env={**os.environ, "PYTHONPATH": str(ROOT)}, check=False)
    assert done.returncode == 0, done.stderr
    assert "FutureWarning" not in done.stderr
