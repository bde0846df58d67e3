"""Validation study on this machine: profile it, enumerate every feasible layout of a small model
on 8 gloo processes, train each for a few steps with the runtime, and compare.

Prints (markdown): Spearman rank correlation of predicted vs measured step time, mean and max
step-time error, exact model-state matches and activation errors per rank.  Results and every
measured.json go to runs/validate/.

    python benchmarks/validate_cpu.py [--layouts 24] [--steps 6] [--skip-profile]
"""

import argparse
import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import pandas as pd

from planner.calibration.calibrate import calibrate, step_time_errors
from planner.calibration.compare import compare
from planner.cli.run import launch_command
from planner.cost.estimate import estimate
from planner.hardware import Cluster, load_profile
from planner.job import Job
from planner.measured import Measured
from planner.plan import Plan
from planner.presets import MODEL_PRESETS
from planner.search.ranking import SearchOptions, search

OUT = Path("runs/validate")
STATES = ("weights", "gradients", "optimizer")


def _profile(skip: bool) -> Path:
    path = OUT / "cpu_profile.json"
    if not (skip and path.exists()):
        subprocess.run([sys.executable, "-m", "planner.cli", "profile", "--out", str(path),
                        "--ranks", "8"], check=True)
    return path


def _layouts(cluster: Cluster, job: Job, count: int) -> list:
    """`count` feasible layouts spread evenly over the ranking (best to worst)."""
    result = search(MODEL_PRESETS["tiny"], cluster, job, SearchOptions(top=1, headroom=0.1))
    rows = result.feasible
    step = max(1, len(rows) // count)
    picked = rows[::step][:count]
    print(f"{len(rows)} feasible layouts; running {len(picked)}", file=sys.stderr)
    return [r.layout for r in picked]


def _saved_plan(path: Path, cluster: Cluster):
    """An earlier run's plan on `cluster` (the profile just loaded, not the one it ran with)."""
    try:
        saved = json.loads(path.read_text())
        return Plan.from_dict({**saved, "cluster": cluster.to_dict(), "estimate": None})
    except ValueError as exc:  # refused since it was run (e.g. a rule learnt from the run)
        print(f"{path.name}: {exc}", file=sys.stderr)
        return None


def _saved_plans(cluster: Cluster) -> list:
    """The plans of an earlier run, in its order (for --reuse); None where now refused."""
    return [_saved_plan(p, cluster) for p in sorted(OUT.glob("plan_*.json"))]


def _run(plan: Plan, index: int, steps: int) -> Measured:
    plan_path, measured_path = OUT / f"plan_{index:02d}.json", OUT / f"measured_{index:02d}.json"
    plan.with_estimate(estimate(plan).to_dict()).save(plan_path)
    cmd = launch_command(plan, plan_path, steps, ["--out", str(measured_path)])
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode:
        log = OUT / f"failed_{index:02d}.log"
        log.write_text(done.stdout + done.stderr)
        errors = [line for line in done.stderr.splitlines() if ": error: " in line]
        print(f"layout {index} failed ({log}): {errors[:1]}", file=sys.stderr)
        return None
    return Measured.load(measured_path)


def _cross_validated(runs: list, profile) -> list:
    """Step-time predictions of each run from a profile calibrated on the other half of the
    runs (2-fold: even and odd runs), so no run is predicted by a fit that saw it."""
    predicted = [0.0] * len(runs)
    for fold in (0, 1):
        train = runs[1 - fold::2]
        calibrated = calibrate(train, profile)[0]
        for i in range(fold, len(runs), 2):
            predicted[i] = (1 + step_time_errors([runs[i]], calibrated)[0]) * \
                runs[i].step_time_s
    return predicted


def _timing_rows(label: str, predicted: list, measured: list) -> list:
    p, m = pd.Series(predicted), pd.Series(measured)
    spearman = p.rank().corr(m.rank())  # Spearman = Pearson of ranks (pandas' needs scipy)
    err = 100 * (p / m - 1)
    return [f"| Spearman rank correlation, step time ({label}) | {spearman:.3f} |",
            f"| mean / max step-time error ({label}) | {err.abs().mean():.1f}% / "
            f"{err.abs().max():.1f}% |"]


def _summary(runs: list, tables: list, profile) -> str:
    measured = [m.step_time_s for m in runs]
    before = [estimate(m.plan).step_s for m in runs]
    cells = pd.concat(tables)
    states = cells[cells.component.isin(STATES)]
    acts = cells[cells.component == "activations per micro-batch"]
    exact = int((states.predicted == states.measured).sum())
    return "\n".join([
        "| figure | value |", "|---|---:|",
        f"| layouts run | {len(runs)} |",
        *_timing_rows("profiled", before, measured),
        *_timing_rows("profiled + calibrated, 2-fold cross-validated",
                      _cross_validated(runs, profile), measured),
        f"| model-state cells exact (weights, grads, optimizer per rank) | {exact} / "
        f"{len(states)} |",
        f"| activation bytes per micro-batch, mean / max error per rank | "
        f"{acts.error_pct.abs().mean():.1f}% / {acts.error_pct.abs().max():.1f}% |"])


def main(argv=None) -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--layouts", type=int, default=24)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--skip-profile", action="store_true")
    parser.add_argument("--reuse", action="store_true",
                        help="summarise the plan_*/measured_* files of an earlier run")
    args = parser.parse_args(argv)
    OUT.mkdir(parents=True, exist_ok=True)
    profile = load_profile(str(_profile(args.skip_profile)))
    cluster = Cluster(profile=profile, num_nodes=1)
    job = Job(global_batch=16, seq_len=128, precision="fp32")
    rows, tables, runs = [], [], []
    plans = _saved_plans(cluster) if args.reuse else [
        Plan(model=MODEL_PRESETS["tiny"], cluster=cluster, job=job, layout=layout)
        for layout in _layouts(cluster, job, args.layouts)]
    for i, plan in enumerate(plans):
        done = OUT / f"measured_{i:02d}.json"
        if plan is None:
            continue
        measured = (Measured.load(done) if done.exists() else None) if args.reuse \
            else _run(plan, i, args.steps)
        if measured is None:
            continue
        # with --reuse, the run is judged on the profile just loaded: re-targeted explicitly
        # (compare refuses a measured.json of another plan)
        measured = dataclasses.replace(measured, plan=plan)
        tables.append(compare(plan, measured))
        runs.append(measured)
        rows.append({"layout": i, "predicted_s": estimate(plan).step_s,
                     "measured_s": measured.step_time_s})
        print(f"[{i + 1}] {rows[-1]}", file=sys.stderr)
    (OUT / "summary.json").write_text(json.dumps(rows, indent=1))
    print(_summary(runs, tables, profile))
    return 0


if __name__ == "__main__":
    sys.exit(main())
