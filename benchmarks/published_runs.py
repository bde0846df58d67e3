"""Predicted vs published: Korthikanti et al. 2022 Table 5 and Sec. 6.3, Megatron-LM 2019 V100.

Prints a markdown table (used in the README's "How accurate is it?" section)."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from golden_helpers import KORTHIKANTI, korthikanti_plan, v100_baseline_plan  # noqa: E402
from planner.cost.estimate import estimate  # noqa: E402


def _row(label, predicted, published, unit, extra=""):
    err = 100 * (predicted / published - 1)
    return f"| {label} | {published:g} {unit} | {predicted:.2f} {unit} | {err:+.1f}% | {extra} |"


def main():
    print("| run | published | predicted | error | notes |")
    print("|---|---:|---:|---:|---|")
    for row in KORTHIKANTI:
        est = estimate(korthikanti_plan(row))
        print(_row(f"{row[0]} SP + selective recompute ({row[6]} GPUs)", est.step_s, row[10],
                   "s", f"MFU {100 * est.mfu:.1f}%"))
    for row in KORTHIKANTI:
        est = estimate(korthikanti_plan(row, sp=False, recompute="full"))
        print(_row(f"{row[0]} full recompute, no SP", est.step_s, row[11], "s"))
    est = estimate(korthikanti_plan(KORTHIKANTI[2], dp=8))
    print(_row("530B, 8-way DP (2240 GPUs)", est.step_s, 39.15, "s",
               f"exposed DP all-reduce {est.time.dp_comm_exposed_s:.2f} s"))
    est = estimate(v100_baseline_plan())
    print(_row("GPT-2 1.2B on one V100 (Megatron-LM 2019)", est.hfu * 125, 39, "TFLOP/s",
               "hardware FLOPs incl. recompute"))


if __name__ == "__main__":
    main()
