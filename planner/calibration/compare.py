"""Predicted vs measured: a runtime measured.json against the estimate of its plan."""

import pandas as pd

from planner.cost.estimate import estimate
from planner.cost.memory import rank_memory, rank_model_state
from planner.measured import Measured, RankMeasurement, relative_error
from planner.plan import Plan

STATE_KEYS = ("weights_bytes", "gradients_bytes", "optimizer_bytes")


def _row(component, rank, predicted, measured) -> dict:
    """error_pct: 100 * (predicted - measured) / measured, as in planner calibrate."""
    error = None
    if measured:
        error = 100.0 * relative_error(predicted, measured)
    return {"component": component, "rank": rank, "predicted": predicted,
            "measured": measured, "error_pct": error}


def _rank_rows(plan: Plan, entry: RankMeasurement) -> list:
    c = entry.coords
    states = rank_model_state(plan, c.pp, c.dp, c.tp)
    rows = [_row(key.removesuffix("_bytes"), entry.rank, getattr(states, key),
                 getattr(entry, key)) for key in STATE_KEYS]
    mem = rank_memory(plan, c.pp)
    rows.append(_row("activations per micro-batch", entry.rank,
                     mem.activation_bytes_per_microbatch, entry.activation_bytes_per_microbatch))
    if entry.peak_allocated_bytes is not None:  # null on CPU ranks
        rows.append(_row("peak memory", entry.rank, mem.total_bytes - mem.framework_bytes,
                         entry.peak_allocated_bytes))
    return rows


def compare(plan: Plan, measured) -> pd.DataFrame:
    """One row per compared figure: memory components per rank, then step time and tokens/s.

    `measured` is a Measured (a dict is read with Measured.from_dict); it must have been
    measured under `plan` (same model, cluster, job and layout), else a ValueError names the
    first difference."""
    if not isinstance(measured, Measured):
        measured = Measured.from_dict(measured)
    measured.check_plan(plan)
    rows = []
    for entry in measured.ranks:
        rows += _rank_rows(plan, entry)
    est = estimate(plan)
    rows.append(_row("step time (s)", "all", est.step_s, measured.step_time_s))
    rows.append(_row("tokens/s", "all", est.tokens_per_s, measured.tokens_per_s))
    return pd.DataFrame(rows)
