import json
import re
import subprocess
import sys
from types import SimpleNamespace

import numpy as np
import pytest

from planner import limits
from planner.calibration.gemm_fit import fit_gemm_efficiency
from planner.calibration.profile_fit import (fit_alpha_beta, fit_gemms, fit_profile,
                                             profile_from_measurements)
from planner.cli import main
from planner.hardware import load_profile
from planner.measured import MachineLoad, ProfileMeasurements


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


IDLE = {"loadavg_1min": 0.1, "own_load": 0.0, "host_cpus": 16, "cores": 4, "core_share": 0.99}


def _measurements(**changes) -> dict:
    """Measurements as runtime/hwprofile.py writes them, of a 4-GPU machine."""
    m = {"schema_version": 2, "device_name": "test-gpu", "host": "h", "ranks": 4,
         "precision": "bf16", "peak_flops": 1e14,
         "gemms": [list(g) for g in _synthetic_gemms(0.75, 128.0, 1e14)],
         "copy_bytes_per_s": 1e12, "memory_bytes": 16 * 2**30,
         "allreduce_bytes": [2**20, 2**24], "allreduce_s": [1e-4, 1e-3],
         "layer_host_s": {"1": [1e-4, 2e-4], "2": [2e-4, 4e-4]}, "host_is_device": False,
         "shared_cores": 0, "repeats": 5,
         "spread": {"gemms": 0.02, "copy": 0.01, "allreduce": 0.03, "layer_host": 0.04},
         "load_before": dict(IDLE), "load_during": {**IDLE, "loadavg_1min": 4.2, "own_load": 4}}
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
    """--allow-busy: a test host is rarely idle; the profile then says it was under load.  On a
    host so loaded that the figures are implausible the refusal is the right answer: checked,
    then the test is skipped."""
    out = tmp_path / "ours.json"
    run = subprocess.run([sys.executable, "-m", "planner.cli", "profile", "--out", str(out),
                          "--ranks", "2", "--allow-busy"], capture_output=True, text=True,
                         timeout=300)
    assert "[gemm" in run.stderr and "[all-reduce" in run.stderr  # progress was shown
    assert "[host, layer at tp=2]" in run.stderr and "[load] before" in run.stderr
    if run.returncode == 2 and "planner/limits.py" in run.stderr:
        error = run.stderr.strip().splitlines()[-1]
        assert error.startswith("planner profile: error: ") and not out.exists()
        shares = [int(x) for x in re.findall(r"(\d+)% of \d+ core", run.stderr)]
        assert min(shares) < 100 * limits.MIN_CORE_SHARE, run.stderr  # only a busy host
        pytest.skip(f"refused on a busy host (cores' share {min(shares)}%): {error}")
    assert run.returncode == 0, run.stderr
    assert "GEMM efficiency fit: rms residual" in run.stdout
    profile = load_profile(str(out))
    assert ("UNDER LOAD" in profile.description) == ("measured under load" in run.stderr)
    assert "spread of 5 repeats" in profile.sources["measurement"]
    assert profile.gpus_per_node == 2 and profile.gpu.peak_flops["fp32"] > 0
    gpu = profile.gpu
    # CPU ranks: the torch runtime's resident set is measured, as the context; no CUDA items
    assert 50 * 2**20 < gpu.context_bytes < 4 * 2**30
    assert "resident set" in profile.sources["gpu.context_bytes"]
    assert gpu.blas_workspace_bytes == gpu.comm_buffer_bytes_per_group == 0
    assert gpu.host_is_device and gpu.kernel_overhead_s == 0
    assert set(gpu.host_layer_overhead_s) == {"1", "2"}
    # a DTensor layer costs the host more than a plain one
    assert sum(gpu.host_layer_s(2)) > sum(gpu.host_layer_s(1)) > 0
    # the host terms of CPU offload (on CPU the host-to-device copy is a memcpy)
    assert "[host] " in run.stderr and "memcpy" in run.stderr
    host = profile.host
    assert host.known and host.memory_bytes_per_node > 2**30
    assert "memcpy" in profile.sources["host.h2d_bandwidth_bytes_per_s"]


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
    ({"schema_version": 3}, "schema_version must be 1 or 2"),
    ({"schema_version": True}, "schema_version must be 1 or 2"),
    ({"extra": 1}, "unknown key 'extra'"),
    ({"repeats": 0}, "repeats must be >= 1"),
    ({"spread": {"gemms": -0.1}}, r"spread\['gemms'\]"),
    ({"load_before": None}, "load_before"),
    ({"load_during": {**IDLE, "core_share": float("nan")}}, "core_share"),
    ({"load_during": {**IDLE, "cores": 0}}, "cores must be >= 1"),
    ({"schema_version": 1}, "unknown key 'load_before' .schema_version 1."),
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


