"""Calibrate a profile's efficiency terms from runtime measurements (measured.json files).

One physical unknown is fitted: how much of the profile's assumed kernel efficiency this machine
really reaches.  GEMM, attention and memory-bound efficiencies are scaled by the same factor k
(memory efficiency capped at 1), chosen to minimise the squared log error of predicted vs
measured step time over all runs; the framework overhead is raised to the largest measured
peak-memory residual when GPU peaks are present."""

import dataclasses
import math

import numpy as np

from planner.cost.estimate import estimate
from planner.hardware import Cluster, HardwareProfile
from planner.plan import Plan


def _scaled(profile: HardwareProfile, k: float) -> HardwareProfile:
    g = profile.gpu
    gpu = dataclasses.replace(g, gemm_efficiency_max=min(1.0, g.gemm_efficiency_max * k),
                              attention_efficiency=min(1.0, g.attention_efficiency * k),
                              memory_efficiency=min(1.0, g.memory_efficiency * k))
    return dataclasses.replace(profile, gpu=gpu)


def _predict(plan: Plan, profile: HardwareProfile) -> float:
    cluster = Cluster(profile=profile, num_nodes=plan.cluster.num_nodes,
                      num_gpus=plan.cluster.num_gpus)
    return estimate(dataclasses.replace(plan, cluster=cluster)).step_s


def step_time_errors(runs: list, profile: HardwareProfile) -> list:
    """Relative error (predicted / measured - 1) of each (plan, measured) run."""
    return [_predict(plan, profile) / m["step_time_s"] - 1 for plan, m in runs]


def calibrate(runs: list, profile: HardwareProfile) -> tuple:
    """(calibrated profile, factor k, errors before, errors after)."""
    if not runs:
        raise ValueError("calibrate needs at least one measured.json")
    for _, m in runs:
        if not isinstance(m.get("step_time_s"), (int, float)) or m["step_time_s"] <= 0:
            raise ValueError(f"measured step_time_s must be a positive number, "
                             f"got {m.get('step_time_s')!r}")
    best = None
    for k in np.geomspace(0.05, 4.0, 200):
        errs = step_time_errors(runs, _scaled(profile, float(k)))
        loss = sum(math.log1p(e) ** 2 for e in errs)
        if best is None or loss < best[0]:
            best = (loss, float(k))
    k = best[1]
    calibrated = _scaled(profile, k)
    calibrated = dataclasses.replace(calibrated, sources={
        **profile.sources, "gpu.gemm_efficiency_max": f"calibrated x{k:.3f} on {len(runs)} "
        f"measured runs (planner calibrate)"})
    return calibrated, k, step_time_errors(runs, profile), step_time_errors(runs, calibrated)
