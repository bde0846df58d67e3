"""Turn `planner profile` measurements into a hardware profile (pure: no torch here).

Measurements come from runtime/hwprofile.py, read as planner.measured.ProfileMeasurements: GEMM
throughput over transformer-shaped matrices, copy bandwidth, all-reduce times over local ranks at
several sizes, and the host time of one small layer (negligible FLOPs) plain and at each TP
degree; each the median of repeats, with their spread and the machine's load.

Nothing implausible is written: every fitted term must lie in its range of planner/limits.py,
and the fits must reproduce the measurements (rms of the relative residuals), else a ValueError
names the term, its value and the bound.  A busy machine (before or while measuring) is refused
unless `allow_busy`, which marks the profile as measured under load."""

import dataclasses
import datetime
import math

import numpy as np

from planner import limits
from planner.calibration.gemm_fit import fit_gemm_efficiency
from planner.cost.comm import collective_latency
from planner.cost.comm_plan import tp_pattern_for
from planner.hardware import HardwareProfile
from planner.measured import ProfileMeasurements

# gemm_half_dim candidates, as in gemm_fit.py: reaching past the plausible bound, so that data
# pointing there are refused by name instead of silently pinned to the bound.
HALF_DIM_GRID = np.geomspace(1.0, 4096.0, 400)


@dataclasses.dataclass(frozen=True, kw_only=True)
class FitReport:
    """How well the profile's terms fit the measurements; residuals are (fitted - measured) /
    measured.  `warnings`: one line each; `busy`: why the machine was busy, or None."""
    gemm_residuals: tuple
    allreduce_residuals: tuple
    spread: dict
    repeats: int
    warnings: tuple
    busy: str | None

    @staticmethod
    def rms(residuals) -> float:
        return math.sqrt(sum(r * r for r in residuals) / len(residuals)) if residuals else 0.0

    def lines(self) -> list:
        """The fit quality as the CLI prints it."""
        worst = max(map(abs, self.gemm_residuals))
        out = [(f"GEMM efficiency fit: rms residual {100 * self.rms(self.gemm_residuals):.1f}%, "
                f"worst {100 * worst:.1f}% over {len(self.gemm_residuals)} shapes")]
        if self.allreduce_residuals:
            out.append(f"all-reduce alpha-beta fit: rms residual "
                       f"{100 * self.rms(self.allreduce_residuals):.1f}% over "
                       f"{len(self.allreduce_residuals)} sizes")
        if self.spread:
            out.append(f"spread of {self.repeats} repeats (max - min over median): " + ", ".join(
                f"{k} {100 * v:.0f}%" for k, v in self.spread.items()))
        return out


def _shape_factor(shapes: np.ndarray, half_dim: float) -> np.ndarray:
    return np.prod(shapes / (shapes + half_dim), axis=1)


def gemm_residuals(gemms: list, peak: float, e_max: float, half_dim: float) -> np.ndarray:
    """(fitted - measured) / measured rate of each (m, n, k, FLOP/s) row."""
    data = np.asarray(gemms, dtype=float)
    return peak * e_max * _shape_factor(data[:, :3], half_dim) / data[:, 3] - 1


def fit_gemms(gemms: list, peak: float) -> tuple:
    """(gemm_efficiency_max, gemm_half_dim, residuals): the half dimension whose curve, with
    e_max capped at 1 (gemm_fit's closed form), has the least rms residual.  The cap is part
    of the fit: capping after fitting leaves a curve that misses every measurement."""
    best = None
    for half_dim in HALF_DIM_GRID:
        e_max = fit_gemm_efficiency(gemms, peak, half_dim=float(half_dim))[0]
        res = gemm_residuals(gemms, peak, e_max, half_dim)
        if best is None or np.mean(res ** 2) < np.mean(best[2] ** 2):
            best = (e_max, float(half_dim), res)
    assert best is not None  # HALF_DIM_GRID is never empty
    return best


