"""The search behind `planner suggest`, run for the page and turned into plain tables."""

import json
import time

import pandas as pd
import streamlit as st

from app.backend import inputs_from_key
from planner.report import layout_summary
from planner.search import nofit
from planner.search.explain import rejected_table
from planner.search.ranking import OBJECTIVES, SearchOptions, search
from planner.units import GIB, fmt_seconds

TOP_N = 25  # rows in the ranked table


@st.cache_data(max_entries=32, show_spinner="Searching layouts...")
def search_results(key: str, max_tp: int, headroom: float, objective: str,
                   token_budget: float = 0.0):
    """(result dict, '') or (None, reason).  The result has 'plans' (ranked, best first),
    'feasible' (every plan that fits: plan, memory_GiB, tokens_per_s, pareto), 'rejected'
    (reason, plans, example), 'searched' (layouts considered), 'closest' (when nothing fits),
    'advice' (when nothing fits: the lines `planner suggest` prints, each from a real re-run
    with one thing relaxed; when no layout is valid at all: its one line) and 'elapsed_s'."""
    model, cluster, job = inputs_from_key(key)
    t0 = time.perf_counter()
    opts = SearchOptions(objective=objective, top=TOP_N, max_tp=max_tp,
                                headroom=headroom, token_budget=token_budget)
    result = search(model, cluster, job, opts)
    out = _tables(result)
    out["advice"] = _advice(result)
    out["elapsed_s"] = time.perf_counter() - t0
    return out, ""


def _advice(result) -> list:
    if result.ranked:
        return []
    if result.closest is None:
        return [nofit.no_valid_layout(result)]
    return nofit.advice(result, search)


def objectives() -> tuple:
    return OBJECTIVES


def _tables(result) -> dict:
    ranked = [_plan_row(i + 1, c) for i, c in enumerate(result.ranked[:TOP_N])]
    feasible = pd.DataFrame([{"plan": layout_summary(r.layout), "memory_GiB": r.total_bytes / GIB,
                              "tokens_per_s": r.tokens_per_s} for r in result.feasible],
                            columns=["plan", "memory_GiB", "tokens_per_s"])
    if not feasible.empty:
        feasible["pareto"] = pareto_mask(feasible["memory_GiB"], feasible["tokens_per_s"])
    rejected = rejected_table(result)
    closest = _plan_row(0, result.closest) if result.closest is not None else None
    return {"plans": pd.DataFrame(ranked), "feasible": feasible, "rejected": rejected,
            "searched": int(result.num_considered), "num_fit": int(result.num_fit),
            "closest": closest}


def _plan_row(rank: int, cand) -> dict:
    lay = cand.layout
    return {"rank": rank, "layout": layout_summary(lay), "GPUs": cand.num_gpus,
            "memory_GiB": cand.total_bytes / GIB, "step": fmt_seconds(cand.step_s),
            "tokens_per_s": cand.tokens_per_s, "MFU_%": 100 * cand.mfu,
            "layout_json": json.dumps(lay.to_dict(), sort_keys=True)}


def pareto_mask(memory, throughput) -> list:
    """True where no other plan uses no more memory and is strictly faster (ties kept)."""
    order = sorted(range(len(memory)), key=lambda i: (memory.iloc[i], -throughput.iloc[i]))
    mask, best = [False] * len(order), float("-inf")
    for i in order:
        if throughput.iloc[i] > best:
            mask[i], best = True, throughput.iloc[i]
    return mask
