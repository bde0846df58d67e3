"""Validation study on one GPU: profile it, then for a grid of single-GPU configurations
(model size x micro-batch x sequence x recompute) compare measured peak memory and step time
with the planner's prediction (profiled cluster).  Targets: memory within 10% and no plan
predicted to fit that runs out of memory; step time within 10%.

    python benchmarks/validate_gpu.py [--steps 5] [--base h100-80g]
"""

import argparse
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from runtime_memory_gpu import _plan, _run  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
GRID = [(model, seq, "bf16", dict(micro_batch=mb, recompute=rc))
        for model, seq in (("gpt2-124m", 1024), ("gpt2-355m", 1024), ("llama-1.1b", 2048))
        for mb in (2, 8) for rc in ("none", "full")] + \
       [("llama-1.1b", 4096, "bf16", dict(micro_batch=2, recompute="selective")),
        ("gpt2-774m", 1024, "bf16", dict(micro_batch=4, recompute="selective"))]


def _profile(base: str, work: Path) -> Path:
    path = work / "gpu_profile.json"
    subprocess.run([sys.executable, "-m", "planner.cli", "profile", "--out", str(path),
                    "--ranks", "1", "--base", base], cwd=ROOT, check=True)
    return path


def _row(model: str, plan, measured: dict) -> tuple:
    """(markdown row, memory error %, time error %, predicted-fits-but-OOM)."""
    from planner.cost.estimate import estimate
    est = estimate(plan)
    predicted = est.memory.total_bytes - est.memory.framework_bytes
    lay = plan.layout
    name = f"{model} seq{plan.job.seq_len} mb{lay.micro_batch} {lay.recompute}"
    if "error" in measured:
        oom_miss = measured["error"] == "OOM" and est.fits
        return f"| {name} | {predicted / 2**30:.2f} | {measured['error']} | | " \
               f"{est.step_s:.3f} | | | {est.fits} |", None, None, oom_miss
    peak = max(r["peak_allocated_bytes"] for r in measured["ranks"])
    mem_err = 100 * (predicted / peak - 1)
    time_err = 100 * (est.step_s / measured["step_time_s"] - 1)
    return (f"| {name} | {predicted / 2**30:.2f} | {peak / 2**30:.2f} | {mem_err:+.1f}% | "
            f"{est.step_s:.3f} | {measured['step_time_s']:.3f} | {time_err:+.1f}% | "
            f"{est.fits} |"), mem_err, time_err, False


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--base", default="h100-80g", help="profile whose unmeasured terms are kept")
    args = p.parse_args()
    import torch
    if not torch.cuda.is_available():
        print("validate_gpu: needs a CUDA GPU and found none; nothing measured", file=sys.stderr)
        return 1
    with tempfile.TemporaryDirectory() as tmp:
        profile = str(_profile(args.base, Path(tmp)))
        print("| configuration | predicted GiB | peak GiB | error | predicted s | measured s | "
              "error | fits |")
        print("|---|---:|---:|---:|---:|---:|---:|---|")
        mem_errs, time_errs, misses = [], [], 0
        for model, seq, precision, layout in GRID:
            plan = _plan(model, seq, precision, layout, profile)
            row, mem_err, time_err, miss = _row(model, plan, _run(plan, args.steps, Path(tmp)))
            print(row, flush=True)
            misses += miss
            if mem_err is not None:
                mem_errs.append(abs(mem_err))
                time_errs.append(abs(time_err))
    print(f"\nmean |memory error| {sum(mem_errs) / max(1, len(mem_errs)):.1f}%, "
          f"mean |step-time error| {sum(time_errs) / max(1, len(time_errs)):.1f}%, "
          f"predicted to fit but ran out of memory: {misses}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
