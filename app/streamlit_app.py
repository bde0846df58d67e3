"""Streamlit planning UI: `streamlit run app/streamlit_app.py` (or `planner ui`).

The same library calls as `planner suggest` / `estimate` / `compare`, shown as tables and charts.
No formulas here: every number comes from planner."""

import json
import re
import sys
from pathlib import Path

import pandas as pd
import streamlit as st

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a source checkout too

from app import backend, charts  # noqa: E402
from app.inputs import chosen, sidebar  # noqa: E402
from app.searching import search_results  # noqa: E402
from app.uploads import MAX_UPLOAD_BYTES, measured_from_upload  # noqa: E402
from app.whatif import layout_by_hand  # noqa: E402
from planner.units import GIB, fmt_bytes, fmt_seconds  # noqa: E402
from planner.report import fp8_gain_text  # noqa: E402

TOP_CHART = 5  # plans in the memory and time bars
BY_HAND = "set by hand"
# what markdown (st.markdown, st.error, ...) would read as markup in a planner message:
# `dp*tp*pp` or `layers_per_stage` as emphasis, `$` as math, `[`/`:red[` as a link or a
# colour, `<` as HTML; and at the start of a line `#`, `-`, `+` or `1.` as blocks
_INLINE_MARKUP = re.compile(r"[\\`*_\[\]<>$~|]")
_LEADING_MARKUP = re.compile(r"^(\s*)([#+-]|\d+(?=\.))", re.MULTILINE)
# what belongs to one set of inputs: the what-if panel's starting layout
WHATIF_STATE = ("_last_picked", "_hand_seeded")


def plain(text) -> str:
    """`text` shown literally by st.markdown / st.error / st.warning (markup escaped)."""
    text = _INLINE_MARKUP.sub(lambda m: "\\" + m.group(0), str(text))
    return _LEADING_MARKUP.sub(lambda m: m.group(1) + (
        m.group(2) + "\\" if m.group(2)[0].isdigit() else "\\" + m.group(2)), text)


def forget_other_inputs(key: str) -> None:
    """New model, cluster or job: the what-if panel starts again from the new top plan (a
    layout of the previous inputs would show as invalid)."""
    if st.session_state.get("_inputs_key") != key:
        for name in WHATIF_STATE:
            st.session_state.pop(name, None)
        st.session_state["_inputs_key"] = key


def results_section(key: str, constraints) -> pd.DataFrame:
    """Ranked table, rejected reasons; returns the ranked plans ('' frame if no search)."""
    try:
        res, why = search_results(key, constraints.max_tp, constraints.headroom,
                                  constraints.objective, constraints.token_budget)
    except ValueError as exc:
        res, why = None, f"the search refused these inputs: {exc}"
    if res is None:
        st.session_state["_results"] = None  # not the previous inputs' results
        st.warning(f"No ranked plans: {plain(why)}. Set a layout by hand below.")
        return pd.DataFrame()
    plans = res["plans"]
    st.subheader("Ranked plans")
    st.caption(f"{res['searched']:,} layouts considered, {res['num_fit']:,} fit; "
               f"search took {res['elapsed_s']:.2f} s (cached on repeat)")
    if plans.empty:
        st.error(nothing_fits_text(res))
    else:
        shown = plans.drop(columns=["layout_json"])
        st.dataframe(shown, hide_index=True, key="plan_table", on_select="rerun",
                     selection_mode="single-row", column_config=_column_config())
    st.session_state["_results"] = res
    return plans


def nothing_fits_text(res: dict) -> str:
    """The nothing-fits box: what `planner suggest` prints (the least memory needed, then each
    relaxation that was re-run: ZeRO-3, recompute, headroom, N more nodes, bigger GPUs)."""
    lines = res.get("advice") or []
    if not lines:
        text = "No layout fits: see the rejected plans below."
        if res["closest"]:
            text += (f" Closest: {res['closest']['layout']} needs "
                     f"{res['closest']['memory_GiB']:.1f} GiB per GPU.")
        return plain(text)
    items = "\n".join(f"- {plain(line.strip())}" for line in lines[1:])
    return plain(lines[0]) + ("\n\n" + items if items else "")


