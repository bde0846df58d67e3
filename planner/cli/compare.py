"""`planner compare plan.json measured.json`: predicted vs measured, with relative errors."""

from planner.cli.common import print_json
from planner.report import compare_text


def add_parser(sub):
    p = sub.add_parser("compare", help="predicted vs measured for a runtime measured.json")
    p.add_argument("plan", help="the plan.json the run used")
    p.add_argument("measured", help="measured.json written by the runtime")
    p.add_argument("--json", action="store_true")
    return p


def run(args) -> int:
    from planner.calibration.compare import compare  # the cost model and pandas: only here
    from planner.measured import Measured
    from planner.plan import Plan
    # refused when the run used another plan: the first difference is named
    table = compare(Plan.load(args.plan), Measured.load(args.measured))
    if args.json:
        print_json(table.to_dict(orient="records"))
        return 0
    print(compare_text(table))
    return 0