def fit_alpha_beta(sizes_bytes: list, times_s: list, ranks: int) -> tuple:
    """(bus bandwidth bytes/s, latency per hop s) of ring all-reduce times:
    t = 2(n-1)/n * bytes / bw + 2(n-1) * latency (least squares on the two terms)."""
    if len(sizes_bytes) < 2 or len(sizes_bytes) != len(times_s):
        raise ValueError("need at least two all-reduce sizes with one time each")
    factor = 2 * (ranks - 1) / ranks
    a = np.column_stack([np.full(len(sizes_bytes), 2.0 * (ranks - 1)),
                         factor * np.asarray(sizes_bytes, dtype=float)])
    (latency, inv_bw), *_ = np.linalg.lstsq(a, np.asarray(times_s, dtype=float), rcond=None)
    if inv_bw <= 0:
        raise ValueError("all-reduce times do not grow with size; cannot fit a bandwidth")
    return 1.0 / inv_bw, max(0.0, float(latency))


def alpha_beta_residuals(sizes_bytes: list, times_s: list, ranks: int, bw: float,
                         latency: float) -> list:
    factor = 2 * (ranks - 1) / ranks
    return [(factor * s / bw + 2 * (ranks - 1) * latency) / t - 1
            for s, t in zip(sizes_bytes, times_s)]


def host_table(layer_host_s: dict, host_is_device: bool, latency_s: float) -> dict:
    """The profile's host_layer_overhead_s from the probe layer's measured (forward, backward)
    seconds per TP degree.  Where host and device are one processor the measured time also holds
    each TP collective's latency, which the cost model charges separately: it is taken out here
    (the probe is a sequence-parallel llama layer on the torch engine)."""
    table = {}
    for tp, measured in layer_host_s.items():
        n = int(tp)
        if host_is_device and n > 1:
            waits = [sum(count * collective_latency(kind, n, latency_s) for kind, count in p)
                     for p in tp_pattern_for("swiglu", True, "torch")]
        else:
            waits = [0.0, 0.0]
        table[tp] = [max(0.0, t - w) for t, w in zip(measured, waits)]
    return table


def check_plausible(term: str, value: float, bounds: tuple) -> None:
    """ValueError naming the term, its value and the bound it breaks."""
    lo, hi = bounds
    if not lo <= value <= hi:
        side = f"below {lo:g}" if value < lo else f"above {hi:g}"
        raise ValueError(f"{term} = {value:.4g} is {side} (plausible: [{lo:g}, {hi:g}], "
                         f"planner/limits.py): the measurement cannot be right; nothing was "
                         f"written (an idle machine measures again)")


def check_fit(what: str, residuals, warnings: list) -> None:
    rms = FitReport.rms(list(residuals))
    if rms > limits.REFUSE_FIT_RMS:
        raise ValueError(f"{what} fit: rms residual {100 * rms:.0f}% is above "
                         f"{100 * limits.REFUSE_FIT_RMS:.0f}% (planner/limits.py): the "
                         f"measurements do not follow the model; nothing was written")
    if rms > limits.WARN_FIT_RMS:
        warnings.append(f"{what} fit: rms residual {100 * rms:.0f}% (above "
                        f"{100 * limits.WARN_FIT_RMS:.0f}%)")


def busy_reason(m: ProfileMeasurements) -> str | None:
    for when, load in (("before measuring", m.load_before), ("while measuring", m.load_during)):
        reason = load.busy_reason() if load is not None else None
        if reason:
            return f"{when}: {reason}"
    return None


def _measurement_warnings(m: ProfileMeasurements) -> list:
    out = [f"the {m.repeats} repeats of {name} spread by {100 * v:.0f}% (max - min over "
           f"median; above {100 * limits.MAX_REPEAT_SPREAD:.0f}%): the machine may be busy"
           for name, v in m.spread.items() if v > limits.MAX_REPEAT_SPREAD]
    if m.load_before is None:
        out.append("schema_version 1 measurements: no repeats and no load were recorded")
    return out


