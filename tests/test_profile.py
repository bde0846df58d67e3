import json
import subprocess
import sys

import numpy as np
import pytest

from planner.calibration.gemm_fit import fit_gemm_efficiency
from planner.calibration.profile_fit import fit_alpha_beta, profile_from_measurements
from planner.hardware import load_profile
from planner.measured import ProfileMeasurements


def _synthetic_gemms(e_max, d0, peak):
    shapes = [(m, n, k) for m in (256, 1024, 4096) for n in (128, 512, 2048) for k in (64, 1024)]
    return [(m, n, k, peak * e_max * np.prod([d / (d + d0) for d in (m, n, k)]))
            for m, n, k in shapes]


def test_gemm_fit_recovers_a_known_curve():
    e_max, d0, rms = fit_gemm_efficiency(_synthetic_gemms(0.7, 96.0, 1e14), 1e14)
    assert e_max == pytest.approx(0.7, rel=0.01)
    assert d0 == pytest.approx(96.0, rel=0.03)
    assert rms < 0.01


def test_alpha_beta_fit_recovers_bandwidth_and_latency():
    sizes = [2**20, 2**22, 2**24, 2**26]
    n, bw, lat = 8, 50e9, 20e-6
    times = [2 * (n - 1) / n * s / bw + 2 * (n - 1) * lat for s in sizes]
    got_bw, got_lat = fit_alpha_beta(sizes, times, n)
    assert got_bw == pytest.approx(bw, rel=1e-6)
    assert got_lat == pytest.approx(lat, rel=1e-6)


def _measurements(**changes) -> dict:
    """Measurements as runtime/hwprofile.py writes them, of a 4-GPU machine."""
    m = {"schema_version": 1, "device_name": "test-gpu", "host": "h", "ranks": 4,
         "precision": "bf16", "peak_flops": 1e14,
         "gemms": [list(g) for g in _synthetic_gemms(0.75, 128.0, 1e14)],
         "copy_bytes_per_s": 1e12, "memory_bytes": 16 * 2**30,
         "allreduce_bytes": [2**20, 2**24], "allreduce_s": [1e-4, 1e-3],
         "layer_host_s": {"1": [1e-4, 2e-4], "2": [2e-4, 4e-4]}, "host_is_device": False,
         "shared_cores": 0}
    return {**m, **changes}


def test_profile_from_synthetic_measurements_round_trips(tmp_path):
    m = ProfileMeasurements.from_dict(_measurements())
    assert ProfileMeasurements.from_dict(json.loads(json.dumps(m.to_dict()))) == m
    profile = profile_from_measurements(load_profile("a100-80g"), m, "ours")
    assert profile.gpus_per_node == 4 and profile.gpu.gemm_efficiency_max == pytest.approx(0.75,
                                                                                           rel=0.01)
    path = tmp_path / "ours.json"
    path.write_text(json.dumps(profile.to_dict()))
    assert load_profile(str(path)) == profile
    assert "planner profile" in profile.sources["gpu.gemm_efficiency_max"]


