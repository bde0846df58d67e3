"""Checkpoints: resume after a crash continues exactly; a checkpoint loads under another plan;
incomplete checkpoints are never picked; --resume with nothing to resume fails; one run per
directory (an flock that a crashed run does not leave held)."""

import contextlib
import functools
import os
import signal
import time

import pytest
from runtime_dist import Layout, make_plan, run_world

STEPS, EVERY, CRASH_AT = 6, 3, 4
DP4 = Layout(dp=4, micro_batch=2)                                   # DDP
PP2_TP2 = Layout(pp=2, tp=2, micro_batch=2, num_microbatches=4, sequence_parallel=True)
PP2_DP2_Z1 = Layout(pp=2, dp=2, micro_batch=1, num_microbatches=4, zero_stage=1)
DP2_TP2_Z3 = Layout(dp=2, tp=2, micro_batch=2, num_microbatches=2, zero_stage=3)


class Crash(Exception):
    pass


def _run(plan, ckpt_dir, *, every=0, resume=False, crash_at=None) -> list:
    """One Trainer run on this rank; returns [(step, loss)] of the steps it completed."""
    from runtime.mesh import init_distributed
    from runtime.optim import OptimConfig
    from runtime.train import RunConfig, Trainer
    cfg = RunConfig(steps=STEPS, data_cap_bytes=1 << 20, checkpoint_dir=ckpt_dir,
                    checkpoint_every=every, resume=resume, val_batches=1)
    trainer = Trainer(plan, cfg, OptimConfig(), init_distributed(plan.layout))
    if crash_at is not None:
        batch = trainer.data.batch

        def crashing_batch(step):
            if step == crash_at:
                raise Crash(step)
            return batch(step)
        trainer.data.batch = crashing_batch
    with contextlib.suppress(Crash):
        trainer.run()
    return [(s["step"], s["loss"]) for s in trainer.steps]


def _scenario(tmp: str) -> dict:
    """Runs on each of 4 ranks: references, crash + resume, and cross-plan resumes."""
    plans = {k: make_plan(v) for k, v in
             {"dp4": DP4, "pp2tp2": PP2_TP2, "z1": PP2_DP2_Z1, "z3": DP2_TP2_Z3}.items()}
    out = {"ref_dp4": _run(plans["dp4"], None), "ref_z1": _run(plans["z1"], None)}
    out["crash_dp4"] = _run(plans["dp4"], f"{tmp}/a", every=EVERY, crash_at=CRASH_AT)
    out["resume_dp4"] = _run(plans["dp4"], f"{tmp}/a", resume=True)
    out["crash_z1"] = _run(plans["z1"], f"{tmp}/b", every=EVERY, crash_at=CRASH_AT)
    out["resume_z1"] = _run(plans["z1"], f"{tmp}/b", resume=True)
    # The cluster changed: the same checkpoints continue under other plans.
    out["cross_pp2tp2"] = _run(plans["pp2tp2"], f"{tmp}/a", resume=True)
    out["cross_z3"] = _run(plans["z3"], f"{tmp}/b", resume=True)
    return out


@functools.cache
def scenario(tmp: str) -> dict:
    return run_world(4, _scenario, tmp)[0]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    return scenario(str(tmp_path_factory.mktemp("ckpt")))


def _tail(ref, steps):
    return [loss for s, loss in ref if s >= steps[0][0]]


def test_crash_stops_after_the_checkpoint(runs):
    assert [s for s, _ in runs["crash_dp4"]] == list(range(CRASH_AT))
    assert runs["crash_dp4"] == runs["ref_dp4"][:CRASH_AT]


@pytest.mark.parametrize("ref, resumed", [("ref_dp4", "resume_dp4"), ("ref_z1", "resume_z1")])
def test_resume_after_crash_is_exact(runs, ref, resumed):
    steps = runs[resumed]
    assert [s for s, _ in steps] == list(range(EVERY, STEPS))
    # Equal up to float summation order: a fresh DDP all-reduces in its first-iteration
    # bucket order, which differs from the order it settles on after step 1.
    want = _tail(runs[ref], steps)
    assert steps[0][1] == want[0]
    assert max(abs(a - b) for (_, a), b in zip(steps, want)) < 1e-6


