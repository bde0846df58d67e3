"""CPU offload (Layout.offload): rules, the GPU/host split of the model states, the fits verdict
over GPU and host memory, the step's CPU Adam and host-link time, exports and the runtime's
refusal on CPU."""

import dataclasses
import json

import pytest

from planner import export
from planner.cost.estimate import estimate
from planner.cost.fields import call, plan_fields, with_rank
from planner.cost.memory import host_states, rank_memory, rank_states
from planner.cost.params import _local_numel
from planner.hardware import Cluster, HardwareProfile, HostSpec, load_cluster, load_profile
from planner.job import Job
from planner.plan import Layout, Plan, layout_errors
from planner.presets import MODEL_PRESETS

MODEL = MODEL_PRESETS["llama3-8b"]


def _plan(engine="deepspeed", offload="optimizer", zero_stage=3, profile="h100-80g",
          **kw) -> Plan:
    lay = Layout(dp=8, zero_stage=zero_stage, micro_batch=1, num_microbatches=8,
                 offload=offload, **kw)
    job = Job(global_batch=64, seq_len=4096, precision="bf16", engine=engine)
    return Plan(model=MODEL, cluster=load_cluster(profile, 1), job=job, layout=lay)


@pytest.mark.parametrize("engine,offload,zero,message", [
    ("torch", "optimizer", 3, "offload optimizer with ZeRO-3: the torch engine offloads with "
                              "FSDP2's CPUOffloadPolicy"),
    ("torch", "params", 1, "offload params with ZeRO-1: the torch engine"),
    ("megatron", "params", 1, "offload params with ZeRO-1: Megatron-LM offloads the "
                              "distributed optimizer"),
    ("deepspeed", "params", 2, "offload params with ZeRO-2: DeepSpeed offloads"),
    ("deepspeed", "optimizer", 0, "offload optimizer with ZeRO-0: DeepSpeed"),
])
def test_engines_offload_only_what_they_run(engine, offload, zero, message):
    with pytest.raises(ValueError, match=message):
        _plan(engine=engine, offload=offload, zero_stage=zero) if zero else Plan(
            model=MODEL, cluster=load_cluster("h100-80g", 1),
            job=Job(global_batch=64, seq_len=4096, precision="bf16", engine=engine),
            layout=Layout(dp=8, micro_batch=1, num_microbatches=8, offload=offload))


def test_a_profile_without_host_figures_refuses_offload():
    old = json.loads(json.dumps(load_profile("h100-80g").to_dict()))
    old["schema_version"] = 3
    del old["host"]
    cluster = Cluster(profile=HardwareProfile.from_dict(old), num_nodes=1)
    p = _plan()
    errors = layout_errors(p.model, cluster, p.job, p.layout)
    assert errors and "has no host memory / host-link / CPU Adam figures" in errors[0]
    with pytest.raises(ValueError, match="offload must be one of"):
        Layout(offload="nvme")


def test_optimizer_offload_moves_master_moments_and_fp32_grads_to_the_host():
    plan = _plan()
    named = with_rank(plan_fields(plan), 0)
    w, g, o = call(rank_states, named)
    mem = rank_memory(plan, 0)
    part = o / 12  # DeepSpeed: fp32 master + two fp32 moments per partition parameter
    assert mem.optimizer_bytes == 0 and mem.weights_bytes == w
    assert mem.gradients_bytes == g - 4 * part
    assert call(host_states, named) == o + 4 * part  # 16 bytes per partition parameter
    assert mem.host_bytes_per_node == 8 * (o + 4 * part)
    assert mem.host_capacity_bytes == 2 * 2**40 and mem.fits


def test_params_offload_under_fsdp2_keeps_nothing_sharded_on_the_gpu():
    plan = _plan(engine="torch", offload="params")
    named = with_rank(plan_fields(plan), 0)
    mem = rank_memory(plan, 0)
    assert (mem.weights_bytes, mem.gradients_bytes, mem.optimizer_bytes) == (0, 0, 0)
    assert call(host_states, named) == sum(call(rank_states, named))
    assert mem.gathered_params_bytes > 0  # the gathered 16-bit copies still live on the GPU


