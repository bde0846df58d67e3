"""Chart definitions of planner results, as Vega-Lite specs built with Altair: the simulated
timeline (Gantt chart) and the stacked memory and step-time bars of a few plans.

One definition serves both faces: the Streamlit page shows these charts (app/charts.py hands
them to st.altair_chart) and `planner simulate --out` writes the timeline as PNG or SVG, drawn
by vl-convert-python (Vega's own renderer compiled into one wheel, no browser), or as one HTML
page with the spec and the Vega JavaScript inlined.  Presentation only: units are converted,
nothing is computed.

The data rides along as pandas DataFrames, which Altair (and Streamlit, as Arrow) take without
walking them value by value: a 1T-parameter pipeline has ~30,000 events.  Altair, pandas and
vl-convert are imported inside the functions, so `planner` imports without them; without Altair
or vl-convert a chart is a one-line ValueError naming the extra to install."""

from planner.report import MEMORY_ROWS, TIME_ROWS
from planner.units import GIB

EXTRA = 'pip install "parallel-planner[charts]"'
FORMATS = ("png", "svg", "html")

# event kind -> (legend name, colour); the legend lists the kinds present, in this order
KINDS = {
    "F": ("forward", "#4c78a8"), "B": ("backward", "#54a24b"), "I": ("input grad", "#54a24b"),
    "W": ("weight grad", "#72b7b2"), "R": ("recompute", "#f58518"),
    "optimizer": ("optimizer", "#e45756"), "send": ("p2p send", "#969696"),
    "grad_sync": ("dp grad sync", "#b279a2"), "gather": ("param gather", "#eeca3b"),
    "param_sync": ("param broadcast", "#d6a52b"),
}
CHUNK_KINDS = ("F", "B", "I", "W", "R")  # drawn lighter on a rank's later model chunks
MEMORY_LABELS = [label for _, label, _ in MEMORY_ROWS]
TIME_LABELS = [label for _, label, _ in TIME_ROWS]
LANE_PX = 22        # height of one stream row (less when there are more than 32 rows)
TIMELINE_WIDTH = 1000  # plot width of the pictures the CLI writes (the UI stretches the chart)
TIMELINE_COLUMNS = ["lane", "kind", "event", "chunk", "mb", "start", "end", "bar_end", "mid",
                    "label", "wide", "critical", "later_chunk", "outline", "outline_px"]
BAR_COLUMNS = ["plan", "layout", "component", "note"]  # + the value column (GiB or ms)


def altair():
    """The altair module, or a one-line ValueError naming the extra."""
    try:
        import altair as alt
    except ImportError:
        raise ValueError(f"charts need altair: {EXTRA}") from None
    return alt


def time_unit(step_s: float) -> tuple:
    """(factor, name) of the unit the time axis is drawn in."""
    return (1.0, "s") if step_s >= 2 else (1e3, "ms") if step_s >= 2e-3 else (1e6, "us")


def timeline_title(t: dict) -> str:
    """Schedule, step time and bubble of a Timeline.to_dict() (or a Timeline)."""
    t = t if isinstance(t, dict) else t.to_dict(events=False)
    scale, unit = time_unit(t["step_s"])
    return (f"{t['schedule']} pp={t['pp']} v={t['virtual_stages']} m={t['num_microbatches']}:"
            f" step {t['step_s'] * scale:.4g} {unit}, bubble {100 * t['bubble_fraction']:.1f}%")


def _frame(rows: list, columns: list):
    import pandas as pd
    return pd.DataFrame(rows, columns=columns)


def _records(events) -> list:
    """Plain dicts of events given as Event objects, dicts or a DataFrame."""
    if hasattr(events, "columns"):  # a DataFrame (the UI's)
        events = events.to_dict(orient="records")
    return [e if isinstance(e, dict) else e.to_dict() for e in events]


