"""Calibrate a profile from runtime measurements (measured.json files, read as
planner.measured.Measured: each carries the plan it ran).

Three physical terms are fitted, each as a factor on the profile's value: the kernel efficiency
this machine really reaches (GEMM, attention and memory-bound efficiencies scaled together,
capped at 1), the fixed costs that do not grow with the work (`kernel_overhead_s` per kernel and
the host time per layer `host_layer_overhead_s`, scaled together: framework dispatch dominates
small models), and the latency of every collective hop (intra- and inter-node).
They minimise the squared log error of predicted vs measured step time over all runs:
coordinate descent over log-spaced grids that contain the profile's own value (factor 1), then
Nelder-Mead in log space."""

import dataclasses
import math

import numpy as np

from planner.cost.estimate import estimate
from planner.hardware import Cluster, HardwareProfile
from planner.measured import Measured
from planner.plan import Plan

GRIDS = {"efficiency": np.geomspace(0.05, 4.0, 60), "overhead": np.geomspace(0.1, 1000.0, 60),
         "latency": np.geomspace(0.1, 1000.0, 60)}
MAX_ROUNDS = 12


def _scaled(profile: HardwareProfile, efficiency: float = 1.0, overhead: float = 1.0,
            latency: float = 1.0) -> HardwareProfile:
    g = profile.gpu
    gpu = dataclasses.replace(
        g, gemm_efficiency_max=min(1.0, g.gemm_efficiency_max * efficiency),
        attention_efficiency=min(1.0, g.attention_efficiency * efficiency),
        memory_efficiency=min(1.0, g.memory_efficiency * efficiency),
        kernel_overhead_s=g.kernel_overhead_s * overhead,
        host_layer_overhead_s={tp: [t * overhead for t in pair]
                               for tp, pair in g.host_layer_overhead_s.items()})
    intra = dataclasses.replace(profile.intra_node,
                                latency_s=profile.intra_node.latency_s * latency)
    inter = dataclasses.replace(profile.inter_node,
                                latency_s=profile.inter_node.latency_s * latency)
    return dataclasses.replace(profile, gpu=gpu, intra_node=intra, inter_node=inter)


def _predict(plan: Plan, profile: HardwareProfile) -> float:
    cluster = Cluster(profile=profile, num_nodes=plan.cluster.num_nodes,
                      num_gpus=plan.cluster.num_gpus)
    return estimate(dataclasses.replace(plan, cluster=cluster)).step_s


def step_time_errors(runs: list, profile: HardwareProfile) -> list:
    """Relative error (predicted / measured - 1) of each run (a planner.measured.Measured)."""
    return [_predict(m.plan, profile) / m.step_time_s - 1 for m in runs]


def _loss(runs: list, profile: HardwareProfile, factors: dict) -> float:
    return sum(math.log1p(e) ** 2 for e in step_time_errors(runs, _scaled(profile, **factors)))


def _coordinate_descent(runs: list, profile: HardwareProfile) -> dict:
    factors = {name: 1.0 for name in GRIDS}
    for _ in range(MAX_ROUNDS):
        before = dict(factors)
        for name, grid in GRIDS.items():
            candidates = np.unique(np.append(grid, factors[name]))
            factors[name] = float(min(candidates, key=lambda v: _loss(
                runs, profile, {**factors, name: float(v)})))
        if factors == before:
            break
    return factors


def _nelder_mead(f, x0: np.ndarray, steps: int = 300) -> np.ndarray:
    """Minimise f from x0 (Nelder & Mead 1965; standard coefficients)."""
    simplex = [x0] + [x0 + 0.3 * np.eye(len(x0))[i] for i in range(len(x0))]
    values = [f(x) for x in simplex]
    for _ in range(steps):
        order = np.argsort(values)
        simplex, values = [simplex[i] for i in order], [values[i] for i in order]
        centroid = np.mean(simplex[:-1], axis=0)
        reflected = centroid + (centroid - simplex[-1])
        fr = f(reflected)
        if fr < values[0]:
            expanded = centroid + 2 * (centroid - simplex[-1])
            fe = f(expanded)
            simplex[-1], values[-1] = (expanded, fe) if fe < fr else (reflected, fr)
        elif fr < values[-2]:
            simplex[-1], values[-1] = reflected, fr
        else:
            contracted = centroid + 0.5 * (simplex[-1] - centroid)
            fc = f(contracted)
            if fc < values[-1]:
                simplex[-1], values[-1] = contracted, fc
            else:
                simplex = [simplex[0] + 0.5 * (x - simplex[0]) for x in simplex]
                values = [f(x) for x in simplex]
    return simplex[int(np.argmin(values))]


def fit_factors(runs: list, profile: HardwareProfile) -> dict:
    """Coordinate descent on the grids, then Nelder-Mead in log space from there (the kernel
    overhead and collective latency trade off, which leaves coordinate steps short)."""
    names = list(GRIDS)
    start = _coordinate_descent(runs, profile)

    def loss(logs):
        return _loss(runs, profile, dict(zip(names, np.exp(logs).tolist())))
    best = _nelder_mead(loss, np.log([start[n] for n in names]))
    return dict(zip(names, np.exp(best).tolist()))


def _check_runs(runs: list) -> None:
    """Measured runs only: their step times were checked (finite, > 0) when they were read."""
    if not runs:
        raise ValueError("calibrate needs at least one measured.json")
    for m in runs:
        if not isinstance(m, Measured):
            raise ValueError(f"calibrate takes Measured runs (planner.measured), got "
                             f"{type(m).__name__}")


def calibrate(runs: list, profile: HardwareProfile) -> tuple:
    """(calibrated profile, fitted factors, errors before, errors after) of Measured runs."""
    _check_runs(runs)
    factors = fit_factors(runs, profile)
    note = (f"calibrated on {len(runs)} measured runs (planner calibrate): efficiency x"
            f"{factors['efficiency']:.3g}, kernel and host overheads x{factors['overhead']:.3g}, "
            f"collective latency x{factors['latency']:.3g}")
    calibrated = dataclasses.replace(_scaled(profile, **factors),
                                     sources={**profile.sources, "calibration": note})
    return calibrated, factors, step_time_errors(runs, profile), \
        step_time_errors(runs, calibrated)