def test_measured_host_terms_replace_the_base_ones_with_their_method():
    measured = {"memory_bytes_per_node": 2**40, "h2d_bandwidth_bytes_per_s": 51e9,
                "cpu_adam_params_per_s": 3e9}
    m = ProfileMeasurements.from_dict(_measurements(host_offload=measured))
    assert ProfileMeasurements.from_dict(json.loads(json.dumps(m.to_dict()))) == m
    profile = profile_from_measurements(load_profile("h100-80g"), m, "ours")
    assert (profile.host.memory_bytes_per_node, profile.host.h2d_bandwidth_bytes_per_s,
            profile.host.cpu_adam_params_per_s) == (2**40, 51e9, 3e9)
    assert "AdamW" in profile.sources["host.cpu_adam_params_per_s"]
    old = ProfileMeasurements.from_dict(_measurements())
    assert profile_from_measurements(load_profile("h100-80g"), old, "ours").host == \
        load_profile("h100-80g").host
    with pytest.raises(ValueError, match="host_offload key"):
        ProfileMeasurements.from_dict(_measurements(host_offload={"nvme_bytes": 1}))


def test_measured_outside_tensor_items_replace_the_base_ones_with_their_method():
    """What runtime/memprofile.py measured on a GPU goes into the profile, each item citing how
    it was measured; an item it did not measure keeps the base profile's figure."""
    measured = {"context_bytes": 601 * 2**20, "blas_workspace_bytes": 32 * 2**20,
                "comm_buffer_bytes_per_group": 150e6, "allocator_fragmentation": 0.07}
    m = ProfileMeasurements.from_dict(_measurements(outside_tensors=measured))
    assert ProfileMeasurements.from_dict(json.loads(json.dumps(m.to_dict()))) == m
    base = load_profile("h100-80g")
    profile = profile_from_measurements(base, m, "ours")
    gpu = profile.gpu
    assert (gpu.context_bytes, gpu.blas_workspace_bytes, gpu.comm_buffer_bytes_per_group,
            gpu.allocator_fragmentation) == (601 * 2**20, 32 * 2**20, 150_000_000, 0.07)
    assert gpu.comm_buffer_bytes_per_peer == base.gpu.comm_buffer_bytes_per_peer
    assert "mem_get_info" in profile.sources["gpu.context_bytes"]
    assert profile.sources["gpu.comm_buffer_bytes_per_peer"] == \
        base.sources["gpu.comm_buffer_bytes_per_peer"]
    # a measurements file written before the item existed: nothing measured, base kept
    old = ProfileMeasurements.from_dict(_measurements())
    assert old.outside_tensors == {}
    assert profile_from_measurements(base, old, "ours").gpu.context_bytes == base.gpu.context_bytes
    for bad, phrase in (({"framework_overhead_bytes": 1}, "outside_tensors key"),
                        ({"context_bytes": -1}, "must be >= 0"), ([], "must be an object")):
        with pytest.raises(ValueError, match=phrase):
            ProfileMeasurements.from_dict(_measurements(outside_tensors=bad))


# --- robust statistics, fit quality and plausible bounds ---------------------------------------

CPU_SHAPES = [(512, k * h, h) for h in (128, 256, 512) for k in (1, 3, 4)] + \
    [(512, h, 4 * h) for h in (128, 256, 512)]


