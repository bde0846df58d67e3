"""Altair charts of planner results (presentation only: units converted, nothing computed)."""

import altair as alt
import pandas as pd

from planner.plan import Layout
from planner.report import MEMORY_ROWS, TIME_ROWS, layout_summary
from planner.units import GIB

MEMORY_LABELS = [label for _, label, _ in MEMORY_ROWS]
TIME_LABELS = [label for _, label, _ in TIME_ROWS]


def memory_frame(estimates: dict) -> pd.DataFrame:
    """{plan label: estimate dict} -> long table (plan, component, GiB)."""
    rows = []
    for plan, est in estimates.items():
        for key, label, note in MEMORY_ROWS:
            rows.append({"plan": plan, "layout": _layout(est), "component": label,
                         "GiB": est["memory"][key] / GIB, "note": note})
    return pd.DataFrame(rows)


def time_frame(estimates: dict) -> pd.DataFrame:
    rows = []
    for plan, est in estimates.items():
        for key, label, note in TIME_ROWS:
            rows.append({"plan": plan, "layout": _layout(est), "component": label,
                         "ms": est["time"][key] * 1e3, "note": note})
    return pd.DataFrame(rows)


def _stacked_bars(df: pd.DataFrame, order: list, value: str, axis_title: str, labels: list,
                  legend: str, fmt: str, selected: str) -> alt.Chart:
    """One horizontal bar per plan, stacked by component in `labels` order."""
    return alt.Chart(df).mark_bar().encode(
        y=alt.Y("plan:N", sort=order, title=None, axis=alt.Axis(labelLimit=120)),
        x=alt.X(f"sum({value}):Q", title=axis_title),
        color=alt.Color("component:N", sort=labels, title=legend),
        order=alt.Order("component_order:Q"),
        opacity=_highlight(selected),
        tooltip=["plan", "layout", "component", alt.Tooltip(f"{value}:Q", format=fmt), "note"],
    ).transform_calculate(component_order=_order_expr(labels)).properties(
        height=max(120, 30 * len(order)))


def memory_chart(estimates: dict, capacity_bytes: float, selected: str = "",
                 headroom: float = 0.0) -> alt.LayerChart:
    """Stacked memory per plan with the GPU's memory as a red rule and, with a headroom, the
    limit the search keeps plans under as an orange one."""
    order = list(estimates)
    bars = _stacked_bars(memory_frame(estimates), order, "GiB", "GiB on the most loaded GPU",
                         MEMORY_LABELS, "memory", ".2f", selected)
    limits = [("GPU memory", capacity_bytes, "red")]
    if headroom:
        limits.append((f"search limit ({100 * headroom:.0f}% headroom)",
                       capacity_bytes * (1 - headroom), "orange"))
    rules = alt.Chart(pd.DataFrame([{"label": label, "GiB": value / GIB, "color": color}
                                    for label, value, color in limits])).mark_rule(
        strokeWidth=2, strokeDash=[6, 3]).encode(
        x="GiB:Q", color=alt.Color("color:N", scale=None),
        tooltip=["label", alt.Tooltip("GiB:Q", format=".1f")])
    return (bars + rules).properties(height=max(120, 30 * len(order)))


def time_chart(estimates: dict, selected: str = "") -> alt.Chart:
    return _stacked_bars(time_frame(estimates), list(estimates), "ms", "step time (ms)",
                         TIME_LABELS, "time", ".1f", selected)


def scatter_chart(points: pd.DataFrame, selected: str = "") -> alt.LayerChart:
    """Throughput vs memory of every feasible plan; the Pareto front as a line.
    `points` has columns plan, memory_GiB, tokens_per_s, pareto (bool)."""
    df = points.assign(selected=points["plan"] == selected)
    base = alt.Chart(df).encode(
        x=alt.X("memory_GiB:Q", title="memory on the most loaded GPU (GiB)",
                scale=alt.Scale(zero=False)),
        y=alt.Y("tokens_per_s:Q", title="tokens / s"))
    dots = base.mark_circle(size=28, opacity=0.45).encode(
        color=alt.Color("pareto:N", title="Pareto front",
                        scale=alt.Scale(domain=[True, False], range=["#d62728", "#7f7f7f"])),
        tooltip=["plan", alt.Tooltip("memory_GiB:Q", format=".2f"),
                 alt.Tooltip("tokens_per_s:Q", format=",.0f")])
    front = base.transform_filter("datum.pareto").mark_line(
        color="#d62728", point=True, interpolate="step-after")
    chosen = base.transform_filter("datum.selected").mark_point(
        size=220, shape="diamond", color="black", filled=True)
    return (dots + front + chosen).properties(height=320)


def timeline_chart(events: pd.DataFrame) -> alt.Chart:
    """Gantt chart of one simulated iteration: one row per pipeline rank and stream (drag or
    scroll to zoom in time)."""
    df = events.assign(lane=events["rank"].map(lambda r: f"rank {r}") + " " + events["stream"],
                       start_ms=events["start_s"] * 1e3, end_ms=events["end_s"] * 1e3)
    return alt.Chart(df).mark_bar(stroke="white", strokeWidth=0.3).encode(
        y=alt.Y("lane:N", title=None, sort=_lanes(df), axis=alt.Axis(labelOverlap=False)),
        x=alt.X("start_ms:Q", title="time in the step (ms)"), x2="end_ms:Q",
        color=alt.Color("kind:N", title="event"),
        opacity=alt.condition("datum.critical", alt.value(1.0), alt.value(0.55)),
        tooltip=["rank", "stream", "kind", "stage", "mb", "critical",
                 alt.Tooltip("start_ms:Q", format=".2f"), alt.Tooltip("end_ms:Q", format=".2f")],
    ).properties(height=max(120, 26 * df["lane"].nunique())).interactive(bind_y=False)


def _lanes(df: pd.DataFrame) -> list:
    """rank 0 compute, rank 0 comm, rank 1 compute, ..."""
    pairs = df[["rank", "stream", "lane"]].drop_duplicates()
    pairs = pairs.assign(o=pairs["stream"].ne("compute")).sort_values(["rank", "o"])
    return pairs["lane"].tolist()


def _layout(est: dict) -> str:
    return layout_summary(Layout.from_dict(est["plan"]["layout"]))


def _highlight(selected: str):
    if not selected:
        return alt.value(1.0)
    return alt.condition(alt.datum.plan == selected, alt.value(1.0), alt.value(0.45))


def _order_expr(labels: list) -> str:
    return "indexof(" + repr(labels).replace("'", '"') + ", datum.component)"
