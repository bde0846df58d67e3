"""Layout.compile as a plan dimension: the rules refuse it off the torch engine, the search
fixes it on with --compile (and its fast scorer equals estimate() on compiled layouts), the
estimate, simulator and exports follow it, and the runtime never contradicts the plan."""

import dataclasses
import random

import numpy as np
import pytest

from planner import export
from planner.cli import main
from planner.cost.estimate import estimate
from planner.hardware import load_cluster
from planner.job import Job
from planner.plan import Layout, Plan, check_compile_flag
from planner.presets import MODEL_PRESETS
from planner.search.ranking import SearchOptions, search
from planner.search.scorer import Scorer, layout_at
from planner.search.space import enumerate_space, take

MODEL = MODEL_PRESETS["llama2-7b"]
CLUSTER = load_cluster("a100-80g", 1)
JOB = Job(global_batch=64, seq_len=4096)
LAYOUT = Layout(dp=8, micro_batch=2, num_microbatches=4, zero_stage=1)


def _plan(compile_: bool, engine: str = "torch") -> Plan:
    return Plan(model=MODEL, cluster=CLUSTER, job=dataclasses.replace(JOB, engine=engine),
                layout=dataclasses.replace(LAYOUT, compile=compile_))


def test_megatron_engine_refuses_compile():
    with pytest.raises(ValueError, match="compile .* runs on the torch engine only, not megatron"):
        _plan(True, "megatron")
    _plan(False, "megatron")


def test_compile_with_tensor_parallelism_is_refused():
    """The runtime's compiled block fails in backward under DTensor TP (PyTorch 2.13)."""
    with pytest.raises(ValueError, match="compile with tp=2 fails in PyTorch"):
        Plan(model=MODEL, cluster=CLUSTER, job=JOB,
             layout=Layout(dp=4, tp=2, micro_batch=2, num_microbatches=8, compile=True))


def test_cli_refusal_is_one_line_naming_the_flags(capsys):
    args = ["estimate", "--model", "llama2-7b", "--cluster", "a100-80g", "--global-batch", "64",
            "--seq-len", "4096", "--dp", "8", "--engine", "megatron", "--compile"]
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--compile" in err and "--engine megatron" in err


def test_compiled_estimate_is_faster_and_saves_no_more():
    eager, compiled = estimate(_plan(False)), estimate(_plan(True))
    assert compiled.time.compute_s < eager.time.compute_s
    assert compiled.memory.activations_bytes < eager.memory.activations_bytes
    assert compiled.plan.layout.compile and not eager.plan.layout.compile


def test_simulator_follows_compile():
    from planner.sim.timeline import simulate
    eager, compiled = simulate(_plan(False)), simulate(_plan(True))
    assert compiled.step_s < eager.step_s


def test_search_with_compile_fixes_it_on_and_scores_like_estimate():
    cluster = load_cluster("a100-80g", 1)
    on = search(MODEL, cluster, JOB, SearchOptions(top=5, compile=True))
    off = search(MODEL, cluster, JOB, SearchOptions(top=5))
    assert on.ranked and all(c.plan.layout.compile for c in on.ranked)
    assert not any(c.plan.layout.compile for c in off.ranked)
    assert on.best.step_s < off.best.step_s
    cols, _ = enumerate_space(MODEL, JOB, 8, 8)
    cols["compile"] = np.ones(cols["dp"].size, dtype=np.int64)
    rows = [i for i in range(cols["dp"].size) if _valid(cols, i)]
    sample = take(cols, np.array(random.Random(3).sample(rows, 20)))
    scorer = Scorer(MODEL, lambda w: cluster, JOB)
    step, mem = scorer.step_time(sample), scorer.memory(sample)
    for k in range(20):
        est = estimate(Plan(model=MODEL, cluster=cluster, job=JOB, layout=layout_at(sample, k)))
        assert est.plan.layout.compile
        assert step[k] == pytest.approx(est.step_s, rel=1e-9)
        assert mem[k] == pytest.approx(est.memory.total_bytes, rel=1e-9)


def _valid(cols, i) -> bool:
    try:
        Plan(model=MODEL, cluster=CLUSTER, job=JOB, layout=layout_at(cols, i))
    except ValueError:
        return False
    return True


def test_search_with_compile_on_megatron_names_the_reason():
    result = search(MODEL, CLUSTER, dataclasses.replace(JOB, engine="megatron"),
                    SearchOptions(compile=True))
    assert not result.ranked
    assert [r.key for r in result.rejections][0] == "compile_engine"


def test_exports_refuse_or_carry_compile():
    plan = _plan(True)
    for fmt in ("megatron", "deepspeed"):
        with pytest.raises(ValueError, match="cannot express this plan: compile"):
            export.FORMATS[fmt](plan)
    assert "plan.json" in export.torchrun(plan)  # the plan file carries compile


def test_runtime_flag_cannot_contradict_the_plan():
    with pytest.raises(ValueError, match="--compile, but the plan has compile off"):
        check_compile_flag(LAYOUT, True)
    check_compile_flag(dataclasses.replace(LAYOUT, compile=True), True)
    check_compile_flag(dataclasses.replace(LAYOUT, compile=True), False)
    check_compile_flag(LAYOUT, False)


def test_planner_run_refuses_a_compile_flag_the_plan_contradicts(tmp_path, capsys):
    plan = Plan(model=MODEL_PRESETS["tiny"], cluster=load_cluster("cpu", 1),
                job=Job(global_batch=8, seq_len=64, precision="fp32"),
                layout=Layout(dp=8, micro_batch=1))
    path = tmp_path / "plan.json"
    plan.save(path)
    assert main(["run", str(path), "--steps", "1", "--compile"]) == 2
    assert "--compile, but the plan has compile off" in capsys.readouterr().err