def closest_layout() -> dict:
    """When nothing fits: the layout that needs the least memory (the what-if starts there),
    else {}."""
    res = st.session_state.get("_results") or {}
    closest = res.get("closest")
    return json.loads(closest["layout_json"]) if closest else {}


def _column_config() -> dict:
    num = st.column_config.NumberColumn
    return {"memory_GiB": num("memory (GiB)", format="%.1f"),
            "step": st.column_config.TextColumn("step time"),
            "tokens_per_s": num("tokens/s", format="%d"), "MFU_%": num("MFU %", format="%.1f")}


def pick_plan(plans: pd.DataFrame, layout_hint: dict):
    """The plan to inspect: a table row (select box or clicked row) or a hand-set layout, which
    starts from the table plan inspected last."""
    options = [f"#{r.rank}  {r.layout}" for r in plans.itertuples()] + [BY_HAND]
    sel = st.session_state.get("plan_table")
    rows = sel.selection.rows if sel is not None and hasattr(sel, "selection") else []
    if rows and rows != st.session_state.get("_table_rows"):
        st.session_state["pick"] = options[rows[0]]
    st.session_state["_table_rows"] = rows
    if st.session_state.get("pick") not in options:
        st.session_state.pop("pick", None)
    choice = st.selectbox("Plan to inspect (or click a table row)", options, key="pick")
    if choice == BY_HAND:
        return layout_by_hand(st.session_state.get("_last_picked", layout_hint))
    layout = json.loads(plans.iloc[options.index(chosen(choice))]["layout_json"])
    st.session_state["_last_picked"] = layout
    return layout


def estimate_section(key: str, layout: dict):
    """The selected layout's estimate, or its one-line validation error."""
    error = backend.check_layout(key, layout)
    if error:
        st.error(f"Invalid layout: {plain(error)}")
        return None
    try:
        est = backend.estimate_dict(key, json.dumps(layout, sort_keys=True))
    except ValueError as exc:
        st.error(f"Cannot estimate this layout: {plain(exc)}")
        return None
    mem, t = est["memory"], est["time"]
    cols = st.columns(5)
    cols[0].metric("memory / GPU", fmt_bytes(mem["total_bytes"]),
                   f"{100 * mem['total_bytes'] / mem['capacity_bytes']:.0f}% of "
                   f"{fmt_bytes(mem['capacity_bytes'])}", delta_color="off")
    cols[1].metric("step time", fmt_seconds(t["step_s"]))
    cols[2].metric("tokens / s", f"{est['tokens_per_s']:,.0f}")
    cols[3].metric("MFU", f"{100 * est['mfu']:.1f}%")
    cols[4].metric("fits", "yes" if est["fits"] else "NO")
    if est.get("fp8_gain"):
        st.info(fp8_gain_text(est["fp8_gain"]))
    if not est["fits"]:
        st.error(f"Does not fit: {fmt_bytes(mem['total_bytes'])} on pipeline stage "
                 f"{mem['pp_rank']} > {fmt_bytes(mem['capacity_bytes'])}")
    return est


def breakdown_charts(key: str, plans: pd.DataFrame, layout: dict, est: dict,
                     headroom: float) -> None:
    """Memory and step-time bars of the top plans plus the selected one."""
    ests, sel_label = {}, "selected"
    for row in plans.head(TOP_CHART).itertuples():
        ests[f"#{row.rank}"] = backend.estimate_dict(key, row.layout_json)
        if json.loads(row.layout_json) == layout:
            sel_label = f"#{row.rank}"
    ests.setdefault(sel_label, est)
    left, right = st.columns(2)
    with left:
        st.markdown("**Memory per GPU** (red line: GPU memory; orange: the search's limit "
                    "after headroom; hover for layouts)")
        st.altair_chart(charts.memory_chart(ests, est["memory"]["capacity_bytes"], sel_label,
                                            headroom), width="stretch")
    with right:
        st.markdown("**Step time breakdown**")
        st.altair_chart(charts.time_chart(ests, sel_label), width="stretch")


