"""Start `torchrun` for a plan on this host (`planner run plan.json`).

Imports neither torch nor the rest of the runtime: the planner CLI calls this and must stay
torch-free at import (ARCHITECTURE.md)."""

import subprocess
import sys

from planner.plan import Plan


def torchrun_command(plan_path: str, steps: int, extra_args=(), nproc: int = None) -> list:
    """The command line that trains `plan_path` with one process per rank of the plan."""
    if nproc is None:
        nproc = Plan.load(plan_path).layout.world_size
    return [sys.executable, "-m", "torch.distributed.run", "--standalone",
            f"--nproc-per-node={nproc}", "-m", "runtime.train", "--plan", str(plan_path),
            "--steps", str(steps), *extra_args]


def run_plan(plan_path, steps: int, extra_args=()) -> int:
    """Train under the plan with torchrun on this host; returns torchrun's exit code.

    A plan that does not load raises ValueError (one line) before anything starts."""
    cmd = torchrun_command(str(plan_path), steps, list(extra_args))
    return subprocess.run(cmd, check=False).returncode