def _check_measured(m: ProfileMeasurements, peak: float) -> None:
    if m.peak_flops is None:  # the best GEMM of this machine is its peak
        check_plausible("gpu.peak_flops (best GEMM)", peak, limits.PLAUSIBLE_RANK_FLOPS)
    check_plausible("gpu.hbm_bandwidth_bytes_per_s (copy)", m.copy_bytes_per_s,
                    limits.PLAUSIBLE_COPY_BYTES_PER_S)
    for tp, pair in m.layer_host_s.items():
        for part, t in zip(("forward", "backward"), pair):
            check_plausible(f"host time of the probe layer at tp={tp} ({part}, s)", t,
                            limits.PLAUSIBLE_PROBE_LAYER_S)


def fit_profile(base: HardwareProfile, m: ProfileMeasurements, name: str,
                allow_busy: bool = False) -> tuple:
    """(profile, FitReport): a copy of `base` with the measured GPU and intra-node terms
    replaced and cited.  ValueError for an implausible term or fit, or a busy machine unless
    `allow_busy`."""
    busy = busy_reason(m)
    if busy and not allow_busy:
        raise ValueError(f"the machine was busy {busy}; profile an idle machine, or pass "
                         f"--allow-busy to mark the profile as measured under load")
    peak = m.peak_flops or max(g[3] for g in m.gemms)
    _check_measured(m, peak)
    warnings = _measurement_warnings(m)
    # the data's own answer first (gemm_fit: e_max free while the half dimension is chosen),
    # then the fit that is written, with e_max capped at 1
    free_half_dim = fit_gemm_efficiency(list(m.gemms), peak)[1]
    check_plausible("gpu.gemm_half_dim", free_half_dim, limits.PLAUSIBLE_GEMM_HALF_DIM)
    e_max, half_dim, gemm_res = fit_gemms(list(m.gemms), peak)
    check_plausible("gpu.gemm_half_dim", half_dim, limits.PLAUSIBLE_GEMM_HALF_DIM)
    check_plausible("gpu.gemm_efficiency_max", e_max, limits.PLAUSIBLE_GEMM_EFFICIENCY)
    check_fit("GEMM efficiency", gemm_res, warnings)
    intra, ab_res = base.intra_node, []
    if m.ranks > 1:  # one rank measures no collectives: the base fabric stays
        sizes, times = list(m.allreduce_bytes), list(m.allreduce_s)
        bw, latency = fit_alpha_beta(sizes, times, m.ranks)
        check_plausible("intra_node.bandwidth_bytes_per_s", bw,
                        limits.PLAUSIBLE_COLLECTIVE_BYTES_PER_S)
        check_plausible("intra_node.latency_s", latency, limits.PLAUSIBLE_HOP_LATENCY_S)
        ab_res = alpha_beta_residuals(sizes, times, m.ranks, bw, latency)
        check_fit("all-reduce alpha-beta", ab_res, warnings)
        intra = dataclasses.replace(intra, bandwidth_bytes_per_s=bw, latency_s=latency,
                                    efficiency=1.0)
    report = FitReport(gemm_residuals=tuple(float(r) for r in gemm_res),
                       allreduce_residuals=tuple(ab_res), spread=dict(m.spread),
                       repeats=m.repeats, warnings=tuple(warnings), busy=busy)
    return _build(base, m, name, peak, (e_max, half_dim), intra, report), report


# how runtime/memprofile.py measured each item outside tensors (the sources say it)
OUTSIDE_HOW = {
    "context_bytes": "GPU: device memory in use outside the caching allocator "
                     "(mem_get_info - memory_reserved) after the measuring loaded its kernels; "
                     "CPU: the process's resident set with torch imported, before any tensor",
    "blas_workspace_bytes": "allocator bytes a GEMM adds beyond its output after "
                            "clearing the cuBLAS workspaces",
    "comm_buffer_bytes_per_group": "device memory the default group's first all-reduce took "
                                   "(NCCL communicator creation and ring connection)",
    "comm_buffer_bytes_per_peer": "not measured",
    "allocator_fragmentation": "(max reserved - max allocated) / (max allocated - allocated "
                               "between steps) over AdamW steps of a 4-layer, 1024-wide "
                               "transformer"}


def _outside_items(measured: dict) -> dict:
    """Measured items as profile values: byte counts are integers."""
    return {k: (float(v) if k == "allocator_fragmentation" else round(v))
            for k, v in measured.items()}


