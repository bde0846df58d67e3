"""Turn `planner profile` measurements into a hardware profile (pure: no torch here).

Measurements come from runtime/hwprofile.py, read as planner.measured.ProfileMeasurements: GEMM
throughput over transformer-shaped matrices, copy bandwidth, all-reduce times over local ranks at
several sizes, and the host time of one small layer (negligible FLOPs) plain and at each TP
degree."""

import dataclasses
import datetime

import numpy as np

from planner.calibration.gemm_fit import fit_gemm_efficiency
from planner.cost.comm import collective_latency
from planner.cost.comm_plan import tp_pattern_for
from planner.hardware import HardwareProfile
from planner.measured import ProfileMeasurements


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


def profile_from_measurements(base: HardwareProfile, m: ProfileMeasurements,
                              name: str) -> HardwareProfile:
    """A copy of `base` with the measured GPU and intra-node terms replaced and cited."""
    precision = m.precision
    peak = m.peak_flops or max(g[3] for g in m.gemms)
    e_max, half_dim, rms = fit_gemm_efficiency(list(m.gemms), peak)
    when = datetime.date.today().isoformat()
    note = f"measured by `planner profile` on {m.host} ({m.ranks} ranks, {when})"
    intra, intra_source = base.intra_node, base.sources.get("intra_node", "")
    if m.ranks > 1:  # one rank measures no collectives: the base fabric stays
        bw, latency = fit_alpha_beta(list(m.allreduce_bytes), list(m.allreduce_s), m.ranks)
        intra = dataclasses.replace(intra, bandwidth_bytes_per_s=bw, latency_s=latency,
                                    efficiency=1.0)
        intra_source = f"{note}: all-reduce alpha-beta fit over {len(m.allreduce_bytes)} sizes"
    on_host = m.host_is_device
    gpu = dataclasses.replace(
        base.gpu, name=m.device_name, peak_flops={**base.gpu.peak_flops, precision: peak},
        gemm_efficiency_max=e_max, gemm_half_dim=half_dim,
        hbm_bandwidth_bytes_per_s=m.copy_bytes_per_s, memory_efficiency=1.0,
        memory_bytes=m.memory_bytes, host_is_device=on_host, shared_cores=m.shared_cores,
        host_layer_overhead_s=host_table(m.layer_host_s, on_host, intra.latency_s),
        # on CPU ranks each kernel's dispatch is part of the measured host time per layer
        kernel_overhead_s=0.0 if on_host else base.gpu.kernel_overhead_s)
    sources = {**base.sources,
               "gpu.peak_flops": f"{note}: peak = {peak:.3g} FLOP/s ({precision})",
               "gpu.gemm_efficiency_max": f"{note}: fitted to {len(m.gemms)} GEMMs, "
                                          f"rms error {100 * rms:.1f}%",
               "gpu.gemm_half_dim": f"{note}: fitted with gemm_efficiency_max",
               "gpu.hbm_bandwidth_bytes_per_s": f"{note}: copy bandwidth (read + write)",
               "gpu.memory_bytes": f"{note}",
               "gpu.host_layer_overhead_s": f"{note}: one small llama layer, forward and "
                                            f"backward, every rank at once"
                                            + (", TP collective latency taken out" if on_host
                                               else ""),
               "intra_node": intra_source}
    if gpu.shared_cores:
        sources["gpu.shared_cores"] = f"{note}: cores this process may run on"
    if gpu.kernel_overhead_s != base.gpu.kernel_overhead_s:
        sources["gpu.kernel_overhead_s"] = "0: on CPU ranks it is part of host_layer_overhead_s"
    gpn = m.ranks if m.ranks > 1 else base.gpus_per_node
    return dataclasses.replace(base, name=name, gpus_per_node=gpn, gpu=gpu,
                               intra_node=intra, sources=sources,
                               description=f"{base.description} — {note}")