@pytest.mark.parametrize("ref, cross", [("ref_dp4", "cross_pp2tp2"), ("ref_z1", "cross_z3")])
def test_resume_under_another_plan(runs, ref, cross):
    """Saved at DP4 (DDP) -> PP2 x TP2 + SP; saved at PP2 x DP2 ZeRO-1 -> DP2 x TP2 ZeRO-3."""
    steps = runs[cross]
    assert [s for s, _ in steps] == list(range(EVERY, STEPS))
    want = _tail(runs[ref], steps)
    assert max(abs(a - b) for (_, a), b in zip(steps, want)) < 1e-5


def _step_dir(root, name, manifest=True):
    path = root / name
    path.mkdir(parents=True)
    (path / ".metadata").write_bytes(b"x")
    if manifest:
        (path / "manifest.json").write_text("{}")
    return path


def test_latest_ignores_incomplete_checkpoints(tmp_path):
    from runtime.checkpoint import latest
    assert latest(tmp_path / "missing") is None
    _step_dir(tmp_path, "step_00000002")
    _step_dir(tmp_path, "step_00000004", manifest=False)  # a crash before the manifest
    _step_dir(tmp_path, ".tmp-step_00000006")             # a crash before the rename
    _step_dir(tmp_path, ".old-step_00000008")             # a crash while replacing a step
    assert latest(tmp_path).name == "step_00000002"


def test_resume_fails_loudly_when_there_is_nothing_to_resume(tmp_path):
    from runtime.checkpoint import resume_path
    (tmp_path / "file").write_text("not a directory")
    (tmp_path / "empty").mkdir()
    _step_dir(tmp_path / "nomanifest", "step_00000003", manifest=False)
    _step_dir(tmp_path / "tmponly", ".tmp-step_00000003")
    cases = {"missing": "does not exist", "file": "is not a directory",
             "empty": "no step_N directory", "tmponly": "no step_N directory",
             "nomanifest": "step_00000003 is unreadable: no manifest.json"}
    for name, why in cases.items():
        with pytest.raises(ValueError, match=why) as err:
            resume_path(tmp_path / name)
        assert "\n" not in str(err.value) and str(tmp_path / name) in str(err.value)
    _step_dir(tmp_path / "nomanifest", "step_00000001")   # an older complete one is used
    assert resume_path(tmp_path / "nomanifest").name == "step_00000001"


def _one_run(root) -> None:
    from runtime.checkpoint import exclusive
    with exclusive(root):
        pass


def test_a_second_run_on_the_same_directory_is_refused(tmp_path):
    from runtime.checkpoint import exclusive
    busy = r"is in use by another run \(pid \d+ on "
    with exclusive(tmp_path / "ck"), pytest.raises(ValueError, match=busy):
        _one_run(tmp_path / "ck")
    _one_run(tmp_path / "ck")                             # released at the end of the run
    (tmp_path / "f").write_text("")
    with pytest.raises(ValueError, match="is not a directory"):
        _one_run(tmp_path / "f")


def test_a_killed_runs_lock_does_not_block(tmp_path):
    """flock dies with its process: a SIGKILLed holder leaves .lock behind, but not locked."""
    from runtime.checkpoint import _lock
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:                                          # the "run" that gets killed
        try:
            _lock(tmp_path)
            os.write(write, b"1")
            time.sleep(60)
        finally:
            os._exit(0)
    os.close(write)
    assert os.read(read, 1) == b"1"
    os.close(read)
    with pytest.raises(ValueError, match=f"pid {pid} "):
        _one_run(tmp_path)
    os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)
    assert (tmp_path / ".lock").read_text().startswith(f"pid {pid} ")   # stale file
    _one_run(tmp_path)