@pytest.mark.slow
def test_planner_profile_on_cpu_writes_a_loadable_profile(tmp_path):
    out = tmp_path / "ours.json"
    run = subprocess.run([sys.executable, "-m", "planner.cli", "profile", "--out", str(out),
                          "--ranks", "2"], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    assert "[gemm" in run.stderr and "[all-reduce" in run.stderr  # progress was shown
    assert "[host, layer at tp=2]" in run.stderr
    profile = load_profile(str(out))
    assert profile.gpus_per_node == 2 and profile.gpu.peak_flops["fp32"] > 0
    gpu = profile.gpu
    assert gpu.host_is_device and gpu.kernel_overhead_s == 0
    assert set(gpu.host_layer_overhead_s) == {"1", "2"}
    # a DTensor layer costs the host more than a plain one
    assert sum(gpu.host_layer_s(2)) > sum(gpu.host_layer_s(1)) > 0


def test_single_rank_profile_keeps_the_base_fabric():
    m = ProfileMeasurements.from_dict(_measurements(
        device_name="one-gpu", ranks=1, gemms=_synthetic_gemms(0.6, 64.0, 1e14),
        copy_bytes_per_s=2e12, memory_bytes=80 * 2**30, allreduce_bytes=[], allreduce_s=[],
        layer_host_s={"1": [1e-4, 2e-4]}))
    base = load_profile("h100-80g")
    profile = profile_from_measurements(base, m, "one")
    assert profile.intra_node == base.intra_node and profile.gpus_per_node == 8
    assert profile.gpu.gemm_efficiency_max == pytest.approx(0.6, rel=0.01)


def test_cpu_measurements_take_the_best_gemm_as_peak():
    m = ProfileMeasurements.from_dict(_measurements(peak_flops=None, host_is_device=True,
                                                    shared_cores=2))  # null: CPU ranks
    profile = profile_from_measurements(load_profile("cpu"), m, "cpu-ours")
    assert profile.gpu.peak_flops["bf16"] == max(g[3] for g in m.gemms)
    assert profile.gpu.kernel_overhead_s == 0 and profile.gpu.shared_cores == 2


BAD_MEASUREMENTS = [
    ({"peak_flops": True}, "peak_flops"), ({"peak_flops": 0}, "peak_flops must be > 0"),
    ({"copy_bytes_per_s": float("nan")}, "copy_bytes_per_s"),
    ({"copy_bytes_per_s": float("inf")}, "copy_bytes_per_s"),
    ({"copy_bytes_per_s": None}, "copy_bytes_per_s"),
    ({"memory_bytes": 1.5e9}, "memory_bytes must be an integer"),
    ({"ranks": 0}, "ranks must be >= 1"), ({"ranks": True}, "ranks must be an integer"),
    ({"precision": "fp64"}, "precision"), ({"device_name": ""}, "device_name"),
    ({"host_is_device": 1}, "host_is_device must be true or false"),
    ({"shared_cores": -1}, "shared_cores"),
    ({"gemms": [[256, 128, 64, 1e12]]}, "at least 2 GEMM"),
    ({"gemms": [[256, 128, 64, 1e12], [256, 128, 64, -1.0]]}, r"gemms\[1\] FLOP/s"),
    ({"gemms": [[256, 128, 64, 1e12], [256, 128, True, 1e12]]}, r"gemms\[1\].k"),
    ({"gemms": [[256, 128, 64, 1e12], [256, 128, 1e12]]}, "must have 4 entries"),
    ({"gemms": "fast"}, "gemms must be a list"),
    ({"allreduce_s": [1e-4]}, "2 sizes but allreduce_s 1 times"),
    ({"allreduce_s": [1e-4, float("nan")]}, r"allreduce_s\[1\]"),
    ({"allreduce_bytes": [2**20, -1]}, r"allreduce_bytes\[1\]"),
    ({"allreduce_bytes": [2**20], "allreduce_s": [1e-4]}, "at 2 sizes or more"),
    ({"ranks": 1}, "one rank measures no all-reduce"),
    ({"layer_host_s": {}}, "layer_host_s must be a non-empty object"),
    ({"layer_host_s": {"two": [1e-4, 1e-4]}}, "must be a TP degree"),
    ({"layer_host_s": {"1": [1e-4, None]}}, "backward_s"),
    ({"layer_host_s": {"1": [1e-4]}}, "must have 2 entries"),
    ({"schema_version": 2}, "schema_version must be 1"),
    ({"extra": 1}, "unknown key 'extra'"),
]


@pytest.mark.parametrize("changes,phrase", BAD_MEASUREMENTS)
def test_bad_measurements_are_refused(changes, phrase):
    with pytest.raises(ValueError, match=phrase) as err:
        ProfileMeasurements.from_dict(_measurements(**changes))
    assert "\n" not in str(err.value)


def test_missing_measurement_keys_are_refused(tmp_path):
    for key in ("layer_host_s", "host_is_device", "schema_version", "peak_flops"):
        m = _measurements()
        del m[key]
        with pytest.raises(ValueError, match=f"missing key '{key}'"):
            ProfileMeasurements.from_dict(m)
    path = tmp_path / "m.json"
    path.write_text(json.dumps(_measurements(gemms=[])))
    with pytest.raises(ValueError, match="at least 2 GEMM"):
        ProfileMeasurements.load(path)
