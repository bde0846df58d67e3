"""Calibrate a profile from runtime measurements (measured.json files, read as
planner.measured.Measured: each carries the plan it ran).

Three physical terms may be fitted, each as a factor on the profile's value: the kernel
efficiency this machine really reaches (GEMM, attention and memory-bound efficiencies scaled
together, capped at 1), the fixed costs that do not grow with the work (`kernel_overhead_s` per
kernel and the host time per layer `host_layer_overhead_s`, scaled together: framework dispatch
dominates small models), and the latency of every collective hop (intra- and inter-node).

Only what the runs identify is fitted (`identify`): a factor no run's prediction is sensitive to
(|d log t / d log factor| below MIN_SENSITIVITY, e.g. latency for runs without collectives), or
whose effect the runs cannot tell from a factor already fitted, stays at 1 ("left alone").  The
fitted factors minimise the squared log error of predicted vs measured step time over all runs
inside CALIBRATION_FACTOR_BOUNDS (planner/limits.py): coordinate descent over log-spaced grids
that contain the profile's own value (factor 1), then Nelder-Mead in log space.  Errors are
planner.measured.relative_error, (predicted - measured) / measured, as in `planner compare`."""

import dataclasses
import math
from collections.abc import Sequence

import numpy as np

from planner import limits
from planner.cost.estimate import estimate
from planner.hardware import Cluster, HardwareProfile
from planner.measured import Measured, relative_error
from planner.plan import Plan

FACTORS = ("efficiency", "overhead", "latency")
BOUNDS = limits.CALIBRATION_FACTOR_BOUNDS
GRIDS = {name: np.geomspace(*BOUNDS[name], 60) for name in FACTORS}
MAX_ROUNDS = 12
AT_BOUND = 0.01  # a factor within 1% of a bound is "at its bound"


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
    """(predicted - measured) / measured step time of each run (a planner.measured.Measured)."""
    return [relative_error(_predict(m.plan, profile), m.step_time_s) for m in runs]


def _loss(runs: list, profile: HardwareProfile, factors: dict) -> float:
    return sum(math.log1p(e) ** 2 for e in step_time_errors(runs, _scaled(profile, **factors)))


# --- what the runs identify ---------------------------------------------------------------------

def sensitivities(runs: list, profile: HardwareProfile) -> np.ndarray:
    """runs x FACTORS: d log(predicted step time) / d log(factor) at factor 1, as the central
    difference between factors 2 and 1/2 (capped efficiencies make the two sides differ)."""
    out = np.zeros((len(runs), len(FACTORS)))
    for j, name in enumerate(FACTORS):
        up, down = _scaled(profile, **{name: 2.0}), _scaled(profile, **{name: 0.5})
        for i, m in enumerate(runs):
            out[i, j] = math.log(_predict(m.plan, up) / _predict(m.plan, down)) / math.log(4)
    return out


def identify(runs: list, profile: HardwareProfile) -> tuple:
    """(factors to fit, {factor left alone: why}).  Factors are taken by falling sensitivity; one
    is fitted when some run is sensitive to it (MIN_SENSITIVITY, planner/limits.py) beyond what
    the factors already taken explain (its sensitivities projected off theirs): with one run
    only one factor can be fitted, and latency not at all from runs without collectives."""
    jac = sensitivities(runs, profile)
    order = sorted(range(len(FACTORS)), key=lambda j: -np.abs(jac[:, j]).max())
    fitted: list[str] = []
    left: dict[str, str] = {}
    for j in order:
        name, col = FACTORS[j], jac[:, j]
        if np.abs(col).max() < limits.MIN_SENSITIVITY:
            left[name] = (f"no run is sensitive to it (largest |d log t / d log factor| "
                          f"{np.abs(col).max():.3f} < {limits.MIN_SENSITIVITY})")
            continue
        if fitted:
            basis = jac[:, [FACTORS.index(f) for f in fitted]]
            col = col - basis @ np.linalg.lstsq(basis, col, rcond=None)[0]
            if np.abs(col).max() < limits.MIN_SENSITIVITY:
                left[name] = f"the runs cannot tell it from {' and '.join(fitted)}"
                continue
        fitted.append(name)
    return [f for f in FACTORS if f in fitted], left


# --- the fit ------------------------------------------------------------------------------------

def _clip(name: str, value: float) -> float:
    lo, hi = BOUNDS[name]
    return float(min(hi, max(lo, value)))


