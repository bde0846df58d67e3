"""`planner run plan.json`: train under the plan on this host with torchrun (runtime/), then
print predicted vs measured."""

from pathlib import Path

from planner.calibration.compare import compare
from planner.plan import Plan
from planner.report import compare_text
from planner.schema import load_json_file


def add_parser(sub):
    p = sub.add_parser("run", help="train for real under a plan on this host (torchrun)")
    p.add_argument("plan", help="plan.json from planner suggest / estimate --out")
    p.add_argument("--steps", type=int, default=50, help="training steps (default 50)")
    p.add_argument("--measured", default="measured.json",
                   help="where the run writes its measurements (default measured.json)")
    p.epilog = "flags after -- go to runtime.train, e.g. -- --data corpus.txt --lr 1e-3"
    return p


def run(args) -> int:
    plan = Plan.load(args.plan)  # a bad plan is a one-line error before anything starts
    # imported here: the runtime pulls in torch, which `planner` must not load at start-up
    from runtime.launch import run_plan
    code = run_plan(args.plan, args.steps, ["--out", args.measured, *args.passthrough])
    if code == 0 and Path(args.measured).is_file():
        print("\nPredicted vs measured (planner compare):")
        print(compare_text(compare(plan, load_json_file(args.measured, "measured"))))
    return code
