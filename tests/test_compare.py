import json

import pytest

from planner.calibration.compare import compare
from planner.cli import main
from planner.cost.estimate import estimate
from planner.cost.memory import rank_memory, rank_model_state
from planner.hardware import load_cluster
from planner.job import Job
from planner.measured import Measured
from planner.plan import Layout, Plan
from planner.presets import MODEL_PRESETS


def _plan():
    return Plan(model=MODEL_PRESETS["tiny"], cluster=load_cluster("cpu", 1),
                job=Job(global_batch=16, seq_len=128, precision="fp32"),
                layout=Layout(dp=2, tp=2, pp=2, micro_batch=2, num_microbatches=4,
                              zero_stage=1))


def _measured_fixture(plan, activation_scale=1.0, step_s=0.5):
    """A measured.json as the runtime writes it, with known values."""
    ranks = []
    lay = plan.layout
    for rank in range(lay.world_size):  # mesh order (pp, dp, tp), tp innermost
        pp, dp, tp = rank // (lay.dp * lay.tp), (rank // lay.tp) % lay.dp, rank % lay.tp
        states = rank_model_state(plan, pp, dp, tp)
        ranks.append({"rank": rank, "coords": {"pp": pp, "dp": dp, "tp": tp},
                      "weights_bytes": states.weights_bytes,
                      "gradients_bytes": states.gradients_bytes,
                      "optimizer_bytes": states.optimizer_bytes,
                      "activation_bytes_per_microbatch":
                          activation_scale * rank_memory(plan, pp).activation_bytes_per_microbatch,
                      "activation_peak_bytes": 1e6, "peak_allocated_bytes": None,
                      "max_rss_bytes": 300e6})
    return {"schema_version": 1, "plan": plan.to_dict(), "steps": [], "val_loss": 5.0,
            "step_time_s": step_s, "tokens_per_s": 16 * 128 / step_s, "ranks": ranks}


def test_compare_reports_relative_errors():
    plan = _plan()
    table = compare(plan, _measured_fixture(plan, activation_scale=1.05))
    states = table[table.component.isin(["weights", "gradients", "optimizer"])]
    assert len(states) == 24 and (states.error_pct.abs() < 1e-9).all()
    acts = table[table.component == "activations per micro-batch"]
    assert acts.error_pct.tolist() == pytest.approx([5.0] * 8)
    step = table[table.component == "step time (s)"].iloc[0]
    assert step.predicted == pytest.approx(estimate(plan).step_s)
    assert step.error_pct == pytest.approx(100 * (0.5 / step.predicted - 1))


def test_compare_cli_and_bad_measured(tmp_path, capsys):
    plan = _plan()
    plan.save(tmp_path / "plan.json")
    (tmp_path / "m.json").write_text(json.dumps(_measured_fixture(plan)))
    assert main(["compare", str(tmp_path / "plan.json"), str(tmp_path / "m.json")]) == 0
    assert "activations per micro-batch" in capsys.readouterr().out
    bad = _measured_fixture(plan)
    del bad["ranks"][0]["coords"]
    (tmp_path / "bad.json").write_text(json.dumps(bad))
    assert main(["compare", str(tmp_path / "plan.json"), str(tmp_path / "bad.json")]) == 2
    assert "ranks[0]: missing key 'coords'" in capsys.readouterr().err


def test_calibrate_recovers_a_slower_machine(tmp_path, capsys):
    """Runs measured on a machine that reaches half the profile's efficiency and pays 5x the
    kernel overhead: calibration finds both factors and the step-time error drops."""
    from planner.calibration.calibrate import _scaled, calibrate
    from planner.hardware import load_profile
    profile = load_profile("cpu")
    slow = _scaled(profile, efficiency=0.5, overhead=5.0)
    paths = []
    # runs that differ in work per kernel and in communication, so the factors are separable
    layouts = [(16, Layout(dp=8, micro_batch=2)), (16, Layout(dp=4, tp=2, micro_batch=4)),
               (16, Layout(dp=2, tp=2, pp=2, micro_batch=2, num_microbatches=4)),
               (8, Layout(dp=8, micro_batch=1)), (64, Layout(dp=8, micro_batch=8)),
               (64, Layout(dp=2, pp=4, micro_batch=1, num_microbatches=32))]
    for i, (seq, layout) in enumerate(layouts):
        batch = layout.dp * layout.micro_batch * layout.num_microbatches
        plan = Plan(model=MODEL_PRESETS["tiny"], cluster=load_cluster("cpu", 1),
                    job=Job(global_batch=batch, seq_len=seq * 2, precision="fp32"),
                    layout=layout)
        true_plan = Plan(model=plan.model, cluster=type(plan.cluster)(profile=slow, num_nodes=1),
                         job=plan.job, layout=layout)
        measured = _measured_fixture(plan, step_s=estimate(true_plan).step_s)
        paths.append(tmp_path / f"m{i}.json")
        paths[-1].write_text(json.dumps(measured))
    runs = [Measured.load(p) for p in paths]
    _, factors, before, after = calibrate(runs, profile)
    assert factors["efficiency"] == pytest.approx(0.5, rel=0.1)
    assert factors["overhead"] == pytest.approx(5.0, rel=0.2)
    assert max(map(abs, after)) < 0.02 < min(map(abs, before))
    out = tmp_path / "cal.json"
    assert main(["calibrate", *map(str, paths), "--profile", "cpu", "--out", str(out)]) == 0
    assert "mean |error|" in capsys.readouterr().out and out.exists()
