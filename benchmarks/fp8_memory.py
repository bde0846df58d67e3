"""Itemised memory and throughput of FP8 plans against bf16 on H100 (README, FP8): Llama-3 8B
and 70B, the torch engine (torchao tensorwise / rowwise, compiled blocks) and the megatron
engine (Transformer Engine delayed / current scaling).  Prints markdown tables; cost model
predictions, nothing measured."""

import dataclasses

from planner.cost.estimate import estimate
from planner.hardware import load_cluster
from planner.job import Job
from planner.plan import Layout, Plan
from planner.presets import MODEL_PRESETS
from planner.units import GIB

ROWS = (("weights", "weights_bytes"), ("gradients", "gradients_bytes"),
        ("optimizer states", "optimizer_bytes"), ("activations", "activations_bytes"),
        ("weight compute copies (16-bit / FP8)", "gathered_params_bytes"),
        ("comm buffers", "comm_buffers_bytes"), ("outside tensors", "framework_bytes"),
        ("**total**", "total_bytes"))
# (title, model, nodes, global batch, layout, engine, recipes)
CASES = (
    ("Llama-3 8B, 8x H100, torch engine, FSDP (ZeRO-3) dp=8, compiled blocks, batch 8 x 8192",
     "llama3-8b", 1, 8, Layout(dp=8, zero_stage=3, compile=True), "torch",
     ("tensorwise", "rowwise")),
    ("Llama-3 8B, 8x H100, megatron engine, tp=2 (SP) dp=4, distributed optimizer, "
     "batch 8 x 8192", "llama3-8b", 1, 8,
     Layout(dp=4, tp=2, sequence_parallel=True, zero_stage=1), "megatron",
     ("delayed", "tensorwise")),
    ("Llama-3 70B, 64x H100, torch engine, FSDP dp=64, full recompute, compiled blocks, "
     "batch 64 x 8192", "llama3-70b", 8, 64,
     Layout(dp=64, zero_stage=3, recompute="full", compile=True), "torch",
     ("tensorwise", "rowwise")),
    ("Llama-3 70B, 64x H100, megatron engine, tp=8 pp=4 dp=2 (SP, interleaved 1F1B v=5), "
     "batch 64 x 8192", "llama3-70b", 8, 64,
     Layout(dp=2, tp=8, pp=4, sequence_parallel=True, zero_stage=1, num_microbatches=32,
            schedule="interleaved_1f1b", virtual_stages=5), "megatron",
     ("delayed", "tensorwise")),
)


def _estimate(model, nodes, batch, layout, engine, recipe):
    job = Job(global_batch=batch, seq_len=8192, engine=engine,
              precision="fp8" if recipe else "bf16", fp8_recipe=recipe or "none")
    return estimate(Plan(model=MODEL_PRESETS[model], cluster=load_cluster("h100-80g", nodes),
                         job=job, layout=layout))


def table(model, nodes, batch, layout, engine, recipes) -> list:
    ests = [_estimate(model, nodes, batch, layout, engine, r) for r in (None, *recipes)]
    head = ["GiB per GPU", "bf16", *(f"fp8 {r}" for r in recipes)]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for label, key in ROWS:
        cells = [f"{getattr(e.memory, key) / GIB:.2f}" for e in ests]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    lines.append("| tokens/s | " + " | ".join(f"{e.tokens_per_s:,.0f}" for e in ests) + " |")
    lines.append("| vs bf16 | 1.00x | " + " | ".join(
        f"{e.tokens_per_s / ests[0].tokens_per_s:.2f}x" for e in ests[1:]) + " |")
    return lines


def main() -> None:
    out = []
    for title, model, nodes, batch, layout, engine, recipes in CASES:
        lay = dataclasses.replace(layout, micro_batch=batch // layout.dp // layout.num_microbatches)
        out += [f"{title}:", "", *table(model, nodes, batch, lay, engine, recipes), ""]
    print("\n".join(out).rstrip())


if __name__ == "__main__":
    main()
