"""`planner estimate`: memory, time and throughput of one plan."""

from planner.cli.common import add_inputs, add_layout, build_plan, print_json


def add_parser(sub):
    p = sub.add_parser("estimate", help="estimate memory, step time and MFU of one plan")
    add_inputs(p, required=False)
    add_layout(p)
    p.add_argument("--out", help="write the plan, with this estimate, to a plan.json")
    return p


def run(args) -> int:
    from planner.cost.estimate import estimate  # the cost model: only when estimating
    from planner.report import estimate_text
    est = estimate(build_plan(args))
    if args.out:
        est.plan.with_estimate(est.to_dict()).save(args.out)
    if args.json:
        print_json(est.to_dict())
    else:
        print(estimate_text(est))
    return 0
