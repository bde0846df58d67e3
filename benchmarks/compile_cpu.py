"""torch.compile on this CPU: predicted vs measured step time of a small model, eager and with
each block compiled (Layout.compile), one gloo process and the `cpu` profile.

Prints one line per mode (predicted, measured, their ratio) and the compiled/eager speed-up
predicted and measured.  The measured step time is the runtime's median over the steps after
the first (the first holds Inductor's compilation).

    python benchmarks/compile_cpu.py [--steps 8] [--model tiny] [--seq-len 256] [--batch 8]
"""

import argparse
import dataclasses
import json
import subprocess
import sys
import tempfile
from pathlib import Path

from planner.cli.run import launch_command
from planner.cost.estimate import estimate
from planner.hardware import load_cluster
from planner.job import Job
from planner.plan import Layout, Plan
from planner.presets import MODEL_PRESETS


def _plan(model: str, seq_len: int, batch: int, micro_batch: int, compile_: bool) -> Plan:
    spec = dataclasses.replace(MODEL_PRESETS[model], max_seq_len=max(seq_len, 2))
    job = Job(global_batch=batch, seq_len=seq_len, precision="fp32")
    layout = Layout(micro_batch=micro_batch, num_microbatches=batch // micro_batch,
                    compile=compile_)
    return Plan(model=spec, cluster=load_cluster("cpu", 1, num_gpus=1), job=job, layout=layout)


def _measure(plan: Plan, steps: int, workdir: Path) -> float:
    path, out = workdir / "plan.json", workdir / "measured.json"
    plan.save(path)
    cmd = launch_command(plan, path, steps, ["--out", str(out), "--data-cap-mb", "1"])
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    return json.loads(out.read_text())["step_time_s"]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--model", default="tiny")
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--micro-batch", type=int, default=4)
    args = ap.parse_args(argv)
    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        for compile_ in (False, True):
            plan = _plan(args.model, args.seq_len, args.batch, args.micro_batch, compile_)
            predicted = estimate(plan).time.step_s
            measured = _measure(plan, args.steps, Path(tmp))
            rows[compile_] = (predicted, measured)
            print(f"{'compiled' if compile_ else 'eager':9s} predicted {predicted * 1e3:8.1f} ms"
                  f"  measured {measured * 1e3:8.1f} ms  predicted/measured "
                  f"{predicted / measured:5.2f}")
    (pe, me), (pc, mc) = rows[False], rows[True]
    print(f"speed-up from compile: predicted {pe / pc:.2f}x, measured {me / mc:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
