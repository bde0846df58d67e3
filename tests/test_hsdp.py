"""Hybrid sharding (Layout.dp_shard): the rules, the cost model's groups, bytes and links, the
search over the split and the simulator (the runtime: tests/test_runtime_hsdp.py and the hsdp
cases of tests/test_runtime_parity.py)."""

import dataclasses

import pytest

from planner.cost.comm_plan import dp_collectives
from planner.cost.estimate import estimate
from planner.cost.fields import call, plan_fields, with_rank
from planner.cost.memory import rank_model_state
from planner.hardware import load_cluster
from planner.job import Job
from planner.plan import Layout, Plan, layout_errors
from planner.presets import MODEL_PRESETS
from planner.search.ranking import search
from planner.sim.timeline import simulate

MODEL = MODEL_PRESETS["llama3-8b"]


def _plan(nodes=4, engine="torch", **kw) -> Plan:
    base = dict(dp=8 * nodes, zero_stage=3, micro_batch=1, num_microbatches=2)
    base.update(kw)
    lay = Layout(**base)
    job = Job(global_batch=lay.dp * lay.micro_batch * lay.num_microbatches, seq_len=4096,
              precision="bf16", engine=engine)
    return Plan(model=MODEL, cluster=load_cluster("h100-80g", nodes), job=job, layout=lay)


def _errors(**kw) -> list:
    p = _plan(dp_shard=0)
    lay = dataclasses.replace(p.layout, **kw)
    job = dataclasses.replace(p.job, engine=kw.pop("engine", "torch")) if "engine" in kw else p.job
    return layout_errors(p.model, p.cluster, job, lay)


@pytest.mark.parametrize("change,message", [
    (dict(dp_shard=6), "dp_shard=6 must divide dp=32"),
    (dict(dp_shard=1), "dp_shard=1 shards over one rank"),
    (dict(dp_shard=8, zero_stage=0), "dp_shard=8 picks the ZeRO shard group, but ZeRO-0"),
    (dict(dp_shard=8, zero_stage=1), "dp_shard=8 < dp=32 with ZeRO-1: the torch engine"),
])
def test_rules_name_the_numbers(change, message):
    errors = _errors(**change)
    assert errors and errors[0].startswith(message)


def test_engines_hybrid_shard_only_what_they_run():
    p = _plan(dp_shard=8, zero_stage=1, engine="megatron", num_microbatches=2)
    assert p.layout.hybrid  # Megatron: distributed-optimizer instances
    lay = dataclasses.replace(p.layout, zero_stage=1)
    ds = dataclasses.replace(p.job, engine="deepspeed")
    assert "removed MiCS" in layout_errors(p.model, p.cluster, ds, lay)[0]
    assert Layout(dp=8, dp_shard=8, zero_stage=3).shard_size == 8  # = dp: plain sharding
    with pytest.raises(ValueError, match="dp_shard must be >= 0, got -1"):
        Layout(dp=8, dp_shard=-1)


def test_old_plans_load_with_the_whole_dp_group():
    d = _plan().to_dict()
    d["schema_version"] = 3
    del d["layout"]["dp_shard"], d["layout"]["ep"], d["layout"]["etp"]
    for k in ("attention_head_dim", "moe", "mla"):
        d["model"].pop(k, None)
    assert Plan.from_dict(d).layout.dp_shard == 0
    with pytest.raises(ValueError, match="dp_shard"):
        Plan.from_dict({**_plan().to_dict(), "layout": {k: v for k, v in
                                                         _plan().layout.to_dict().items()
                                                         if k != "dp_shard"}})


def test_states_shard_over_the_group_and_replicate_across():
    flat, hybrid = _plan(), _plan(dp_shard=8)
    a, b = rank_model_state(flat, 0), rank_model_state(hybrid, 0)
    # ZeRO-3 over 32 vs over 8 ranks (fp32 states, FSDP2 dim-0 chunks): 4x, within padding
    for key in ("weights_bytes", "gradients_bytes", "optimizer_bytes"):
        assert getattr(b, key) == pytest.approx(4 * getattr(a, key), rel=1e-3)
    assert rank_model_state(hybrid, 0, dp_rank=9) == rank_model_state(hybrid, 0, dp_rank=1)
    assert rank_model_state(_plan(dp_shard=32), 0) == a


def test_collectives_run_over_the_shard_group_inside_the_node_and_replicas_across():
    flat = {c.name: c for c in call(dp_collectives, with_rank(plan_fields(_plan()), 0))}
    hyb = {c.name: c for c in call(dp_collectives, with_rank(plan_fields(_plan(dp_shard=8)),
                                                                 0))}
    assert (flat["dp_reduce_scatter"].tier, flat["dp_reduce_scatter"].group_size) == ("inter", 32)
    rs, ag, ar = hyb["dp_reduce_scatter"], hyb["dp_param_all_gather"], \
        hyb["dp_replicate_all_reduce"]
    assert (rs.axis, rs.tier, rs.group_size) == ("dp_shard", "intra", 8)
    assert (ag.axis, ag.tier, ag.group_size) == ("dp_shard", "intra", 8)
    assert (ar.axis, ar.tier, ar.group_size) == ("dp_replicate", "inter", 4)
    # the replica all-reduce carries each reduce-scatter's 1/dp_shard output, as often
    assert ar.count == rs.count and ar.bytes_each == pytest.approx(rs.bytes_each / 8)
    assert ag.bytes_each == flat["dp_param_all_gather"].bytes_each
    # a shard group across nodes (dp outermost of tp=8 rows) takes the inter-node tier
    spread = _plan(dp=4, tp=8, dp_shard=2, micro_batch=1, num_microbatches=8)
    link = {c.name: c for c in call(dp_collectives, with_rank(plan_fields(spread), 0))}
    assert link["dp_reduce_scatter"].tier == "inter"


def test_estimate_and_simulator_see_the_replica_all_reduce():
    hybrid = _plan(dp_shard=8)
    est = estimate(hybrid)
    names = {c.name for c in est.communication}
    assert "dp_replicate_all_reduce" in names
    colls = {c.name: c for c in est.communication}
    # the simulator's gradient-sync events carry each reduce-scatter and its replica all-reduce
    grad = simulate(hybrid).comm["dp_grad"].total_s
    assert grad == pytest.approx(colls["dp_reduce_scatter"].time_s
                                 + colls["dp_replicate_all_reduce"].time_s, rel=1e-9)
    assert simulate(_plan()).comm["dp_grad"].total_s == pytest.approx(
        {c.name: c for c in estimate(_plan()).communication}["dp_reduce_scatter"].time_s,
        rel=1e-9)


def test_search_tries_the_split_and_a_fixed_dp_shard_is_the_only_value():
    spec = MODEL_PRESETS["llama3-8b"]
    cluster = load_cluster("h100-80g", 2)
    job = Job(global_batch=64, seq_len=4096, precision="bf16")
    free = search(spec, cluster, job, top=200, max_tp=2)
    shards = {row.layout.dp_shard for row in free.feasible}
    assert 0 in shards and shards - {0}
    fixed = search(spec, cluster, job, top=5, max_tp=2, dp_shard=4)
    assert {row.layout.dp_shard for row in fixed.feasible} == {4}
    assert all(row.layout.zero_stage >= 2 for row in fixed.feasible if row.layout.hybrid)
    assert any(row.layout.hybrid for row in fixed.feasible)