def _coordinate_descent(runs: list, profile: HardwareProfile, names: list) -> dict:
    factors = {name: 1.0 for name in FACTORS}
    for _ in range(MAX_ROUNDS):
        before = dict(factors)
        for name in names:
            candidates = np.unique(np.append(GRIDS[name], factors[name]))
            factors[name] = float(min(candidates, key=lambda v: _loss(
                runs, profile, {**factors, name: float(v)})))
        if factors == before:
            break
    return factors


def _nelder_mead(f, x0: np.ndarray, steps: int = 300, tol: float = 1e-6) -> np.ndarray:
    """Minimise f from x0 (Nelder & Mead 1965; standard coefficients); stops early once the
    simplex is smaller than `tol` (in log factor: 1e-4 %)."""
    simplex = [x0] + [x0 + 0.3 * np.eye(len(x0))[i] for i in range(len(x0))]
    values = [f(x) for x in simplex]
    for _ in range(steps):
        order = np.argsort(values)
        simplex, values = [simplex[i] for i in order], [values[i] for i in order]
        if max(np.abs(x - simplex[0]).max() for x in simplex[1:]) < tol:
            break
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


def fit_factors(runs: list, profile: HardwareProfile, names: Sequence = FACTORS) -> dict:
    """Every factor: those in `names` fitted inside their bounds (coordinate descent on the
    grids, then Nelder-Mead in log space from there: the kernel overhead and collective latency
    trade off, which leaves coordinate steps short), the others 1."""
    start = _coordinate_descent(runs, profile, list(names))
    if not names:
        return start

    def bounded(logs) -> dict:
        return {**start, **{n: _clip(n, v) for n, v in zip(names, np.exp(logs).tolist())}}
    best = _nelder_mead(lambda logs: _loss(runs, profile, bounded(logs)),
                        np.log([start[n] for n in names]))
    return bounded(best)


def at_bounds(factors: dict, names) -> list:
    """The factors among `names` that sit at a bound of CALIBRATION_FACTOR_BOUNDS."""
    return [n for n in names if any(abs(math.log(factors.get(n, 1.0) / b)) < AT_BOUND
                                    for b in BOUNDS[n])]


def fit_problems(factors: dict, fitted, errors_after: list) -> list:
    """Why a fit cannot be right, one phrase each: a fitted factor at its bound (the runs ask
    for more than is plausible), or a mean |error| above MAX_CALIBRATED_ERROR after fitting."""
    problems = [f"{n} factor x{factors.get(n, 1.0):.3g} is at its bound "
                f"[{BOUNDS[n][0]:g}, {BOUNDS[n][1]:g}]" for n in at_bounds(factors, fitted)]
    mean = sum(abs(e) for e in errors_after) / len(errors_after) if errors_after else 0.0
    if mean > limits.MAX_CALIBRATED_ERROR:
        problems.append(f"mean |error| after fitting is {100 * mean:.0f}% (above "
                        f"{100 * limits.MAX_CALIBRATED_ERROR:.0f}%)")
    return problems


def _check_runs(runs: list) -> None:
    """Measured runs only: their step times were checked (finite, > 0) when they were read."""
    if not runs:
        raise ValueError("calibrate needs at least one measured.json")
    for m in runs:
        if not isinstance(m, Measured):
            raise ValueError(f"calibrate takes Measured runs (planner.measured), got "
                             f"{type(m).__name__}")


def calibrate(runs: list, profile: HardwareProfile) -> tuple:
    """(calibrated profile, factors, errors before, errors after) of Measured runs.  `factors`
    holds every factor; one that `identify` leaves alone is exactly 1."""
    _check_runs(runs)
    fitted, left = identify(runs, profile)
    factors = fit_factors(runs, profile, fitted)
    parts = [f"{n} x{factors[n]:.3g}" for n in fitted] + [f"{n} left alone" for n in left]
    note = (f"calibrated on {len(runs)} measured runs (planner calibrate; efficiency = GEMM, "
            f"attention and memory; overhead = kernel and host overheads; latency = collective "
            f"latency): {', '.join(parts)}")
    calibrated = dataclasses.replace(_scaled(profile, **factors),
                                     sources={**profile.sources, "calibration": note})
    return calibrated, factors, step_time_errors(runs, profile), \
        step_time_errors(runs, calibrated)