def timeline_rows(events) -> tuple:
    """(rows for the chart, lanes in order, unit name) of one iteration's events."""
    events = _records(events)
    pp = 1 + max((int(e["rank"]) for e in events), default=0)
    step_s = max((float(e["end_s"]) for e in events), default=0.0)
    scale, unit = time_unit(step_s)
    min_len = step_s / 1500  # shorter events are drawn this long (under a pixel otherwise)
    rows = []
    for e in events:
        start, end = float(e["start_s"]), float(e["end_s"])
        if end <= start:
            continue
        kind, rank, stage, mb = str(e["kind"]), int(e["rank"]), int(e["stage"]), int(e["mb"])
        compute = e["stream"] == "compute"
        critical, wide = bool(e["critical"]), (end - start) / step_s
        rows.append({
            "lane": f"stage {rank} {'compute' if compute else 'comm'}", "kind": kind,
            "event": KINDS.get(kind, (kind, ""))[0], "chunk": stage, "mb": mb,
            "start": round(start * scale, 6), "end": round(end * scale, 6),
            "bar_end": round(max(end, start + min_len) * scale, 6),
            "mid": round((start + end) / 2 * scale, 6),
            "label": str(mb) if compute and mb >= 0 else "OPT" if kind == "optimizer" else "",
            "wide": wide, "critical": critical,
            "later_chunk": kind in CHUNK_KINDS and stage >= pp,
            # outline: black on the critical path, else a white seam between wide neighbours
            "outline": "black" if critical else "white",
            "outline_px": 1.2 if critical else 0.4 if wide > 0.004 else 0.0,
        })
    lanes = [f"stage {r} {s}" for r in range(pp) for s in ("compute", "comm")]
    return rows, lanes, unit


