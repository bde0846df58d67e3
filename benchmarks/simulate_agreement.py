"""Simulated step time against estimate()'s closed form for the plan set of
tests/test_simulate.py (AGREEMENT: llama2-7b, seq 4096, a100-80g, one node; `torch` engine with
the op-census kernel times unless marked).  Prints the markdown table of the README's
"Simulating one iteration" section.

    python benchmarks/simulate_agreement.py"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from test_simulate import AGREEMENT, _plan  # noqa: E402  (the tests' plan set, one copy)

from planner.cost.estimate import estimate  # noqa: E402
from planner.report import layout_summary  # noqa: E402
from planner.sim.timeline import simulate  # noqa: E402


def _layouts() -> list:
    """The layout keywords of every AGREEMENT case (pytest.param or a plain tuple)."""
    return [getattr(case, "values", case)[0] for case in AGREEMENT]


def _row(layout: dict) -> str:
    plan = _plan(**layout)
    simulated, closed = simulate(plan).step_s, estimate(plan).time.step_s
    diff = f"{100 * (simulated / closed - 1):+.1f}%"
    if abs(simulated / closed - 1) > 0.02:  # the tests' tolerance: a known gap, in bold
        diff = f"**{diff}**"
    label = layout_summary(plan.layout).replace(" recompute=none", "")
    if plan.job.engine != "torch":
        label += f", {plan.job.engine} engine"
    return f"| {label} | {simulated:.3f} s | {closed:.3f} s | {diff} |"


def main() -> None:
    print("| layout | simulated | `estimate()` | difference |")
    print("|---|---:|---:|---:|")
    for layout in _layouts():
        print(_row(layout))


if __name__ == "__main__":
    main()