def _cpu_gemms(half_dim: float, noise: float = 0.03, seed: int = 0) -> list:
    """CPU GEMM rates on runtime/hwprofile.py's CPU shapes along a curve of `half_dim`."""
    rng = np.random.default_rng(seed)
    q = [np.prod([d / (d + half_dim) for d in shape]) for shape in CPU_SHAPES]
    return [[*shape, 2e10 * f / max(q) * rng.uniform(1 - noise, 1 + noise)]
            for shape, f in zip(CPU_SHAPES, q)]  # the best GEMM: 20 GFLOP/s


def _cpu(**changes):
    return ProfileMeasurements.from_dict(_measurements(
        peak_flops=None, host_is_device=True, shared_cores=2, precision="fp32", **changes))


def test_a_noisy_gemm_measurement_is_refused_not_written(tmp_path):
    """A loaded host once measured rates that rose with every dimension: the old fit made
    gemm_half_dim ~4000 at efficiency 1.00 (predictions ~1000x too slow).  Refused by name."""
    noisy = _cpu_gemms(4011.0)
    _, half_dim, _ = fit_gemm_efficiency(noisy, max(g[3] for g in noisy))
    assert half_dim > 3000  # what used to be written
    with pytest.raises(ValueError) as err:
        fit_profile(load_profile("cpu"), _cpu(gemms=noisy), "noisy")
    msg = str(err.value)
    assert msg.startswith("gpu.gemm_half_dim = ") and "above 1024" in msg and "\n" not in msg
    assert float(msg.split()[2]) == pytest.approx(half_dim, rel=1e-3)


def test_the_written_gemm_fit_caps_e_max_inside_the_fit():
    """Rates of a curve that needs e_max > 1: the capped fit still follows the data (the old
    fit capped afterwards and reported the residual of the uncapped curve)."""
    gemms = _cpu_gemms(300.0, noise=0.0)
    e_max, half_dim, res = fit_gemms(gemms, max(g[3] for g in gemms))
    assert e_max == 1.0 and half_dim <= limits.PLAUSIBLE_GEMM_HALF_DIM[1]
    assert np.sqrt(np.mean(res ** 2)) < limits.REFUSE_FIT_RMS


def test_fit_quality_is_reported_and_a_bad_fit_refused():
    profile, report = fit_profile(load_profile("a100-80g"), ProfileMeasurements.from_dict(
        _measurements()), "ours")
    assert report.rms(report.gemm_residuals) < 0.01 and len(report.allreduce_residuals) == 2
    lines = report.lines()
    assert lines[0].startswith("GEMM efficiency fit: rms residual")
    assert any("all-reduce alpha-beta fit" in x for x in lines)
    assert "spread of 5 repeats" in lines[-1] and report.warnings == ()
    assert "rms residual" in profile.sources["intra_node"]
    scattered = [[m, n, k, r * (2.0 if i % 2 else 0.5)]
                 for i, (m, n, k, r) in enumerate(_synthetic_gemms(0.75, 128.0, 1e14))]
    with pytest.raises(ValueError, match=r"GEMM efficiency fit: rms residual \d+% is above 40%"):
        fit_profile(load_profile("a100-80g"), ProfileMeasurements.from_dict(
            _measurements(gemms=scattered)), "bad")


BAD_TERMS = [  # (measurement changes, the term named)
    ({"allreduce_s": [0.5, 0.6]}, "intra_node.latency_s = "),  # 0.5 s per hop: no fabric
    ({"allreduce_s": [1e-4, 200.0]}, "intra_node.bandwidth_bytes_per_s = "),
    ({"copy_bytes_per_s": 1e5}, r"gpu.hbm_bandwidth_bytes_per_s \(copy\) = 1e\+05 is below"),
    ({"layer_host_s": {"1": [5.0, 1e-4], "2": [2e-4, 4e-4]}}, "probe layer at tp=1"),
    ({"gemms": [list(g) for g in _synthetic_gemms(0.01, 128.0, 1e14)]},
     r"gpu.gemm_efficiency_max = 0.01\d* is below 0.05"),
]