def timeline_chart(events, title: str = "", width=None):
    """Gantt chart of one simulated iteration: per pipeline stage a compute row over a comm row;
    colour = event kind (later model chunks lighter), black outline = critical path, the number
    in a bar = its micro-batch.  `events`: Timeline.events, their to_dict()s or a DataFrame of
    them.  Drag or scroll to zoom in time (in the UI and the HTML page)."""
    alt = altair()
    rows, lanes, unit = timeline_rows(events)
    kinds = {r["kind"] for r in rows}
    present = [k for k in KINDS if k in kinds]
    names = list(dict.fromkeys(KINDS[k][0] for k in present))
    colors = [next(KINDS[k][1] for k in present if KINDS[k][0] == n) for n in names]
    lane_px = LANE_PX if len(lanes) <= 32 else max(6, 32 * LANE_PX // len(lanes))
    data = _frame(rows, TIMELINE_COLUMNS)
    base = alt.Chart(data).encode(
        y=alt.Y("lane:N", title=None, sort=lanes, scale=alt.Scale(domain=lanes),
                axis=alt.Axis(labelOverlap=False, labelLimit=160,
                              labelFontSize=min(10, lane_px - 1))))
    bars = base.mark_bar(strokeJoin="miter").encode(
        x=alt.X("start:Q", title=f"time in the step ({unit})", scale=alt.Scale(nice=False)),
        x2="bar_end:Q",
        color=alt.Color("event:N", title="event", scale=alt.Scale(domain=names, range=colors),
                        legend=alt.Legend(orient="bottom", direction="horizontal")),
        opacity=alt.condition("datum.later_chunk", alt.value(0.5), alt.value(1.0)),
        stroke=alt.Stroke("outline:N", scale=None),
        strokeWidth=alt.StrokeWidth("outline_px:Q", scale=None),
        tooltip=["lane:N", "event:N", alt.Tooltip("chunk:O", title="model chunk"), "mb:O",
                 "critical:N",
                 alt.Tooltip("start:Q", title=f"start ({unit})", format=".4g"),
                 alt.Tooltip("end:Q", title=f"end ({unit})", format=".4g")],
    ).interactive(bind_y=False)
    min_wide = 18 / (width or 600)  # label a bar only if it is about 18 px wide
    labels = base.transform_filter(
        f"datum.label != '' && datum.wide >= {min_wide:.4f}").mark_text(
        color="white", fontSize=10, baseline="middle").encode(x="mid:Q", text="label:N")
    props = {"height": lane_px * len(lanes)}
    if width:
        props["width"] = width
    chart = alt.layer(bars, labels).properties(**props)
    return chart.properties(title=title) if title else chart


def _layout(est: dict) -> str:
    from planner.plan import Layout  # the plan module only when a chart is drawn
    from planner.report import layout_summary
    return layout_summary(Layout.from_dict(est["plan"]["layout"]))


def breakdown_rows(estimates: dict, rows: list, section: str, value: str, factor: float) -> list:
    """{plan label: estimate dict} -> one row per (plan, component)."""
    out = []
    for plan, est in estimates.items():
        layout = _layout(est)
        for key, label, note in rows:
            out.append({"plan": plan, "layout": layout, "component": label,
                        value: est[section].get(key, 0.0) / factor, "note": note})
    return out


def _stacked_bars(alt, order: list, value: str, axis_title: str, labels: list, legend: str,
                  fmt: str, selected: str):
    """One horizontal bar per plan, stacked by component in `labels` order."""
    opacity = alt.value(1.0) if not selected else alt.condition(
        alt.datum.plan == selected, alt.value(1.0), alt.value(0.45))
    return alt.Chart().mark_bar().encode(
        y=alt.Y("plan:N", sort=order, title=None, axis=alt.Axis(labelLimit=120)),
        x=alt.X(f"sum({value}):Q", title=axis_title),
        color=alt.Color("component:N", sort=labels, title=legend),
        order=alt.Order("component_order:Q"),
        opacity=opacity,
        tooltip=["plan:N", "layout:N", "component:N", alt.Tooltip(f"{value}:Q", format=fmt),
                 "note:N"],
    ).transform_calculate(
        component_order="indexof(" + repr(labels).replace("'", '"') + ", datum.component)")


def memory_chart(estimates: dict, capacity_bytes: float, selected: str = "",
                 headroom: float = 0.0):
    """Stacked memory on the most loaded GPU per plan ({label: estimate dict}), with the GPU's
    memory as a red rule and, with a headroom, the limit the search keeps plans under as an
    orange one."""
    alt = altair()
    order = list(estimates)
    bars = _stacked_bars(alt, order, "GiB", "GiB on the most loaded GPU", MEMORY_LABELS,
                         "memory", ".2f", selected)
    limits = [("GPU memory", capacity_bytes, "red")]
    if headroom:
        limits.append((f"search limit ({100 * headroom:.0f}% headroom)",
                       capacity_bytes * (1 - headroom), "orange"))
    rules = alt.Chart(_frame([{"label": label, "GiB": value / GIB, "color": color}
                              for label, value, color in limits], ["label", "GiB", "color"])
                      ).mark_rule(strokeWidth=2, strokeDash=[6, 3]).encode(
        x="GiB:Q", color=alt.Color("color:N", scale=None),
        tooltip=["label:N", alt.Tooltip("GiB:Q", format=".1f")])
    bars.data = _frame(breakdown_rows(estimates, MEMORY_ROWS, "memory", "GiB", GIB),
                       BAR_COLUMNS + ["GiB"])
    return alt.layer(bars, rules).properties(height=max(120, 30 * len(order)))


def time_chart(estimates: dict, selected: str = ""):
    """Stacked step-time components per plan ({label: estimate dict}), in ms."""
    alt = altair()
    order = list(estimates)
    bars = _stacked_bars(alt, order, "ms", "step time (ms)", TIME_LABELS, "time", ".1f",
                         selected)
    bars.data = _frame(breakdown_rows(estimates, TIME_ROWS, "time", "ms", 1e-3),
                       BAR_COLUMNS + ["ms"])
    return bars.properties(height=max(120, 30 * len(order)))


def spec(chart) -> dict:
    """The chart's Vega-Lite spec with its data inline (under "datasets"), however many rows."""
    alt = altair()
    with alt.data_transformers.enable("default", max_rows=None):
        return chart.to_dict()


def render(chart, fmt: str):
    """The chart as PNG bytes, SVG text or a self-contained HTML page (spec and Vega's
    JavaScript inlined: it opens without a network)."""
    if fmt not in FORMATS:
        raise ValueError(f"unknown chart format {fmt!r}; use one of {', '.join(FORMATS)}")
    vlc = renderer(fmt)
    vl_spec = spec(chart)
    version = altair().SCHEMA_VERSION.lstrip("v").rsplit(".", 1)[0]  # e.g. "6.4"
    if fmt == "html":
        return vlc.vegalite_to_html(vl_spec, vl_version=version, bundle=True)
    if fmt == "png":
        return vlc.vegalite_to_png(vl_spec, vl_version=version, scale=2)
    return vlc.vegalite_to_svg(vl_spec, vl_version=version)


def renderer(fmt: str = "png"):
    """vl_convert (and altair), or a one-line ValueError naming the extra to install."""
    altair()
    try:
        import vl_convert
    except ImportError:
        raise ValueError(f"writing a {fmt.upper()} chart needs vl-convert-python: "
                         f"{EXTRA}") from None
    return vl_convert
