"""Fit a profile's GEMM efficiency terms to measured matmul throughput.

Model (planner/cost/compute.py): achieved = peak * e_max * q(m) q(n) q(k), q(d) = d / (d + d0).
For a fixed d0 the least-squares e_max has a closed form, so d0 is searched on a log grid."""

import numpy as np


def _shape_factor(shapes: np.ndarray, d0: float) -> np.ndarray:
    return np.prod(shapes / (shapes + d0), axis=1)


def fit_gemm_efficiency(measurements: list, peak_flops: float,
                        half_dim: float | None = None) -> tuple:
    """(gemm_efficiency_max, gemm_half_dim, rms relative error) from [(m, n, k, flops_per_s)].

    With `half_dim` given, only e_max is fitted (use it when the measured shapes are all large,
    so the data cannot pin down the small-dimension roll-off)."""
    if len(measurements) < 2:
        raise ValueError(f"need at least 2 GEMM measurements to fit, got {len(measurements)}")
    data = np.asarray(measurements, dtype=float)
    shapes, achieved = data[:, :3], data[:, 3] / peak_flops
    best: tuple | None = None
    grid = [half_dim] if half_dim is not None else np.geomspace(1.0, 4096.0, 400)
    for d0 in grid:
        q = _shape_factor(shapes, d0)
        e_max = float(np.dot(q, achieved) / np.dot(q, q))
        rel = (e_max * q - achieved) / achieved
        err = float(np.sqrt(np.mean(rel ** 2)))
        if best is None or err < best[2]:
            best = (min(e_max, 1.0), float(d0), err)
    assert best is not None  # the grid is never empty
    return best