def test_the_fits_verdict_covers_host_memory():
    small = dataclasses.replace(load_profile("h100-80g"),
                                host=HostSpec(memory_bytes_per_node=64 * 2**30,
                                              h2d_bandwidth_bytes_per_s=50e9,
                                              cpu_adam_params_per_s=4e9))
    plan = dataclasses.replace(_plan(), cluster=Cluster(profile=small, num_nodes=1))
    mem = estimate(plan).memory
    assert mem.total_bytes <= mem.capacity_bytes
    assert mem.host_bytes_per_node > 64 * 2**30 and not mem.fits
    assert estimate(plan).to_dict()["memory"]["host_fits"] is False


def test_offload_adds_the_cpu_step_and_the_copy_back():
    plan, base = _plan(), _plan(offload="none")
    host = plan.cluster.profile.host
    numel = _local_numel(MODEL, 1, MODEL.num_layers, True, True, False)
    cpu_step = numel / 8 * 8 / host.cpu_adam_params_per_s   # the node's 8 partitions
    copy_back = 2 * numel / 8 / host.h2d_bandwidth_bytes_per_s  # bf16 partition, once
    assert estimate(plan).time.optimizer_s == pytest.approx(cpu_step + copy_back, rel=1e-9)
    assert estimate(base).time.optimizer_s > 0
    assert estimate(plan).tokens_per_s < estimate(base).tokens_per_s


def test_exports_say_offload_or_refuse():
    ds = export.deepspeed_config(_plan(offload="params"))["zero_optimization"]
    assert ds["offload_optimizer"]["device"] == ds["offload_param"]["device"] == "cpu"
    opt = export.deepspeed_config(_plan(zero_stage=1))["zero_optimization"]
    assert "offload_optimizer" in opt and "offload_param" not in opt
    mega = _plan(engine="megatron", zero_stage=1)
    assert "--optimizer-cpu-offload" in export.megatron_args(mega)
    with pytest.raises(ValueError, match="offloads the distributed optimizer only"):
        export.megatron_args(_plan(offload="params"))


def test_the_runtime_refuses_offload_on_cpu_in_one_line():
    from runtime.parallelize import check_offload
    with pytest.raises(ValueError, match="CPUOffloadPolicy needs a CUDA device") as err:
        check_offload(Layout(dp=2, zero_stage=3, micro_batch=1, offload="params"), "cpu")
    assert "\n" not in str(err.value)
    with pytest.raises(ValueError, match="offloads params only"):
        check_offload(Layout(dp=2, zero_stage=1, micro_batch=1, offload="optimizer"), "cuda")
    check_offload(Layout(dp=2, zero_stage=3, micro_batch=1, offload="params"), "cuda")


def test_search_offloads_when_asked_and_checks_host_memory():
    from planner.search.ranking import search
    spec, cluster = MODEL_PRESETS["llama3-70b"], load_cluster("a100-80g", 1)
    job = Job(global_batch=64, seq_len=4096, precision="bf16", engine="deepspeed")
    assert not search(spec, cluster, job, top=1).ranked  # nothing fits on the GPUs alone
    found = search(spec, cluster, job, top=3, offload=None)
    assert found.ranked and all(c.layout.offload != "none" for c in found.ranked)
    assert all(c.estimate.memory.fits for c in found.ranked)
    tiny = dataclasses.replace(cluster.profile, host=dataclasses.replace(
        cluster.profile.host, memory_bytes_per_node=256 * 2**30))
    none = search(spec, Cluster(profile=tiny, num_nodes=1), job, top=1, offload=None)
    assert not none.ranked and none.rejected["CPU offload does not fit in host memory"] > 0


def test_nothing_fits_advice_names_the_offload_and_its_cost():
    from planner.search import nofit
    from planner.search.ranking import search
    spec, cluster = MODEL_PRESETS["llama3-70b"], load_cluster("a100-80g", 1)
    job = Job(global_batch=64, seq_len=4096, precision="bf16", engine="deepspeed")
    result = search(spec, cluster, job, top=1)
    line = nofit.offload_line(result, search)
    best = search(spec, cluster, job, top=1, offload=None).ranked[0]
    plain = estimate(dataclasses.replace(best.plan, layout=dataclasses.replace(
        best.layout, offload="none")))
    pct = 100 * (best.tokens_per_s / plain.tokens_per_s - 1)
    assert line.startswith(f"fits with {best.layout.offload} offload: ")
    assert f"at {pct:+.0f}% throughput against the same layout without it" in line