def profile_from_measurements(base: HardwareProfile, m: ProfileMeasurements, name: str,
                              allow_busy: bool = False) -> HardwareProfile:
    """fit_profile's profile alone."""
    return fit_profile(base, m, name, allow_busy)[0]


def _build(base, m, name, peak, gemm, intra, report) -> HardwareProfile:
    precision, (e_max, half_dim) = m.precision, gemm
    when = datetime.date.today().isoformat()
    note = f"measured by `planner profile` on {m.host} ({m.ranks} ranks, {when})"
    if report.busy:
        note += f", UNDER LOAD ({report.busy})"
    on_host = m.host_is_device
    gpu = dataclasses.replace(
        base.gpu, name=m.device_name, peak_flops={**base.gpu.peak_flops, precision: peak},
        gemm_efficiency_max=e_max, gemm_half_dim=half_dim,
        hbm_bandwidth_bytes_per_s=m.copy_bytes_per_s, memory_efficiency=1.0,
        memory_bytes=m.memory_bytes, host_is_device=on_host, shared_cores=m.shared_cores,
        host_layer_overhead_s=host_table(m.layer_host_s, on_host, intra.latency_s),
        # on CPU ranks each kernel's dispatch is part of the measured host time per layer
        kernel_overhead_s=0.0 if on_host else base.gpu.kernel_overhead_s,
        **_outside_items(m.outside_tensors))
    gemm_rms = 100 * report.rms(report.gemm_residuals)
    sources = {**base.sources,
               "gpu.peak_flops": f"{note}: peak = {peak:.3g} FLOP/s ({precision})",
               "gpu.gemm_efficiency_max": f"{note}: fitted to {len(m.gemms)} GEMMs (e_max "
                                          f"capped at 1), rms residual {gemm_rms:.1f}%",
               "gpu.gemm_half_dim": f"{note}: fitted with gemm_efficiency_max",
               "gpu.hbm_bandwidth_bytes_per_s": f"{note}: copy bandwidth (read + write)",
               "gpu.memory_bytes": f"{note}",
               "gpu.host_layer_overhead_s": f"{note}: one small llama layer, forward and "
                                            f"backward, every rank at once"
                                            + (", TP collective latency taken out" if on_host
                                               else ""),
               "measurement": f"{note}: " + "; ".join(report.lines())}
    for key in m.outside_tensors:
        sources[f"gpu.{key}"] = f"{note}: {OUTSIDE_HOW[key]}"
    if m.ranks > 1:
        sources["intra_node"] = (f"{note}: all-reduce alpha-beta fit over "
                                 f"{len(m.allreduce_bytes)} sizes, rms residual "
                                 f"{100 * report.rms(report.allreduce_residuals):.1f}%")
    if gpu.shared_cores:
        sources["gpu.shared_cores"] = f"{note}: cores this process may run on"
    if gpu.kernel_overhead_s != base.gpu.kernel_overhead_s:
        sources["gpu.kernel_overhead_s"] = "0: on CPU ranks it is part of host_layer_overhead_s"
    gpn = m.ranks if m.ranks > 1 else base.gpus_per_node
    host = dataclasses.replace(base.host, **{k: (int(v) if k == "memory_bytes_per_node"
                                                 else float(v))
                                             for k, v in m.host_offload.items()})
    for key in m.host_offload:
        sources[f"host.{key}"] = f"{note}: {HOST_HOW[key]}"
    return dataclasses.replace(base, name=name, gpus_per_node=gpn, gpu=gpu,
                               intra_node=intra, sources=sources, host=host,
                               description=f"{base.description} — {note}")


HOST_HOW = {"memory_bytes_per_node": "physical memory (SC_PHYS_PAGES x SC_PAGE_SIZE)",
            "h2d_bandwidth_bytes_per_s": "pinned host-to-device copy of 256 MiB (on CPU ranks a "
                                         "memcpy: host and device are one memory)",
            "cpu_adam_params_per_s": "torch.optim.AdamW (foreach) on fp32 CPU parameters, "
                                     "every core of the host"}