@pytest.mark.parametrize("changes,term", BAD_TERMS)
def test_every_fitted_term_is_bounded(changes, term):
    with pytest.raises(ValueError, match=term) as err:
        fit_profile(load_profile("a100-80g"), ProfileMeasurements.from_dict(
            _measurements(**changes)), "bad")
    assert "plausible: [" in str(err.value) and "\n" not in str(err.value)


def test_a_wide_spread_of_repeats_is_a_loud_warning():
    _, report = fit_profile(load_profile("a100-80g"), ProfileMeasurements.from_dict(
        _measurements(spread={"gemms": 0.02, "layer_host": 0.6})), "ours")
    assert any("layer_host spread by 60%" in w for w in report.warnings)


def test_version_1_measurements_still_load_and_fit():
    v1 = {k: v for k, v in _measurements(schema_version=1).items()
          if k not in ("repeats", "spread", "load_before", "load_during")}
    m = ProfileMeasurements.from_dict(v1)
    assert m.repeats == 1 and m.load_before is None
    assert ProfileMeasurements.from_dict(m.to_dict()) == m and "repeats" not in m.to_dict()
    _, report = fit_profile(load_profile("a100-80g"), m, "old")
    assert report.busy is None and any("schema_version 1" in w for w in report.warnings)


# --- the machine's load ------------------------------------------------------------------------

def test_machine_load_busy_reason():
    assert MachineLoad(**IDLE).busy_reason() is None
    # 2 cores, both needed: a load average of 2 from other work is a busy machine
    busy = MachineLoad(loadavg_1min=2.0, own_load=0.0, host_cpus=2, cores=2, core_share=None)
    assert "load average 2.00" in busy.busy_reason()
    # the profile's own ranks do not count against it
    own = MachineLoad(loadavg_1min=8.2, own_load=8.0, host_cpus=2, cores=2, core_share=0.97)
    assert own.busy_reason() is None
    # spare cores beyond those the profile uses may be busy
    assert MachineLoad(loadavg_1min=10.0, own_load=0.0, host_cpus=16, cores=4,
                       core_share=0.98).busy_reason() is None
    shared = MachineLoad(loadavg_1min=0.0, own_load=0.0, host_cpus=2, cores=2, core_share=0.5)
    assert "got 50% of 2 core(s)" in shared.busy_reason()


def test_the_load_check_reads_os_getloadavg(monkeypatch, tmp_path):
    """runtime.hwprofile refuses before measuring (exit 3, the reason in <out>.refused); with
    --allow-busy it measures.  os.getloadavg and the idle-core probe are mocked."""
    hwprofile = pytest.importorskip("runtime.hwprofile")
    monkeypatch.setattr(hwprofile.os, "getloadavg", lambda: (3.5, 3.0, 2.0))
    monkeypatch.setattr(hwprofile.os, "cpu_count", lambda: 4)
    monkeypatch.setattr(hwprofile.os, "sched_getaffinity", lambda pid: {0, 1, 2, 3})
    monkeypatch.setattr(hwprofile, "idle_core_share", lambda cores: 1.0)
    load, reason = hwprofile.check_load_before(8, cuda=False)
    assert load.loadavg_1min == 3.5 and load.cores == 4 and "load average 3.50" in reason
    measured, saved = [], []
    monkeypatch.setattr(hwprofile, "measure", lambda *a: measured.append(a) or {})
    monkeypatch.setattr(hwprofile, "ProfileMeasurements", SimpleNamespace(
        from_dict=lambda d: SimpleNamespace(save=saved.append)))
    out = str(tmp_path / "m.json")
    assert hwprofile.main(["--out", out, "--ranks", "8"]) == 3 and not measured
    with open(out + ".refused") as f:
        assert "load average 3.50" in f.read()
    assert hwprofile.main(["--out", out, "--ranks", "8", "--allow-busy"]) == 0
    assert measured and measured[0][2].loadavg_1min == 3.5 and saved == [out]
    monkeypatch.setattr(hwprofile.os, "getloadavg", lambda: (0.2, 0.3, 0.5))
    assert hwprofile.check_load_before(8, cuda=False)[1] is None


