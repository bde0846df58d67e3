"""`planner run plan.json`: train under the plan on this host, then print predicted vs measured.

The command is planner.export's torchrun line for the plan (the one `planner export --to
torchrun` prints), started as a subprocess through `python -m runtime.launch` in place of
`torchrun`: the same launch, but it exits with the failing rank's code (README, "Exit codes")
instead of torchrun's 1 and a traceback. The planner never imports the runtime."""

from __future__ import annotations

import shlex
import subprocess
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from planner import export
from planner.report import compare_text
from planner.schema import load_json_file

if TYPE_CHECKING:  # planner.plan loads numpy: imported in run()
    from planner.plan import Plan

LAUNCHER = (sys.executable, "-m", "runtime.launch")  # stands in for `torchrun`


def add_parser(sub):
    p = sub.add_parser("run", help="train for real under a plan on this host (torchrun)")
    p.add_argument("plan", help="plan.json from planner suggest / estimate --out")
    p.add_argument("--steps", type=int, default=50, help="training steps (default 50)")
    p.add_argument("--measured", default="measured.json",
                   help="where the run writes its measurements (default measured.json)")
    p.epilog = "flags after -- go to runtime.train, e.g. -- --data corpus.txt --lr 1e-3"
    return p


def launch_command(plan: Plan, plan_path, steps: int, extra=()) -> list:
    """The argv that trains `plan` on this host: export.torchrun_lines' single-node line, with
    `torchrun` replaced by LAUNCHER and `extra` runtime.train flags appended."""
    lines = export.torchrun_lines(plan, plan_path=str(plan_path), steps=steps)
    if len(lines) != 1:
        raise ValueError(f"the plan spans {len(lines)} nodes and `planner run` starts this host "
                         f"only; run the lines of `planner export {plan_path} --to torchrun` "
                         f"(or --to slurm) on the nodes")
    argv = shlex.split(lines[0])
    if argv[0] != "torchrun":  # a change in export that this function must follow
        raise RuntimeError(f"unexpected launcher in the exported line: {lines[0]}")
    return [*LAUNCHER, *argv[1:], *extra]


def launch(cmd: list) -> int:
    """Run `cmd`; its exit code (128 + N if it died of signal N). On Ctrl-C the launcher, in the
    same process group, stops the ranks itself: wait for it (a second Ctrl-C terminates it)."""
    with subprocess.Popen(cmd) as proc:
        interrupted = False
        while True:
            try:
                code = proc.wait()
                break
            except KeyboardInterrupt:
                if interrupted:
                    proc.terminate()
                interrupted = True
    return 128 - code if code < 0 else code


def run(args) -> int:
    from planner.plan import Plan
    plan = Plan.load(args.plan)  # a bad plan is a one-line error before anything starts
    cmd = launch_command(plan, args.plan, args.steps,
                         ["--out", args.measured, *args.passthrough])
    code = launch(cmd)
    if code == 0 and Path(args.measured).is_file():
        from planner.calibration.compare import compare  # the cost model and pandas
        print("\nPredicted vs measured (planner compare):")
        print(compare_text(compare(plan, load_json_file(args.measured, "measured"))))
    return code
