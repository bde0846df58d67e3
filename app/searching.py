"""The search behind `planner suggest`, run for the page and turned into plain tables.

planner/search.py is written in another work stream; `search_results` adapts to its result and
returns None with a reason when the module is not there."""

import json
import time

import pandas as pd
import streamlit as st

from app.backend import inputs_from_key, optional_module
from planner.report import layout_summary
from planner.units import GIB

TOP_N = 25  # rows in the ranked table


@st.cache_data(max_entries=32, show_spinner="Searching layouts...")
def search_results(key: str, max_tp: int, headroom: float, objective: str):
    """(result dict, '') or (None, reason).  The result has 'plans' (ranked, best first),
    'feasible' (every plan that fits: label, memory_GiB, tokens_per_s, pareto), 'rejected'
    (reason, count), 'searched' (layouts considered) and 'elapsed_s'."""
    search = optional_module("search")
    if search is None:
        return None, "the search (planner/search.py) is not available in this checkout yet"
    model, cluster, job = inputs_from_key(key)
    t0 = time.perf_counter()
    result = search.search(model, cluster, job, max_tp=max_tp, headroom=headroom,
                           objective=objective)
    elapsed = time.perf_counter() - t0
    return _tables(result, elapsed), ""


def _tables(result, elapsed: float) -> dict:
    ranked = [_plan_row(i + 1, c) for i, c in enumerate(result.ranked[:TOP_N])]
    feasible = pd.DataFrame(_feasible_rows(result))
    if not feasible.empty:
        feasible["pareto"] = pareto_mask(feasible["memory_GiB"], feasible["tokens_per_s"])
    rejected = pd.DataFrame(
        [{"reason": r, "plans": n} for r, n in _rejections(result)],
        columns=["reason", "plans"])
    return {"plans": pd.DataFrame(ranked), "feasible": feasible, "rejected": rejected,
            "searched": int(getattr(result, "num_considered", 0) or 0), "elapsed_s": elapsed}


def _plan_row(rank: int, cand) -> dict:
    lay = cand.layout
    return {"rank": rank, "layout": layout_summary(lay), "dp": lay.dp, "tp": lay.tp,
            "pp": lay.pp, "sp": lay.sequence_parallel, "zero": lay.zero_stage,
            "micro_batch": lay.micro_batch, "microbatches": lay.num_microbatches,
            "schedule": lay.schedule if lay.pp > 1 else "-", "recompute": lay.recompute,
            "memory_GiB": cand.total_bytes / GIB, "step_ms": cand.step_s * 1e3,
            "tokens_per_s": cand.tokens_per_s, "MFU_%": 100 * cand.mfu,
            "layout_json": json.dumps(lay.to_dict(), sort_keys=True)}


def _feasible_rows(result):
    for cand in getattr(result, "feasible", result.ranked):
        yield {"plan": layout_summary(cand.layout), "memory_GiB": cand.total_bytes / GIB,
               "tokens_per_s": cand.tokens_per_s}


def _rejections(result):
    rej = getattr(result, "rejected", {})
    items = rej.items() if isinstance(rej, dict) else rej
    return sorted(((str(r), int(n)) for r, n in items), key=lambda x: -x[1])


def pareto_mask(memory, throughput) -> list:
    """True where no other plan uses no more memory and is strictly faster (ties kept)."""
    order = sorted(range(len(memory)), key=lambda i: (memory.iloc[i], -throughput.iloc[i]))
    mask, best = [False] * len(order), float("-inf")
    for i in order:
        if throughput.iloc[i] > best:
            mask[i], best = True, throughput.iloc[i]
    return mask
