"""Altair charts of planner results (presentation only: units converted, nothing computed).

The memory and step-time bars and the simulated timeline are planner/charts.py's, the very
charts `planner simulate --out` writes; only the search's scatter plot is the page's own."""

import altair as alt
import pandas as pd

from planner.charts import memory_chart, time_chart, timeline_chart  # noqa: F401  (the page's)


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
