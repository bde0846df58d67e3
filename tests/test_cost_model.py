"""Behaviour of the cost model: each knob moves the figure it should, and only that one."""

import pytest

from planner.cost.combine import bubble_chunks
from planner.cost.comm_plan import dp_collectives
from planner.cost.estimate import estimate
from planner.cost.fields import call, plan_fields, with_rank
from planner.cost.memory import rank_memory
from planner.cost.pipeline import inflight_chunks
from planner.hardware import load_cluster
from planner.job import Job
from planner.plan import Layout, Plan
from planner.presets import MODEL_PRESETS


def _plan(layout, model="llama2-7b", nodes=1, batch=64, seq=4096, **job):
    return Plan(model=MODEL_PRESETS[model], cluster=load_cluster("a100-80g", nodes),
                job=Job(global_batch=batch, seq_len=seq, **job), layout=layout)


def memory_breakdown(plan):
    return estimate(plan).memory


def _inflight(lay, rank):
    return inflight_chunks(pp=lay.pp, num_microbatches=lay.num_microbatches,
                           virtual_stages=lay.virtual_stages, schedule=lay.schedule, rank=rank)


def _dp_collectives(plan, rank):
    return call(dp_collectives, with_rank(plan_fields(plan), rank))


def test_zero_stages_shrink_model_states():
    totals = []
    for zero in range(4):
        mem = memory_breakdown(_plan(Layout(dp=8, zero_stage=zero, num_microbatches=8)))
        totals.append(mem.weights_bytes + mem.gradients_bytes + mem.optimizer_bytes)
    assert totals[0] > totals[1] > totals[2] == totals[3]  # FSDP2 shards weights from ZeRO-2
    zero3 = memory_breakdown(_plan(Layout(dp=8, zero_stage=3, num_microbatches=8)))
    zero2 = memory_breakdown(_plan(Layout(dp=8, zero_stage=2, num_microbatches=8)))
    assert zero3.gathered_params_bytes < zero2.gathered_params_bytes


def test_recompute_and_sp_shrink_activations():
    base = dict(tp=8, num_microbatches=64)
    none = memory_breakdown(_plan(Layout(**base))).activations_bytes
    sp = memory_breakdown(_plan(Layout(**base, sequence_parallel=True))).activations_bytes
    full = memory_breakdown(_plan(Layout(**base, recompute="full"))).activations_bytes
    assert full < sp < none


def test_recompute_costs_time():
    base = dict(tp=8, num_microbatches=64)
    t_none = estimate(_plan(Layout(**base))).step_s
    t_full = estimate(_plan(Layout(**base, recompute="full"))).step_s
    assert t_full > 1.2 * t_none


def test_pipeline_inflight_microbatches():
    gpipe = Layout(pp=4, num_microbatches=8, schedule="gpipe")
    one_f_one_b = Layout(pp=4, num_microbatches=8, schedule="1f1b")
    assert [_inflight(gpipe, r) for r in range(4)] == [8, 8, 8, 8]
    assert [_inflight(one_f_one_b, r) for r in range(4)] == [4, 3, 2, 1]
    # Korthikanti Sec. 4.2.3: interleaving holds (1 + (p-1)/(p v)) times 1F1B's first stage
    inter = Layout(pp=4, num_microbatches=8, schedule="interleaved_1f1b", virtual_stages=2)
    assert _inflight(inter, 0) / 2 == pytest.approx(4 * (1 + 3 / 8))


def test_most_loaded_rank_is_reported():
    plan = _plan(Layout(pp=4, dp=2, num_microbatches=32), batch=64)
    mem = memory_breakdown(plan)
    assert mem.total_bytes == max(rank_memory(plan, r).total_bytes for r in range(4))
    assert mem.pp_rank == 0  # 1F1B: the first stage holds p micro-batches


def test_bubble_shrinks_with_more_microbatches_and_interleaving():
    few = estimate(_plan(Layout(pp=8, num_microbatches=8), batch=8)).time.bubble_fraction
    many = estimate(_plan(Layout(pp=8, num_microbatches=64), batch=64)).time.bubble_fraction
    inter = estimate(_plan(Layout(pp=8, num_microbatches=64, schedule="interleaved_1f1b",
                                  virtual_stages=2), batch=64)).time.bubble_fraction
    assert few > many > inter


def test_uniform_pipeline_closed_form():
    """Narayanan et al. 2021: (m + (p-1)/v) micro-batch times; bubble (p-1)/(v m + p - 1)."""
    for layout, bubble in ((Layout(pp=8, num_microbatches=64), 7 / 71),
                           (Layout(pp=8, num_microbatches=64, schedule="interleaved_1f1b",
                                   virtual_stages=4), 7 / (4 * 64 + 7))):
        idle = 2.0 * bubble_chunks(pp=layout.pp, virtual_stages=layout.virtual_stages,
                                   zero_bubble=False, fwd_s=1.0, bwd_s=1.0, wgrad_s=0.5)
        total = layout.num_microbatches * 2.0 + idle
        assert idle / total == pytest.approx(bubble, rel=1e-12)


