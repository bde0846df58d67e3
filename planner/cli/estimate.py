"""`planner estimate`: memory, time and throughput of one plan."""

from planner.cli.common import (add_inputs, add_layout, build_plan, check_output, print_json,
                                save_plan)


def add_parser(sub):
    p = sub.add_parser("estimate", help="estimate memory, step time and MFU of one plan")
    add_inputs(p, required=False)
    add_layout(p)
    p.add_argument("--out", help="write the plan, with this estimate, to a plan.json")
    return p


def run(args) -> int:
    from planner.cost.estimate import estimate  # the cost model: only when estimating
    from planner.report import estimate_text
    if args.out:
        check_output(args.out)  # before the work, not after it
    est = estimate(build_plan(args))
    if args.out:
        save_plan(est.plan.with_estimate(est.to_dict()), args.out)
    if args.json:
        print_json(est.to_dict())
    else:
        print(estimate_text(est))
    return 0