def test_planner_profile_refuses_a_busy_machine_in_one_line(monkeypatch, tmp_path, capsys):
    import planner.cli.profile as cli

    def busy_run(cmd, **kw):
        out = cmd[cmd.index("--out") + 1]
        with open(out + ".refused", "w") as f:
            f.write("load average 2.00 over the last minute on 2 cores")
        assert "--allow-busy" not in cmd
        return subprocess.CompletedProcess(cmd, cli.BUSY_EXIT)
    monkeypatch.setattr(cli.subprocess, "run", busy_run)
    assert main(["profile", "--out", str(tmp_path / "p.json"), "--ranks", "2"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "busy before measuring: load average 2.00" in err
    assert "--allow-busy" in err and not (tmp_path / "p.json").exists()


def test_busy_while_measuring_is_refused_or_marked():
    m = _cpu(gemms=_cpu_gemms(62.0), load_during={
        "loadavg_1min": 4.2, "own_load": 4.0, "host_cpus": 2, "cores": 2, "core_share": 0.55})
    with pytest.raises(ValueError, match="busy while measuring: busy processes got 55%"):
        fit_profile(load_profile("cpu"), m, "busy")
    profile, report = fit_profile(load_profile("cpu"), m, "busy", allow_busy=True)
    assert report.busy and "UNDER LOAD (while measuring" in profile.description
    assert "UNDER LOAD" in profile.sources["gpu.gemm_efficiency_max"]


def test_profile_help_says_the_profile_captures_the_machine_state(capsys):
    with pytest.raises(SystemExit):
        main(["profile", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "captures the machine's state" in text and "--allow-busy" in text


def _stub_measuring(monkeypatch, raw: dict) -> list:
    """planner profile's measuring subprocess, replaced by writing `raw` where it would."""
    import planner.cli.profile as cli
    calls = []

    def fake_run(cmd, **kw):
        calls.append(cmd)
        ProfileMeasurements.from_dict(raw).save(cmd[cmd.index("--out") + 1])
        return subprocess.CompletedProcess(cmd, 0)
    monkeypatch.setattr(cli.subprocess, "run", fake_run)
    return calls


def test_planner_profile_writes_a_profile_and_prints_the_fit_quality(monkeypatch, tmp_path,
                                                                     capsys):
    calls = _stub_measuring(monkeypatch, _measurements(
        peak_flops=None, host_is_device=True, shared_cores=2, precision="fp32",
        gemms=_cpu_gemms(62.0)))
    out = tmp_path / "ours.json"
    assert main(["profile", "--out", str(out), "--ranks", "4"]) == 0
    assert "--allow-busy" not in calls[0]
    text = capsys.readouterr()
    assert "GEMM efficiency fit: rms residual" in text.out and "all-reduce alpha-beta" in text.out
    assert "WARNING" not in text.err
    profile = load_profile(str(out))
    assert "UNDER LOAD" not in profile.description and profile.gpus_per_node == 4


def test_planner_profile_busy_while_measuring(monkeypatch, tmp_path, capsys):
    busy = {"loadavg_1min": 6.5, "own_load": 4.0, "host_cpus": 2, "cores": 2, "core_share": 0.4}
    calls = _stub_measuring(monkeypatch, _measurements(
        peak_flops=None, host_is_device=True, shared_cores=2, precision="fp32",
        gemms=_cpu_gemms(62.0), load_during=busy))
    out = tmp_path / "ours.json"
    assert main(["profile", "--out", str(out), "--ranks", "4"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "busy while measuring" in err and not out.exists()
    assert main(["profile", "--out", str(out), "--ranks", "4", "--allow-busy"]) == 0
    assert "--allow-busy" in calls[-1]
    assert "WARNING: measured under load" in capsys.readouterr().err
    assert "UNDER LOAD (while measuring" in load_profile(str(out)).description
