"""Predicted FP8 gains against torchao's published float8 training run (README, FP8).

torchao/float8/README.md, "Performance" (torchao 0.10, torchtitan, PyTorch 2.7 nightly):
Llama-3 8B on 8x H100, batch 1 x 8192 per GPU, FSDP2, torch.compile, per-op selective
activation checkpointing; median tokens/s per GPU and peak memory (GB) as the table gives them.
The planner's run: the torch engine, dp=8 ZeRO-3, compiled blocks, the op-level recompute
policy (torchtitan's per-op SAC), on the h100-80g profile.  Prints one table."""

from planner.cost.estimate import estimate
from planner.hardware import load_cluster
from planner.job import Job
from planner.plan import Layout, Plan
from planner.presets import MODEL_PRESETS
from planner.units import GIB

# recipe -> (tokens/s per GPU, peak memory GB), torchao float8 README
PUBLISHED = {None: (6150.0, 47.65), "tensorwise": (7689.5, 47.77), "rowwise": (6768.0, 47.79)}
LAYOUT = Layout(dp=8, zero_stage=3, compile=True, recompute="op")


def _estimate(recipe):
    job = Job(global_batch=8, seq_len=8192, precision="fp8" if recipe else "bf16",
              fp8_recipe=recipe or "none")
    return estimate(Plan(model=MODEL_PRESETS["llama3-8b"], cluster=load_cluster("h100-80g", 1),
                         job=job, layout=LAYOUT))


def main() -> None:
    base = _estimate(None)
    print("| recipe | predicted speedup | published speedup | predicted memory change | "
          "published peak memory change |")
    print("|---|---|---|---|---|")
    for recipe in ("tensorwise", "rowwise"):
        est = _estimate(recipe)
        tps, mem = PUBLISHED[recipe]
        delta = (est.memory.total_bytes - base.memory.total_bytes) / GIB
        print(f"| {recipe} | {est.tokens_per_s / base.tokens_per_s:.2f}x | "
              f"{tps / PUBLISHED[None][0]:.2f}x | {delta:+.2f} GiB | "
              f"{mem - PUBLISHED[None][1]:+.2f} GB |")


if __name__ == "__main__":
    main()
