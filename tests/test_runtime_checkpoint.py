"""Checkpoints: resume after a crash continues exactly; a checkpoint loads under another plan;
incomplete checkpoints are never picked."""

import functools

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
    try:
        trainer.run()
    except Crash:
        pass
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


@functools.lru_cache(maxsize=None)
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


def test_latest_ignores_incomplete_checkpoints(tmp_path):
    from runtime.checkpoint import latest
    assert latest(tmp_path / "missing") is None
    (tmp_path / "step_00000002").mkdir()
    (tmp_path / "step_00000002" / ".metadata").write_bytes(b"x")
    (tmp_path / "step_00000004").mkdir()            # a crash before DCP wrote .metadata
    (tmp_path / ".tmp-step_00000006").mkdir()       # a crash before the rename
    (tmp_path / ".tmp-step_00000006" / ".metadata").write_bytes(b"x")
    assert latest(tmp_path).name == "step_00000002"
