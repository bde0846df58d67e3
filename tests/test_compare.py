import json

import pytest

from planner.calibration.compare import compare
from planner.cli import main
from planner.cost.estimate import estimate
from planner.hardware import load_cluster
from planner.job import Job
from planner.plan import Layout, Plan
from planner.presets import MODEL_PRESETS
from tests.measured_fixtures import measured_dict


def _plan():
    return Plan(model=MODEL_PRESETS["tiny"], cluster=load_cluster("cpu", 1),
                job=Job(global_batch=16, seq_len=128, precision="fp32"),
                layout=Layout(dp=2, tp=2, pp=2, micro_batch=2, num_microbatches=4,
                              zero_stage=1))


def _measured_fixture(plan, activation_scale=1.0, step_s=0.5):
    return measured_dict(plan, step_s, activation_scale)


def test_compare_reports_relative_errors():
    plan = _plan()
    table = compare(plan, _measured_fixture(plan, activation_scale=1.05))
    states = table[table.component.isin(["weights", "gradients", "optimizer"])]
    assert len(states) == 24 and (states.error_pct.abs() < 1e-9).all()
    acts = table[table.component == "activations per micro-batch"]
    # error = (predicted - measured) / measured, as in planner calibrate: measured 5% above
    assert acts.error_pct.tolist() == pytest.approx([100 * (1 / 1.05 - 1)] * 8)
    step = table[table.component == "step time (s)"].iloc[0]
    assert step.predicted == pytest.approx(estimate(plan).step_s)
    assert step.error_pct == pytest.approx(100 * (step.predicted / 0.5 - 1))


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
