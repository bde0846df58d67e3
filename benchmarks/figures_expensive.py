"""Generators of the README's expensive measured blocks (minutes each): the main job, the whole
test suite, the CPU validation study and the UI's page-run times.  Regenerated only on demand
(`python -m benchmarks.readme_figures --only NAME`, or `--all`); never by the tests."""

import os
import re
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

from benchmarks.figures_computed import printed
from benchmarks.readme_figures import Block, load_1min

ROOT = Path(__file__).resolve().parents[1]
# the main job of the README's "Two commands": tiny on 8 CPU processes, 3D plan, 40 steps
JOB = ["--model", "tiny", "--cluster", "cpu", "--global-batch", "32", "--seq-len", "256",
       "--precision", "fp32"]
LAYOUT_3D = ["--dp", "2", "--tp", "2", "--pp", "2", "--micro-batch", "4", "--zero", "1"]
STEPS = 40
UI_MODEL, UI_NODES = "llama2-70b", 8  # "a 70B model on 64 A100s"


def minutes(seconds: float) -> str:
    m, s = divmod(round(seconds), 60)
    return f"{m} min {s} s" if m else f"{s} s"


def planner(args: list, cwd: Path) -> float:
    """Wall seconds of one `planner` command run in `cwd` on this checkout's code."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-m", "planner.cli", *args], cwd=cwd, env=env, check=True,
                   stdout=subprocess.DEVNULL)
    return time.perf_counter() - t0


def run_summary(plan_path: Path, measured_path: Path) -> dict:
    """Predicted vs measured of one run, from planner compare's rows."""
    from planner.calibration.compare import compare
    from planner.measured import Measured
    from planner.plan import Plan
    plan, measured = Plan.load(plan_path), Measured.load(measured_path)
    rows = compare(plan, measured)
    states = rows[rows.component.isin(("weights", "gradients", "optimizer"))]
    acts = rows[rows.component == "activations per micro-batch"]
    step = rows[rows.component == "step time (s)"].iloc[0]
    return {"states_exact": bool((states.predicted == states.measured).all()),
            "act_max_pct": float(acts.error_pct.abs().max()),
            "predicted_s": float(step.predicted), "measured_s": float(step.measured),
            "tokens_per_s": measured.tokens_per_s, "loss_first": measured.steps[0].loss,
            "loss_last": measured.steps[-1].loss, "val_loss": measured.val_loss,
            "layout": plan.layout}


def _tp_host_ratio() -> float:
    """Host time of a DTensor TP=2 layer over a plain one in the cpu profile (fwd + bwd)."""
    from planner.hardware import load_profile
    host = load_profile("cpu").gpu.host_layer_overhead_s
    return sum(host["2"]) / sum(host["1"])


def main_job() -> str:
    from planner.report import layout_summary
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        start = load_1min()
        t_suggest = planner(["suggest", *JOB, "--top", "5"], tmp)
        t_estimate = planner(["estimate", *JOB, *LAYOUT_3D, "--out", "plan.json"], tmp)
        t_run = planner(["run", "plan.json", "--steps", str(STEPS), "--measured", "m3d.json"], tmp)
        end = load_1min()
        three_d = run_summary(tmp / "plan.json", tmp / "m3d.json")
        planner(["suggest", *JOB, "--top", "1", "--out", "best.json"], tmp)
        best_start = load_1min()
        planner(["run", "best.json", "--steps", str(STEPS), "--measured", "mbest.json"], tmp)
        best = run_summary(tmp / "best.json", tmp / "mbest.json")
        best_end = load_1min()
    states = ("every rank's weight, gradient and optimizer bytes match exactly"
              if three_d["states_exact"] else "weight, gradient and optimizer bytes differ")
    return textwrap.fill(
        f"Load average {start:.1f} when it started, {end:.1f} when it ended: the three "
        f"`planner` commands took {minutes(t_suggest + t_estimate + t_run)} after the install "
        f"(suggest {t_suggest:.1f} s, estimate {t_estimate:.1f} s, the rest the run): the ranked "
        f"table, the estimate, then {STEPS} training steps on the Python standard library's own "
        f"source text in which the loss falls from {three_d['loss_first']:.1f} to "
        f"{three_d['loss_last']:.1f} (validation {three_d['val_loss']:.1f}), and a "
        f"predicted-vs-measured table in which {states}, activations per micro-batch within "
        f"{three_d['act_max_pct']:.1f}%, and the step time is {three_d['predicted_s']:.2f} s "
        f"predicted against {three_d['measured_s']:.2f} s measured "
        f"({three_d['tokens_per_s']:,.0f} tokens/s). The measured step moves with the load of "
        f"the machine. The 3D layout is there to exercise every axis; the table's own first "
        f"choice on this machine ({layout_summary(best['layout'])}: `planner suggest ... --top 1 "
        f"--out best.json && planner run best.json`) predicts {best['predicted_s']:.2f} s and "
        f"measured {best['measured_s']:.2f} s per step ({best['tokens_per_s']:,.0f} tokens/s; "
        f"load average {best_start:.1f} to {best_end:.1f}), "
        f"{three_d['measured_s'] / best['measured_s']:.1f}× faster, because each DTensor (TP) "
        f"layer costs the host {_tp_host_ratio():.0f}× a plain one here (the `cpu` profile).",
        width=96)


def pytest_summary(output: str) -> str:
    """'1,553 passed, 2 skipped, 1 xfailed in 5 min 44 s' from pytest -q's last line."""
    last = [line for line in output.splitlines() if " in " in line and "passed" in line][-1]
    counts = re.findall(r"(\d+) (passed|failed|skipped|xfailed|xpassed|errors?)", last)
    secs = float(re.search(r" in ([\d.]+)s", last).group(1))
    return ", ".join(f"{int(n):,} {what}" for n, what in counts) + f" in {minutes(secs)}"


def test_suite() -> str:
    out = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider"],
                         cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)},
                         capture_output=True, text=True, check=False)  # failures are counted too
    return f"The whole suite by `python -m pytest -q`: {pytest_summary(out.stdout)} of pytest"


def validate_cpu() -> str:
    from benchmarks import validate_cpu as script
    return printed(script.main, [])


def ui_timing() -> str:
    """A cold page run and a cached one of the UI for UI_MODEL on UI_NODES DGX A100 nodes."""
    from streamlit.testing.v1 import AppTest
    at = AppTest.from_file(str(ROOT / "app" / "streamlit_app.py"), default_timeout=120)
    at.run()
    at.selectbox(key="model").set_value(UI_MODEL)
    at.number_input(key="nodes").set_value(UI_NODES)
    t0 = time.perf_counter()
    at.run()
    cold = time.perf_counter() - t0
    t0 = time.perf_counter()
    at.run()
    cached = time.perf_counter() - t0
    caption = " ".join(c.value for c in at.caption)
    layouts = re.search(r"([\d,]+) layouts", caption).group(1)
    return (f"a 70B model on {8 * UI_NODES} A100s ({layouts} layouts) takes {cold:.1f} s on a "
            f"cold page run and {cached:.1f} s cached")


EXPENSIVE = [
    Block("main-job", "expensive", main_job, "the three commands above (and the best plan's run)"),
    Block("test-suite", "expensive", test_suite, "`python -m pytest -q -p no:cacheprovider`"),
    Block("validate-cpu", "expensive", validate_cpu, "`python benchmarks/validate_cpu.py`"),
    Block("ui-timing", "measured", ui_timing, "`streamlit.testing.v1.AppTest` on the page"),
]
