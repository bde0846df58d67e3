"""planner calibrate: bounded factors, only what the runs identify, one sign convention with
planner compare, and refusal of a fit that stays absurd."""

import dataclasses
import json

import pytest

from planner import limits
from planner.calibration.calibrate import (_scaled, calibrate, fit_problems, identify,
                                           step_time_errors)
from planner.calibration.compare import compare
from planner.cli import main
from planner.cost.estimate import estimate
from planner.hardware import Cluster, load_profile
from planner.job import Job
from planner.measured import Measured, relative_error
from planner.plan import Layout, Plan
from planner.presets import MODEL_PRESETS
from tests.measured_fixtures import measured_dict


def _plan(layout: Layout, seq: int, num_gpus: int = 0, profile=None) -> Plan:
    batch = layout.dp * layout.micro_batch * layout.num_microbatches
    cluster = Cluster(profile=profile or load_profile("cpu"), num_nodes=1, num_gpus=num_gpus)
    return Plan(model=MODEL_PRESETS["tiny"], cluster=cluster,
                job=Job(global_batch=batch, seq_len=seq, precision="fp32"), layout=layout)


def _measured(plan: Plan, step_s: float) -> dict:
    return measured_dict(plan, step_s)


def _runs_on(true_profile, plans: list, tmp_path=None) -> tuple:
    """(Measured runs, their paths): each plan measured on a machine that is `true_profile`."""
    runs, paths = [], []
    for i, plan in enumerate(plans):
        real = dataclasses.replace(plan, cluster=dataclasses.replace(plan.cluster,
                                                                     profile=true_profile))
        raw = _measured(plan, estimate(real).step_s)
        runs.append(Measured.from_dict(raw))
        if tmp_path is not None:
            paths.append(tmp_path / f"m{i}.json")
            paths[-1].write_text(json.dumps(raw))
    return runs, paths


# runs that differ in work per kernel and in communication, so the factors are separable
SEPARABLE = [(32, Layout(dp=8, micro_batch=2)), (32, Layout(dp=4, tp=2, micro_batch=4)),
             (32, Layout(dp=2, tp=2, pp=2, micro_batch=2, num_microbatches=4)),
             (16, Layout(dp=8, micro_batch=1)), (128, Layout(dp=8, micro_batch=8)),
             (128, Layout(dp=2, pp=4, micro_batch=1, num_microbatches=32))]
# one rank each: no collective at all, so nothing says what a collective's latency is
SINGLE_RANK = [(16, Layout(micro_batch=1)), (64, Layout(micro_batch=4)),
               (128, Layout(micro_batch=8)), (32, Layout(micro_batch=2, num_microbatches=4))]


