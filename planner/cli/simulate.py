"""`planner simulate`: one iteration as a timeline; Gantt chart as PNG, SVG or an HTML page
(planner/charts.py, the chart the UI shows), events as JSON."""

from planner.cli.common import (add_inputs, add_layout, build_plan, check_output, print_json,
                                strict_json, write_output)
from planner.schema import short_repr, show_path
from planner.units import fmt_seconds

COMM_NAMES = {"tp": "TP/SP collectives", "ep": "EP all-to-all", "pp": "pipeline sends",
              "dp_grad": "DP gradient sync",
              "dp_gather": "ZeRO parameter gathers"}


def add_parser(sub):
    p = sub.add_parser("simulate", help="simulate one iteration: timeline, bubble, critical path")
    p.add_argument("plan_file", nargs="?", metavar="plan.json",
                   help="plan to simulate (or give the model/cluster/layout flags)")
    p.add_argument("--out", help="write the Gantt chart (.png, .svg, or .html: a page with "
                                 "hover details and zoom) or the events (.json)")
    p.add_argument("--html", help="also write the chart as an HTML page")
    p.add_argument("--trace", help="also write the timeline as Chrome-trace / Perfetto JSON "
                                   "(chrome://tracing, ui.perfetto.dev): a process per "
                                   "pipeline rank, a thread per stream")
    add_inputs(p, required=False)
    add_layout(p)
    return p


def run(args) -> int:
    from planner.cost.estimate import estimate  # the simulator and cost model: only here
    from planner.sim.timeline import simulate
    if args.plan_file:
        if args.plan:
            raise ValueError("give the plan either as plan.json or as --plan, not both")
        args.plan = args.plan_file
    outputs = [(path, _format(path, html)) for path, html in ((args.out, False), (args.html, True))
               if path]
    for path, flag in ((args.out, "--out"), (args.html, "--html"), (args.trace, "--trace")):
        if path is not None:
            check_output(path, flag)  # before the simulation
    plan = build_plan(args)
    t = simulate(plan)  # refuses an iteration too large to simulate, before any work
    for path, kind in outputs:
        _write(path, kind, t)
    if args.trace:
        from planner.sim.trace import trace_events
        write_output(args.trace, strict_json(trace_events(t)), "--trace")
    if args.json:
        print_json(t.to_dict())
    else:
        print(summary_text(plan, t, estimate(plan).time.step_s))
    return 0


def _format(path: str, html: bool) -> str:
    """The output kind of `path`; a chart format whose renderer is missing is refused here,
    before the simulation runs."""
    kind = "html" if html else path.rsplit(".", 1)[-1].lower()
    kind = "html" if kind == "htm" else kind
    if kind not in ("png", "svg", "html", "json"):
        raise ValueError(f"--out {show_path(path)}: unknown format {short_repr(kind)}; use "
                         f".png, .svg, .html or .json")
    if kind != "json":
        from planner import charts
        charts.renderer(kind)
    return kind


def _write(path: str, kind: str, t) -> None:
    if kind == "json":
        data = strict_json(t.to_dict())
    else:
        from planner import charts
        chart = charts.timeline_chart(t.events, title=charts.timeline_title(t),
                                      width=charts.TIMELINE_WIDTH)
        data = charts.render(chart, kind)  # bytes for png, text otherwise
    write_output(path, data, "output")


def summary_text(plan, t, estimate_step_s: float) -> str:
    from planner.report import layout_summary
    lines = [f"{plan.model.name}: {layout_summary(plan.layout)}",
             f"step time (critical path) {fmt_seconds(t.step_s)}; closed-form estimate "
             f"{fmt_seconds(estimate_step_s)} ({100 * (t.step_s / estimate_step_s - 1):+.1f}%)",
             f"pipeline bubble {100 * t.bubble_fraction:.1f}% of {fmt_seconds(t.pipeline_s)}",
             "", "  stage  utilisation  peak in-flight chunks"]
    for r, (u, k) in enumerate(zip(t.utilisation, t.peak_inflight)):
        lines.append(f"  {r:>5}  {100 * u:10.1f}%  {k:>21}")
    if t.comm:
        lines += ["", f"  {'communication (all stages)':<28} {'total':>10} {'exposed':>10} "
                      f"{'overlapped':>10}"]
        for kind, c in t.comm.items():
            lines.append(f"  {COMM_NAMES.get(kind, kind):<28} {fmt_seconds(c.total_s):>10} "
                         f"{fmt_seconds(c.exposed_s):>10} {fmt_seconds(c.overlapped_s):>10}")
    crit = ", ".join(f"{k} {fmt_seconds(v)}" for k, v in
                     sorted(t.critical_path_s.items(), key=lambda kv: -kv[1]) if v > 0)
    lines += ["", f"critical path: {crit}"]
    return "\n".join(lines)
