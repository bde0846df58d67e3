"""The memory outside tensors depends on the plan through the process groups and pipeline
peers the runtime really creates: each rank of forked gloo worlds builds the runtime's mesh and
Engine, trains one step, and lists the process groups of >= 2 ranks it is in; the planner's
count (planner.cost.outside.process_groups) must name exactly as many, and each one adds one
communicator's buffers to the per-rank memory."""

import dataclasses

import pytest

from planner.cost.fields import plan_fields, with_rank
from planner.cost.memory import rank_memory
from planner.cost.outside import pipeline_peers, process_groups
from planner.hardware import load_profile
from planner.plan import Layout
from planner.presets import MODEL_PRESETS
from tests.runtime_dist import SEQ_LEN, SPEC, corpus_tokens, make_plan, run_world

L = Layout
TIED = dataclasses.replace(MODEL_PRESETS["tiny-gpt"], max_seq_len=SEQ_LEN, dropout=0.0)
# name -> (spec, layout), 4 ranks each: every axis alone, an axis spanning the world, a tied
# embedding split over stages (its pair group), zbv (both ends on one rank: no pair group)
WORLD_4 = {
    "dp4": (SPEC, L(dp=4, micro_batch=2, num_microbatches=1)),
    "dp2-tp2": (SPEC, L(dp=2, tp=2, micro_batch=2, num_microbatches=1)),
    "dp4-hsdp2": (SPEC, L(dp=4, dp_shard=2, zero_stage=3, micro_batch=2, num_microbatches=1)),
    "dp2-pp2-tied": (TIED, L(dp=2, pp=2, micro_batch=2, num_microbatches=4)),
    "pp4-interleaved": (SPEC, L(pp=4, micro_batch=1, num_microbatches=4,
                                schedule="interleaved_1f1b", virtual_stages=2)),
    "pp2-tp2-zbv-tied": (TIED, L(pp=2, tp=2, micro_batch=1, num_microbatches=4, schedule="zbv",
                                 virtual_stages=2)),
}


def _groups_of_rank(plans: list, tokens) -> list:
    import torch.distributed as dist
    from torch.distributed.distributed_c10d import _world

    from runtime.data import TokenData
    from runtime.engine import Engine
    from runtime.mesh import init_distributed
    def mine(groups) -> set:
        return {pg for pg in groups if dist.get_rank() in _world.pg_group_ranks[pg]
                and len(_world.pg_group_ranks[pg]) >= 2}

    out = []
    for plan in plans:  # one world for all plans: count the groups each plan adds
        before = set(_world.pg_group_ranks)
        ctx = init_distributed(plan.layout, timeout_s=60)
        after_mesh = set(_world.pg_group_ranks)
        engine = Engine(plan, ctx)
        data = TokenData(tokens, SEQ_LEN, plan.layout, ctx.dp_rank, causal=plan.model.causal)
        engine.train_step(*data.batch(0))
        new = mine(set(_world.pg_group_ranks) - before)
        default = mine([dist.group.WORLD])  # the default group, made before the first plan
        out.append({"pp_rank": ctx.pp_rank, "groups": len(new | default),
                    "engine_groups": len(new - after_mesh),
                    "dp_is_world": ctx.group("dp") is dist.group.WORLD})
    return out


@pytest.fixture(scope="module")
def census() -> dict:
    plans = {name: make_plan(layout, spec) for name, (spec, layout) in WORLD_4.items()}
    ranks = run_world(4, _groups_of_rank, list(plans.values()), corpus_tokens())
    return {name: [r[i] for r in ranks] for i, name in enumerate(plans)}


def _planned(plan, pp_rank: int) -> tuple:
    named = with_rank(plan_fields(plan), pp_rank)
    return process_groups(named["spec"], dp=plan.layout.dp, tp=plan.layout.tp,
                          pp=plan.layout.pp, virtual_stages=plan.layout.virtual_stages,
                          schedule=plan.layout.schedule, holds_embedding=named["holds_embedding"],
                          holds_head=named["holds_head"], dp_shard=plan.layout.dp_shard)


@pytest.mark.parametrize("name", list(WORLD_4))
def test_the_planner_counts_the_process_groups_the_runtime_creates(census, name):
    spec, layout = WORLD_4[name]
    plan = make_plan(layout, spec)
    for rank in census[name]:
        names = _planned(plan, rank["pp_rank"])
        assert rank["groups"] == len(names), (name, rank, names)
        assert rank["engine_groups"] == (1 if "tied" in names else 0), (name, rank, names)


def test_an_axis_spanning_the_world_is_the_default_group(census):
    assert all(r["dp_is_world"] for r in census["dp4"])
    assert not any(r["dp_is_world"] for r in census["dp2-tp2"])
    assert _planned(make_plan(*reversed(WORLD_4["dp4"])), 0) == ("world",)