def test_does_not_fit_verdict():
    plan = _plan(Layout(dp=8, num_microbatches=1, micro_batch=8), model="llama2-13b")
    assert not estimate(plan).fits


def test_inter_node_dp_is_slower_than_intra_node():
    intra = estimate(_plan(Layout(dp=8, num_microbatches=8), model="gpt3-1.3b", batch=64,
                           seq=2048))
    inter_plan = Plan(model=MODEL_PRESETS["gpt3-1.3b"], cluster=load_cluster("a100-80g", 8),
                      job=Job(global_batch=64, seq_len=2048),
                      layout=Layout(dp=8, tp=8, num_microbatches=8, mesh_order=("pp", "dp", "tp")))
    inter = estimate(inter_plan)
    dp_intra = [c for c in intra.communication if c.axis == "dp"][0]
    dp_inter = [c for c in inter.communication if c.axis == "dp"][0]
    assert dp_intra.tier == "intra" and dp_inter.tier == "inter"
    assert dp_inter.time_each_s / dp_inter.bytes_each > dp_intra.time_each_s / dp_intra.bytes_each


def _cpu_plan(layout, shared_cores):
    import dataclasses

    from planner.hardware import Cluster
    cluster = load_cluster("cpu", 1)
    gpu = dataclasses.replace(cluster.profile.gpu, shared_cores=shared_cores)
    profile = dataclasses.replace(cluster.profile, gpu=gpu)
    batch = layout.dp * layout.micro_batch * layout.num_microbatches
    return Plan(model=MODEL_PRESETS["tiny"], cluster=Cluster(profile=profile, num_nodes=1),
                job=Job(global_batch=batch, seq_len=128, precision="fp32"), layout=layout)


def test_shared_cores_reclaim_the_bubble():
    """8 CPU ranks on 2 cores: a rank idle in the bubble lends its cores to the busy ones."""
    layout = Layout(dp=2, pp=4, zero_stage=2, micro_batch=1, num_microbatches=4)
    own = estimate(_cpu_plan(layout, shared_cores=0)).time
    shared = estimate(_cpu_plan(layout, shared_cores=2)).time
    assert own.bubble_s > 0 and shared.bubble_s == 0
    assert shared.step_s == pytest.approx(own.step_s - own.bubble_s)
    # with a core per rank nothing is lent; with 7 cores of 8 the step cannot drop below 7/8
    assert estimate(_cpu_plan(layout, shared_cores=8)).time.bubble_s == own.bubble_s
    almost = estimate(_cpu_plan(layout, shared_cores=7)).time
    assert almost.step_s == pytest.approx(own.step_s * 7 / 8)


def test_fsdp2_gathers_and_reduces_each_block_on_its_own():
    plan = _cpu_plan(Layout(dp=2, pp=4, zero_stage=3, micro_batch=1, num_microbatches=4), 0)
    first, middle = _dp_collectives(plan, 0), _dp_collectives(plan, 1)
    # 8 layers over 4 stages: 2 blocks each, plus the root group (embedding) on stage 0; under
    # pipelining one reduce-scatter per group and step, m + 1 ZeRO-3 gathers
    # (tests/test_runtime_fsdp_pipeline.py counts them on the runtime)
    assert [c.count for c in first] == [3, (4 + 1) * 3]
    assert [c.count for c in middle] == [2, (4 + 1) * 2]
    flat = _dp_collectives(_cpu_plan(Layout(dp=8, zero_stage=3, micro_batch=1,
                                            num_microbatches=4), 0), 0)
    assert [c.count for c in flat] == [4 * 9, 2 * 4 * 9]  # per micro-batch, 8 blocks + root
    megatron = Plan(model=MODEL_PRESETS["llama2-7b"], cluster=load_cluster("a100-80g", 1),
                    job=Job(global_batch=64, seq_len=4096, engine="megatron"),
                    layout=Layout(dp=8, zero_stage=1, micro_batch=1, num_microbatches=8))
    assert [c.count for c in _dp_collectives(megatron, 0)] == [1, 1]


@pytest.mark.parametrize("zero", [0, 3])
def test_gradient_accumulation_adds_three_gradient_passes_per_extra_microbatch(zero):
    """torch engine: micro-batches 2..m each add into the rank's gradients in place (read both,
    write one); one micro-batch adds nothing, and Megatron-LM's fused accumulation nothing."""
    def run(nmb, engine="torch"):
        plan = _plan(Layout(dp=8, zero_stage=zero, micro_batch=1, num_microbatches=nmb),
                     batch=8 * nmb, engine=engine)
        return plan, estimate(plan)
    plan, one = run(1)
    _, eight = run(8)
    gpu = plan.cluster.profile.gpu
    grads = rank_memory(plan, 0).gradients_bytes
    want = 7 * 3 * grads / (gpu.hbm_bandwidth_bytes_per_s * gpu.memory_efficiency)
    assert eight.time.optimizer_s - one.time.optimizer_s == pytest.approx(want, rel=1e-9)
    assert run(8, "megatron")[1].time.optimizer_s == pytest.approx(
        run(1, "megatron")[1].time.optimizer_s, rel=1e-12)
