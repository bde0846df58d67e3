"""`planner estimate`: memory, time and throughput of one plan."""

from planner.cli.common import (add_inputs, add_layout, add_trace, build_plan, check_output,
                                print_json, save_plan, traced_context)


def add_parser(sub):
    p = sub.add_parser("estimate", help="estimate memory, step time and MFU of one plan")
    add_inputs(p, required=False)
    add_layout(p)
    add_trace(p)
    p.add_argument("--out", help="write the plan, with this estimate, to a plan.json")
    return p


def run(args) -> int:
    from planner.cost.estimate import estimate  # the cost model: only when estimating
    from planner.report import estimate_text
    if args.out:
        check_output(args.out)  # before the work, not after it
    plan = build_plan(args)
    context, trace = traced_context(args, plan.model, plan.job)
    with context:
        est = estimate(plan)
    if args.out:
        save_plan(est.plan.with_estimate(est.to_dict()), args.out)
    if args.json:
        out = est.to_dict()
        if trace is not None:
            from planner.traced import comparison
            out["traced_activations"] = {**trace.to_dict(), **comparison(
                trace, plan.model, plan.job, plan.layout.micro_batch)}
        print_json(out)
        return 0
    if trace is not None:
        from planner.traced import comparison_text
        print(comparison_text(trace, plan.model, plan.job, plan.layout.micro_batch) + "\n")
    print(estimate_text(est))
    return 0
