"""The page's calls into `planner`, cached.  Arguments are JSON strings of the inputs so that
st.cache_data hashes them cheaply and exactly; results are plain data (dicts, DataFrames)."""

import dataclasses
import json

import pandas as pd
import streamlit as st

from planner import export
from planner.calibration.compare import compare
from planner.cost.estimate import estimate
from planner.hardware import Cluster
from planner.job import Job
from planner.measured import Measured
from planner.plan import Layout, Plan, layout_errors
from planner.report import layout_summary
from planner.sim.timeline import simulate
from planner.spec import ModelSpec


def inputs_key(model: ModelSpec, cluster: Cluster, job: Job) -> str:
    return json.dumps({"model": model.to_dict(), "cluster": cluster.to_dict(),
                       "job": job.to_dict()}, sort_keys=True)


def inputs_from_key(key: str) -> tuple:
    d = json.loads(key)
    return (ModelSpec.from_dict(d["model"]), Cluster.from_dict(d["cluster"]),
            Job.from_dict(d["job"]))


def build_plan(key: str, layout: dict) -> Plan:
    model, cluster, job = inputs_from_key(key)
    return Plan(model=model, cluster=cluster, job=job, layout=Layout.from_dict(layout))


def check_layout(key: str, layout: dict) -> str:
    """'' if the layout is valid for these inputs, else its first one-line error."""
    model, cluster, job = inputs_from_key(key)
    try:
        lay = Layout.from_dict(layout)
    except (ValueError, TypeError) as exc:
        return str(exc)
    errors = layout_errors(model, cluster, job, lay)
    return errors[0] if errors else ""


@st.cache_data(max_entries=512, show_spinner=False)
def estimate_dict(key: str, layout_json: str) -> dict:
    """estimate(plan).to_dict() for one layout (which must be valid)."""
    return estimate(build_plan(key, json.loads(layout_json))).to_dict()


@st.cache_data(max_entries=64, show_spinner=False)
def timeline_events(key: str, layout_json: str):
    """(events DataFrame, summary dict) of the simulated iteration of one plan, or (None,
    reason) when the simulator refuses the plan."""
    plan = build_plan(key, json.loads(layout_json))
    try:
        tl = simulate(plan)
    except (ValueError, NotImplementedError) as exc:
        return None, f"the simulator cannot run this plan: {exc}"
    d = tl.to_dict(events=True)
    events = pd.DataFrame(d.pop("events"))
    return events, d


@st.cache_data(max_entries=64, show_spinner=False)
def exports(key: str, layout_json: str) -> dict:
    """{file name: text} of every export of one plan (planner.export.export_all)."""
    plan = build_plan(key, json.loads(layout_json))
    return dict(export.export_all(plan.with_estimate(estimate(plan).to_dict())))


def plan_json(key: str, layout: dict) -> str:
    """plan.json text (with its estimate), as `planner estimate --out` writes it."""
    plan = build_plan(key, layout)
    plan = plan.with_estimate(estimate_dict(key, json.dumps(layout, sort_keys=True)))
    return json.dumps(plan.to_dict(), indent=1) + "\n"


def label(layout: dict) -> str:
    """The layout's one-line summary; '' for a hand-set layout that is not a valid Layout (the
    page shows its error instead)."""
    try:
        return layout_summary(Layout.from_dict(layout))
    except (ValueError, TypeError):
        return ""


def _measured(measured) -> Measured:
    """A Measured from measured_from_upload's dict (a Measured passes as it is)."""
    return measured if isinstance(measured, Measured) else Measured.from_dict(measured)


def compare_table(plan: Plan, measured) -> pd.DataFrame:
    """Predicted vs measured (planner.calibration.compare); a ValueError when the measured
    run is not of `plan` (the first difference is named)."""
    return compare(plan, _measured(measured))


def plan_from_measured(measured) -> Plan:
    """The plan the run used (its recorded estimate dropped: the page estimates afresh)."""
    return dataclasses.replace(_measured(measured).plan, estimate=None)