def test_the_tied_pair_group_is_on_the_ends_only_when_they_are_apart():
    plan = make_plan(WORLD_4["dp2-pp2-tied"][1], TIED)
    assert _planned(plan, 0) == ("world", "dp", "pp", "tied")
    assert _planned(plan, 1) == ("world", "dp", "pp", "tied")
    zbv = make_plan(WORLD_4["pp2-tp2-zbv-tied"][1], TIED)
    assert "tied" not in _planned(zbv, 0) and "tied" not in _planned(zbv, 1)


def test_pipeline_peers_follow_the_chunk_placement():
    peers = [pipeline_peers(pp=4, virtual_stages=1, schedule="1f1b", rank=r) for r in range(4)]
    assert peers == [1, 2, 2, 1]
    looped = [pipeline_peers(pp=4, virtual_stages=2, schedule="interleaved_1f1b", rank=r)
              for r in range(4)]
    assert looped == [2, 2, 2, 2]  # chunk 3 on rank 3 feeds chunk 4 on rank 0
    v_shape = [pipeline_peers(pp=4, virtual_stages=2, schedule="zbv", rank=r) for r in range(4)]
    assert v_shape == [1, 2, 2, 1]
    assert pipeline_peers(pp=1, virtual_stages=1, schedule="1f1b", rank=0) == 0


def _h100_plan(layout):
    plan = make_plan(layout)
    cluster = dataclasses.replace(plan.cluster, profile=load_profile("h100-80g"))
    return dataclasses.replace(plan, cluster=cluster)


def test_nccl_buffers_grow_with_the_communicators_and_peers():
    gpu = load_profile("h100-80g").gpu
    per_group, per_peer = gpu.comm_buffer_bytes_per_group, gpu.comm_buffer_bytes_per_peer
    one = rank_memory(_h100_plan(L(dp=1, micro_batch=2, num_microbatches=1)), 0)
    dp = rank_memory(_h100_plan(L(dp=4, micro_batch=2, num_microbatches=1)), 0)
    dp_tp = rank_memory(_h100_plan(L(dp=2, tp=2, micro_batch=2, num_microbatches=1)), 0)
    pp = rank_memory(_h100_plan(L(pp=4, micro_batch=1, num_microbatches=4)), 1)
    assert one.nccl_buffers_bytes == 0 and one.num_communicators == 0
    assert dp.num_communicators == 1 and dp.nccl_buffers_bytes == per_group
    assert dp_tp.num_communicators == 3 and dp_tp.nccl_buffers_bytes == 3 * per_group
    # a middle stage: the world group's rings, two peers over two communicators each
    assert (pp.num_communicators, pp.num_pipeline_peers) == (1, 2)
    assert pp.nccl_buffers_bytes == per_group + 2 * 2 * per_peer


@pytest.mark.parametrize("layout", [L(dp=4, micro_batch=2, num_microbatches=1),
                                    L(dp=2, tp=2, zero_stage=3, micro_batch=2,
                                      num_microbatches=1),
                                    L(pp=4, micro_batch=1, num_microbatches=4)])
def test_the_itemised_memory_sums_to_the_total(layout):
    for profile in ("h100-80g", "cpu"):
        plan = make_plan(layout)
        plan = dataclasses.replace(plan, cluster=dataclasses.replace(
            plan.cluster, profile=load_profile(profile)))
        mem = rank_memory(plan, layout.pp - 1)
        d = mem.to_dict()
        items = ("weights_bytes", "gradients_bytes", "optimizer_bytes", "activations_bytes",
                 "gathered_params_bytes", "comm_buffers_bytes", "context_bytes",
                 "workspace_bytes", "nccl_buffers_bytes", "allocator_reserve_bytes")
        assert sum(d[k] for k in items) == pytest.approx(d["total_bytes"], rel=1e-12)
        gpu = plan.cluster.profile.gpu
        transient = mem.activations_bytes + mem.gathered_params_bytes + mem.comm_buffers_bytes
        assert mem.allocator_reserve_bytes == pytest.approx(gpu.allocator_fragmentation
                                                            * transient)
        assert mem.workspace_bytes == 2 * gpu.blas_workspace_bytes
        assert mem.context_bytes == gpu.context_bytes


def test_the_cpu_context_is_the_resident_set_before_tensors():
    import torch

    from runtime import memprofile
    before = memprofile.resident_bytes()
    block = torch.ones(64 * 2**20 // 4)  # 64 MiB, written: resident
    assert memprofile.resident_bytes() - before >= 60 * 2**20
    del block
    assert memprofile.measure_outside_tensors(torch.device("cpu"), before) == {
        "context_bytes": before}


@pytest.mark.gpu
def test_the_gpu_outside_tensor_items_are_measured_plausibly():
    """Where CUDA exists: the items `planner profile` measures are within an order of magnitude
    of the shipped profiles' cited figures."""
    import torch
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    from runtime import memprofile
    device = torch.device("cuda", 0)
    got = memprofile.measure_outside_tensors(device, 0)
    assert 100 * 2**20 < got["context_bytes"] < 4 * 2**30
    assert 2**20 <= got["blas_workspace_bytes"] <= 256 * 2**20
    assert 0.0 <= got["allocator_fragmentation"] < 1.0
