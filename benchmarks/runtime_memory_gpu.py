"""Measured peak GPU memory vs the planner's prediction, for at least 8 configurations.

Each configuration trains a few steps with `python -m runtime.train` (torchrun when it needs
more than one GPU) in a fresh process and reads `peak_allocated_bytes`
(torch.cuda.max_memory_allocated) from measured.json; the prediction is the planner's
rank_memory() total without the framework overhead, as `planner compare` does. A run that runs
out of memory is reported as OOM, next to whether the planner said it fits.

    python benchmarks/runtime_memory_gpu.py [--gpus 1] [--steps 3] [--profile h100-80g]
"""

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
LLAMA_1B = dict(name="llama-1.1b", arch="llama", num_layers=22, hidden_size=2048, num_heads=32,
                num_kv_heads=4, ffn_hidden_size=5632, vocab_size=32000, max_seq_len=2048,
                tie_embeddings=False, linear_bias=False)
# (model, seq, precision, layout overrides): one GPU unless the layout needs more.
CONFIGS = [
    ("gpt2-124m", 1024, "bf16", dict(micro_batch=8)),
    ("gpt2-355m", 1024, "bf16", dict(micro_batch=8, recompute="selective")),
    ("gpt2-355m", 1024, "bf16", dict(micro_batch=8, recompute="full")),
    ("gpt2-774m", 1024, "fp32", dict(micro_batch=4)),
    ("gpt2-1.5b", 1024, "bf16", dict(micro_batch=4, recompute="full")),
    ("llama-1.1b", 2048, "bf16", dict(micro_batch=4)),
    ("llama-1.1b", 2048, "bf16", dict(micro_batch=8, recompute="full")),
    ("llama-1.1b", 2048, "bf16", dict(micro_batch=2, num_microbatches=4)),
    ("llama-1.1b", 2048, "bf16", dict(micro_batch=32)),            # expected not to fit
    ("llama2-7b", 4096, "bf16", dict(micro_batch=1)),              # 16 B/param: does not fit
    ("gpt2-355m", 1024, "bf16", dict(dp=2, micro_batch=8, zero_stage=3)),
    ("gpt2-355m", 1024, "bf16", dict(tp=2, micro_batch=8, sequence_parallel=True)),
    ("llama-1.1b", 2048, "bf16", dict(pp=2, micro_batch=2, num_microbatches=4)),
]


def _plan(model: str, seq: int, precision: str, layout: dict, profile: str):
    from planner.hardware import load_cluster
    from planner.job import Job
    from planner.plan import Layout, Plan
    from planner.presets import MODEL_PRESETS
    from planner.spec import ModelSpec
    spec = ModelSpec(**LLAMA_1B) if model == "llama-1.1b" else MODEL_PRESETS[model]
    lay = Layout(**layout)
    job = Job(global_batch=lay.micro_batch * lay.num_microbatches * lay.dp, seq_len=seq,
              precision=precision)
    return Plan(model=spec, cluster=load_cluster(profile, 1, num_gpus=lay.world_size),
                job=job, layout=lay)


def _run(plan, steps: int, work: Path) -> dict:
    plan_path, out = work / "plan.json", work / "measured.json"
    plan.save(plan_path)
    args = ["--plan", str(plan_path), "--steps", str(steps), "--out", str(out)]
    n = plan.layout.world_size
    cmd = ([sys.executable, "-m", "torch.distributed.run", "--standalone",
            f"--nproc-per-node={n}", "-m", "runtime.train", *args] if n > 1 else
           [sys.executable, "-m", "runtime.train", *args])
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    if proc.returncode != 0:
        oom = "OutOfMemoryError" in proc.stdout + proc.stderr or "out of memory" in proc.stderr
        return {"error": "OOM" if oom else (proc.stderr.strip().splitlines() or ["?"])[-1]}
    return json.loads(out.read_text())


def _row(model, plan, measured) -> str:
    from planner.cost.memory import memory_breakdown
    mem = memory_breakdown(plan)
    predicted = mem.total_bytes - mem.framework_bytes
    lay = plan.layout
    name = (f"{model} seq{plan.job.seq_len} {plan.job.precision} dp{lay.dp} tp{lay.tp} "
            f"pp{lay.pp} z{lay.zero_stage} mb{lay.micro_batch}x{lay.num_microbatches} "
            f"{lay.recompute}")
    if "error" in measured:
        return f"| {name} | {predicted / 2**30:.2f} | {measured['error']} | | {mem.fits} |"
    peak = max(r["peak_allocated_bytes"] for r in measured["ranks"])
    err = 100 * (predicted - peak) / peak
    return f"| {name} | {predicted / 2**30:.2f} | {peak / 2**30:.2f} | {err:+.1f}% | {mem.fits} |"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--gpus", type=int, default=1, help="GPUs on this host to use")
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--profile", default="h100-80g", help="hardware profile of this GPU")
    args = p.parse_args()
    import torch
    if not torch.cuda.is_available():
        print("runtime_memory_gpu: needs a CUDA GPU and found none; nothing measured",
              file=sys.stderr)
        return 1
    print("| configuration | predicted GiB | measured peak GiB | error | planner fits |")
    print("|---|---|---|---|---|")
    for model, seq, precision, layout in CONFIGS:
        plan = _plan(model, seq, precision, layout, args.profile)
        if plan.layout.world_size > args.gpus:
            continue
        with tempfile.TemporaryDirectory() as work:
            print(_row(model, plan, _run(plan, args.steps, Path(work))), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