def scatter_and_rejected(layout: dict) -> None:
    res = st.session_state.get("_results")
    if not res:
        return
    left, right = st.columns([1, 1])
    with left:
        st.markdown("**Throughput vs memory** (all plans that fit; red: Pareto front)")
        if res["feasible"].empty:
            st.info("no plan fits")
        else:
            st.altair_chart(charts.scatter_chart(res["feasible"], backend.label(layout)),
                            width="stretch")
    with right:
        st.markdown("**Rejected plans by reason**")
        st.dataframe(res["rejected"], hide_index=True, width="stretch",
                     column_config={"reason": st.column_config.TextColumn(width="medium"),
                                    "plans": st.column_config.NumberColumn(width="small"),
                                    "example": st.column_config.TextColumn(width="large")})


def timeline_section(key: str, layout: dict) -> None:
    st.subheader("Pipeline timeline of the selected plan (simulated)")
    events, info = backend.timeline_events(key, json.dumps(layout, sort_keys=True))
    if events is None:
        st.info(plain(info))
        return
    st.caption(plain(f"{info['schedule']}, pp={info['pp']}, {info['num_microbatches']} "
                     f"micro-batches: step {fmt_seconds(info['step_s'])}, bubble "
                     f"{100 * info['bubble_fraction']:.1f}% (opaque bars: critical path; "
                     f"scroll to zoom)"))
    st.altair_chart(charts.timeline_chart(events), width="stretch")


def handoff_section(key: str, layout: dict) -> None:
    st.subheader("Hand-off")
    cols = st.columns(5)
    cols[0].download_button("plan.json", backend.plan_json(key, layout), "plan.json",
                            mime="application/json")
    files = backend.exports(key, json.dumps(layout, sort_keys=True))
    for i, (name, text) in enumerate(files.items()):
        cols[1 + i % 4].download_button(name, text, name, key=f"dl_{name}")
    up = st.file_uploader("Compare with a run: upload its measured.json", type=["json"],
                          key="measured_file", help=f"at most {MAX_UPLOAD_BYTES // 1000} kB")
    if up is not None:
        compare_section(key, layout, up)


def compare_section(key: str, layout: dict, up) -> None:
    try:
        measured = measured_from_upload(up.getvalue(), up.name)
        plan = backend.build_plan(key, layout)
        if measured.get("plan"):
            plan = backend.plan_from_measured(measured)
        table = backend.compare_table(plan, measured)
    except ValueError as exc:
        st.error(f"Cannot read {plain(up.name)}: {plain(exc)}")
        return
    st.markdown("**Predicted vs measured** (plan from the measured.json when it has one)")
    st.dataframe(table, hide_index=True, width="stretch")


def main() -> None:
    st.set_page_config(page_title="Parallelism planner", layout="wide")
    st.title("Parallelism planner")
    model, cluster, job, constraints, errors = sidebar()
    for e in errors:
        st.error(plain(e))
    if errors:
        st.stop()
    st.caption(f"{plain(model.name)} on {cluster.world_size} x {cluster.profile.gpu.name} "
               f"({cluster.num_nodes} node(s)); batch {job.global_batch} x {job.seq_len} tokens,"
               f" {job.precision}; GPU memory {cluster.profile.gpu.memory_bytes / GIB:.0f} GiB")
    key = backend.inputs_key(model, cluster, job)
    forget_other_inputs(key)
    plans = results_section(key, constraints)
    st.subheader("Selected plan (what-if)")
    hint = json.loads(plans.iloc[0]["layout_json"]) if not plans.empty else closest_layout()
    layout = pick_plan(plans, hint)
    est = estimate_section(key, layout) if layout else None
    if est:
        breakdown_charts(key, plans, layout, est, constraints.headroom)
    if layout:
        scatter_and_rejected(layout)
    if est:
        timeline_section(key, layout)
        handoff_section(key, layout)


main()
