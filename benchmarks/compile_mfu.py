"""Predicted MFU of the `torch` engine eager and with each block torch.compile'd
(Layout.compile), against the shared anchors' plain-PyTorch runs (section 6: a Llama-shaped
1.1B and 3.4B, one H100 80GB, PyTorch 2.11, bf16; measured eager 37.8% / 40.4%, torch.compile
50.4% / 53.6% MFU for the 1.1B at micro-batch 4 / 8, compiled 48.3% for the 3.4B at 4).  MFU as
benchmarks/torch_engine_mfu.py defines it.

    python benchmarks/compile_mfu.py"""

import dataclasses

from torch_engine_mfu import LLAMA_1B, RUNS, _mfu  # run as a script from the repository root

from planner.cost.estimate import estimate
from planner.hardware import load_cluster
from planner.job import Job
from planner.plan import Layout, Plan

# anchors section 6: 3.4B = 26 layers, hidden 3200, 32 heads, 32 kv heads, FFN 8640
LLAMA_3B = dataclasses.replace(LLAMA_1B, name="llama-3.4b", num_layers=26, hidden_size=3200,
                               num_heads=32, num_kv_heads=32, ffn_hidden_size=8640)
MEASURED_COMPILED = {"1.1B, 1 H100, mb 4": 0.504, "1.1B, 1 H100, mb 8": 0.536,
                     "3.4B, 1 H100, mb 4": 0.483}
EXTRA = [("3.4B, 1 H100, mb 4", LLAMA_3B, "h100-80g", 1, 2048, 4, {}, None, "")]


def main() -> None:
    print("| run | MFU eager | MFU compiled | measured eager | measured compiled |")
    print("|---|---:|---:|---:|---:|")
    for label, spec, profile, gpus, seq, mb, layout, measured, _ in RUNS + EXTRA:
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
