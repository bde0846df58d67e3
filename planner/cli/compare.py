"""`planner compare plan.json measured.json`: predicted vs measured, with relative errors."""

from planner.calibration.compare import compare
from planner.cli.common import print_json
from planner.plan import Plan
from planner.report import compare_text
from planner.schema import load_json_file


def add_parser(sub):
    p = sub.add_parser("compare", help="predicted vs measured for a runtime measured.json")
    p.add_argument("plan", help="the plan.json the run used")
    p.add_argument("measured", help="measured.json written by the runtime")
    p.add_argument("--json", action="store_true")
    return p


def run(args) -> int:
    table = compare(Plan.load(args.plan), load_json_file(args.measured, "measured"))
    if args.json:
        print_json(table.to_dict(orient="records"))
        return 0
    print(compare_text(table))
    return 0
