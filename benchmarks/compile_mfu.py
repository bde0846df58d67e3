"""Predicted MFU of the `torch` engine eager and with each block torch.compile'd
(Layout.compile), against the shared anchors' plain-PyTorch runs (section 6: a Llama-shaped
1.1B, one H100 80GB, PyTorch 2.11, bf16; measured eager 37.8% / 40.4%, torch.compile 50.4% /
53.6% MFU at micro-batch 4 / 8).  MFU as benchmarks/torch_engine_mfu.py defines it.

    python benchmarks/compile_mfu.py"""

import dataclasses

from torch_engine_mfu import RUNS, _mfu  # run as a script from the repository root
from planner.cost.estimate import estimate
from planner.hardware import load_cluster
from planner.job import Job
from planner.plan import Layout, Plan

MEASURED_COMPILED = {"1.1B, 1 H100, mb 4": 0.504, "1.1B, 1 H100, mb 8": 0.536}


def main() -> None:
    print("| run | MFU eager | MFU compiled | measured eager | measured compiled |")
    print("|---|---:|---:|---:|---:|")
    for label, spec, profile, gpus, seq, mb, layout, measured, _ in RUNS:
        plan = Plan(model=spec, cluster=load_cluster(profile, 1, num_gpus=gpus),
                    job=Job(global_batch=mb * gpus, seq_len=seq),
                    layout=Layout(micro_batch=mb, **layout))
        compiled = dataclasses.replace(plan, layout=dataclasses.replace(plan.layout,
                                                                         compile=True))
        eager_mfu = _mfu(plan, estimate(plan).step_s)
        compiled_mfu = _mfu(compiled, estimate(compiled).step_s)
        seen = f"{100 * measured:.1f}%" if measured else "-"
        seen_c = f"{100 * MEASURED_COMPILED[label]:.1f}%" if label in MEASURED_COMPILED else "-"
        print(f"| {label} | {100 * eager_mfu:.1f}% | {100 * compiled_mfu:.1f}% | {seen} | "
              f"{seen_c} |")


if __name__ == "__main__":
    main()