def test_calibrate_recovers_a_slower_machine(tmp_path, capsys):
    """Runs measured on a machine that reaches half the profile's efficiency and pays 5x the
    kernel overhead: calibration finds both factors and the step-time error drops."""
    profile = load_profile("cpu")
    plans = [_plan(layout, seq) for seq, layout in SEPARABLE]
    runs, paths = _runs_on(_scaled(profile, efficiency=0.5, overhead=5.0), plans, tmp_path)
    _, factors, before, after = calibrate(runs, profile)
    assert factors["efficiency"] == pytest.approx(0.5, rel=0.1)
    assert factors["overhead"] == pytest.approx(5.0, rel=0.2)
    assert max(map(abs, after)) < 0.02 < min(map(abs, before))
    assert all(e < 0 for e in before)  # the profile is too fast: predicted below measured
    out = tmp_path / "cal.json"
    assert main(["calibrate", *map(str, paths), "--profile", "cpu", "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "mean |error|" in text and "(predicted - measured) / measured" in text
    assert out.exists()


def test_a_factor_no_run_is_sensitive_to_is_left_alone(tmp_path, capsys):
    """Single-rank runs have no collective: latency is left at exactly 1 and said so, while
    efficiency and overhead are fitted."""
    profile = load_profile("cpu")
    plans = [_plan(layout, seq, num_gpus=1) for seq, layout in SINGLE_RANK]
    runs, paths = _runs_on(_scaled(profile, efficiency=0.6, overhead=3.0), plans, tmp_path)
    fitted, left = identify(runs, profile)
    assert "latency" in left and "no run is sensitive" in left["latency"]
    assert set(fitted) == {"efficiency", "overhead"}
    calibrated, factors, _, after = calibrate(runs, profile)
    assert factors["latency"] == 1.0
    assert calibrated.intra_node.latency_s == profile.intra_node.latency_s
    assert factors["efficiency"] == pytest.approx(0.6, rel=0.1)
    assert max(map(abs, after)) < 0.02
    out = tmp_path / "cal.json"
    assert main(["calibrate", *map(str, paths), "--profile", "cpu", "--out", str(out)]) == 0
    assert "left alone (x1): latency: no run is sensitive" in capsys.readouterr().out


def test_one_run_fits_one_factor_only():
    """One run is one equation: the most sensitive factor is fitted, the others left alone."""
    profile = load_profile("cpu")
    runs, _ = _runs_on(_scaled(profile, overhead=2.0), [_plan(Layout(dp=8, micro_batch=2), 32)])
    fitted, left = identify(runs, profile)
    assert len(fitted) == 1 and len(left) == 2
    _, factors, _, after = calibrate(runs, profile)
    assert all(factors[name] == 1.0 for name in left)
    assert abs(after[0]) < 0.01


def test_factors_stay_inside_their_bounds_and_an_absurd_fit_is_refused(tmp_path, capsys):
    """A profile ~1000x too slow (the noisy gemm_half_dim 4011 at efficiency 1.00): the factors
    may not run to 1e9 and 1e-15; they stop at their bounds and the CLI refuses, exit 2, one
    line, nothing written; --force writes it with a warning."""
    cpu = load_profile("cpu")
    broken = dataclasses.replace(cpu, gpu=dataclasses.replace(
        cpu.gpu, gemm_half_dim=4011.0, gemm_efficiency_max=1.0))
    broken_path = tmp_path / "broken.json"
    broken_path.write_text(json.dumps(broken.to_dict()))
    plans = [_plan(layout, seq, profile=broken) for seq, layout in SEPARABLE[:4]]
    runs, paths = _runs_on(cpu, plans, tmp_path)
    _, factors, before, after = calibrate(runs, broken)
    assert min(before) > 10  # predicted more than 10x slower than measured
    for name, (lo, hi) in limits.CALIBRATION_FACTOR_BOUNDS.items():
        assert lo <= factors[name] <= hi, (name, factors[name])
    problems = fit_problems(factors, ["efficiency", "overhead", "latency"], after)
    assert any("at its bound" in p for p in problems)
    out = tmp_path / "cal.json"
    argv = ["calibrate", *map(str, paths), "--profile", str(broken_path), "--out", str(out)]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("planner calibrate: error: the fit cannot be right")
    assert err.count("\n") == 1 and "--force" in err and not out.exists()
    assert main(argv + ["--force"]) == 0 and out.exists()
    assert "WARNING" in capsys.readouterr().err


def test_fit_problems_name_a_bound_and_a_large_mean_error():
    assert fit_problems({"efficiency": 0.9, "overhead": 1.0, "latency": 1.0},
                        ["efficiency", "overhead"], [0.05, -0.1]) == []
    at = fit_problems({"efficiency": 2.0, "overhead": 0.01}, ["efficiency", "overhead"], [0.0])
    assert len(at) == 2 and "efficiency factor x2 is at its bound [0.05, 2]" in at[0]
    # a left-alone factor at 1 is never "at a bound", and the mean error counts on its own
    big = fit_problems({"latency": 1.0}, [], [1.5, -0.9])
    assert big == ["mean |error| after fitting is 120% (above 100%)"]


def test_compare_and_calibrate_share_one_sign_convention():
    """error = (predicted - measured) / measured in both: a run that took twice the predicted
    time is -50% in compare's table and in calibrate's errors."""
    plan = _plan(Layout(dp=2, tp=2, pp=2, micro_batch=2, num_microbatches=4), 64)
    predicted = estimate(plan).step_s
    run = Measured.from_dict(_measured(plan, 2 * predicted))
    table = compare(plan, run)
    step = table[table.component == "step time (s)"].iloc[0]
    assert step.error_pct == pytest.approx(-50.0)
    assert step_time_errors([run], plan.cluster.profile)[0] == pytest.approx(-0.5)
    assert relative_error(predicted, 2 * predicted) == pytest.approx(-0.5)
    tokens = table[table.component == "tokens/s"].iloc[0]
    assert tokens.error_pct == pytest.approx(100.0)  # predicted throughput is twice the real


def test_left_alone_factors_are_exactly_one_in_the_profile_note():
    profile = load_profile("cpu")
    runs, _ = _runs_on(_scaled(profile, overhead=2.0),
                       [_plan(layout, seq, num_gpus=1) for seq, layout in SINGLE_RANK[:2]])
    calibrated, factors, _, _ = calibrate(runs, profile)
    assert "latency left alone" in calibrated.sources["calibration"]
    assert factors["latency"] == 1.0
