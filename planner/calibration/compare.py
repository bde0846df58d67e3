"""Predicted vs measured: a runtime measured.json against the estimate of its plan."""

import pandas as pd

from planner.cost.estimate import estimate
from planner.cost.memory import rank_memory, rank_model_state
from planner.plan import Plan

RANK_KEYS = ("rank", "coords", "weights_bytes", "gradients_bytes", "optimizer_bytes",
             "activation_bytes_per_microbatch")
STATE_KEYS = ("weights_bytes", "gradients_bytes", "optimizer_bytes")


def _check_measured(measured) -> None:
    if not isinstance(measured, dict):
        raise ValueError("measured.json: expected a JSON object")
    for key in ("plan", "ranks", "step_time_s", "tokens_per_s"):
        if key not in measured:
            raise ValueError(f"measured.json: missing key {key!r}")
    if not isinstance(measured["ranks"], list) or not measured["ranks"]:
        raise ValueError("measured.json: 'ranks' must be a non-empty list")
    for entry in measured["ranks"]:
        if not isinstance(entry, dict):
            raise ValueError("measured.json: each rank entry must be an object")
        for key in RANK_KEYS:
            if key not in entry:
                raise ValueError(f"measured.json: rank entry missing key {key!r}")
        coords = entry["coords"]
        if not isinstance(coords, dict) or not all(
                isinstance(coords.get(a), int) for a in ("pp", "dp", "tp")):
            raise ValueError(f"measured.json: rank {entry.get('rank')!r} coords must give "
                             f"integer pp, dp and tp")


def _row(component, rank, predicted, measured) -> dict:
    error = None
    if measured is not None and predicted:
        error = 100.0 * (measured - predicted) / predicted
    return {"component": component, "rank": rank, "predicted": predicted,
            "measured": measured, "error_pct": error}


def _rank_rows(plan: Plan, entry: dict) -> list:
    c = entry["coords"]
    if not (0 <= c["pp"] < plan.layout.pp and 0 <= c["dp"] < plan.layout.dp
            and 0 <= c["tp"] < plan.layout.tp):
        raise ValueError(f"measured.json: rank {entry['rank']} coords {c} are outside the "
                         f"plan's pp={plan.layout.pp} dp={plan.layout.dp} tp={plan.layout.tp}")
    states = rank_model_state(plan, c["pp"], c["dp"], c["tp"])
    rows = [_row(key.removesuffix("_bytes"), entry["rank"], getattr(states, key), entry[key])
            for key in STATE_KEYS]
    mem = rank_memory(plan, c["pp"])
    rows.append(_row("activations per micro-batch", entry["rank"],
                     mem.activation_bytes_per_microbatch,
                     entry["activation_bytes_per_microbatch"]))
    if entry.get("peak_allocated_bytes") is not None:
        rows.append(_row("peak memory", entry["rank"], mem.total_bytes - mem.framework_bytes,
                         entry["peak_allocated_bytes"]))
    return rows


def compare(plan: Plan, measured: dict) -> pd.DataFrame:
    """One row per compared figure: memory components per rank, then step time and tokens/s."""
    _check_measured(measured)
    rows = []
    for entry in measured["ranks"]:
        rows += _rank_rows(plan, entry)
    est = estimate(plan)
    rows.append(_row("step time (s)", "all", est.step_s, measured["step_time_s"]))
    rows.append(_row("tokens/s", "all", est.tokens_per_s, measured["tokens_per_s"]))
    return pd.DataFrame(rows)
