"""Host (framework dispatch) time per layer: the profile's table, how `planner profile` fills it,
and how the cost model combines it with kernel time."""

import dataclasses
import json

import pytest

from planner.calibration.profile_fit import host_table
from planner.cost.comm import collective_latency
from planner.cost.compute import layer_times
from planner.hardware import HardwareProfile, load_profile
from planner.job import Job
from planner.presets import MODEL_PRESETS

TABLE = {"1": [0.001, 0.002], "2": [0.04, 0.06], "4": [0.05, 0.09]}


def _gpu(profile: str, **changes):
    return dataclasses.replace(load_profile(profile).gpu, **changes)


def test_lookup_takes_the_degree_or_the_largest_measured_below_it():
    gpu = _gpu("cpu", host_layer_overhead_s=TABLE)
    assert gpu.host_layer_s(1) == (0.001, 0.002)
    assert gpu.host_layer_s(4) == (0.05, 0.09)
    assert gpu.host_layer_s(8) == (0.05, 0.09)  # measured up to 4 ranks
    assert _gpu("a100-80g").host_layer_s(8) == (0.0, 0.0)  # nothing measured: no host term


@pytest.mark.parametrize("table, message", [
    ({"two": [0.1, 0.1]}, "key must be a TP degree"),
    ({"2": [0.1]}, "must be [forward_s, backward_s]"),
    ({"2": [0.1, -1.0]}, "must be >= 0"),
    ([0.1, 0.2], "must be an object"),
])
def test_bad_host_table_is_a_one_line_error(table, message):
    data = load_profile("cpu").to_dict()
    data["gpu"]["host_layer_overhead_s"] = table
    with pytest.raises(ValueError, match="host_layer_overhead_s") as err:
        HardwareProfile.from_dict(json.loads(json.dumps(data)))
    assert message in str(err.value) and "\n" not in str(err.value)


def test_fit_takes_the_tp_collective_waits_out_on_cpu_ranks_only():
    latency, host = 1e-3, [0.030, 0.050]
    # the probe layer (llama, sequence parallel, torch engine) at tp=4: forward 2 all-gathers +
    # 2 reduce-scatters, backward 2 all-gathers + 5 all-reduces
    fwd_wait = 2 * collective_latency("all_gather", 4, latency) + \
        2 * collective_latency("reduce_scatter", 4, latency)
    bwd_wait = 2 * collective_latency("all_gather", 4, latency) + \
        5 * collective_latency("all_reduce", 4, latency)
    measured = {"1": [0.002, 0.003], "4": [host[0] + fwd_wait, host[1] + bwd_wait]}
    on_cpu = host_table(measured, host_is_device=True, latency_s=latency)
    assert on_cpu["1"] == [0.002, 0.003]
    assert on_cpu["4"] == pytest.approx(host)
    assert host_table(measured, host_is_device=False, latency_s=latency) == measured


def _layer(gpu, tp=2, engine="torch"):
    job = Job(global_batch=8, seq_len=128, precision="fp32", engine=engine)
    return layer_times(gpu, MODEL_PRESETS["tiny"], job, tp=tp, sequence_parallel=False,
                       micro_batch=1)


def test_host_time_adds_on_cpu_ranks_and_hides_behind_gpu_kernels():
    plain = _layer(_gpu("cpu", host_layer_overhead_s={}))
    kernels_fwd, kernels_bwd = plain.fwd_s, plain.bwd_s
    on_cpu = _layer(_gpu("cpu", host_layer_overhead_s=TABLE, host_is_device=True))
    assert on_cpu.fwd_s == pytest.approx(kernels_fwd + 0.04)
    assert on_cpu.bwd_s == pytest.approx(kernels_bwd + 0.06)
    small = {"2": [kernels_fwd / 2, kernels_bwd * 2]}  # forward hidden, backward host-bound
    on_gpu = _layer(_gpu("cpu", host_layer_overhead_s=small, host_is_device=False))
    assert on_gpu.fwd_s == pytest.approx(kernels_fwd)
    assert on_gpu.bwd_s == pytest.approx(kernels_bwd * 2)


def test_megatron_engine_has_no_measured_host_term():
    gpu = _gpu("cpu", host_layer_overhead_s=TABLE, host_is_device=True)
    assert _layer(gpu, engine="megatron").fwd_s == \
        pytest.approx(_layer(_gpu("cpu", host_layer_overhead_s={}), engine="megatron").fwd_s)
