"""Context parallelism in the planner: the layout fields and mesh order, the rules and their
messages, the cost model's per-rank scaling and collectives, the search and the exports."""

import dataclasses
import json

import pytest

from planner.cli import main
from planner.cost.compute import layer_times
from planner.cost.context import cp_collectives, cp_exposed, local_job
from planner.cost.estimate import estimate
from planner.cost.fields import call, plan_fields
from planner.cost.memory import activation_pieces, model_states
from planner.export import deepspeed_config, megatron_args
from planner.hardware import load_cluster
from planner.job import Job
from planner.plan import AXES, Layout, Plan, layout_errors
from planner.presets import load_model
from planner.search.ranking import SearchOptions, search
from planner.search.space import CP_MIN_LOCAL_TOKENS, enumerate_space
from planner.topology import axis_groups

MODEL = load_model("llama3-8b")
CLUSTER = load_cluster("h100-80g", 2)


def _job(seq=65536, engine="megatron", batch=16):
    return Job(global_batch=batch, seq_len=seq, engine=engine)


def _plan(engine="megatron", seq=65536, **kw):
    base = dict(tp=4, cp=4, micro_batch=1, num_microbatches=16)
    return Plan(model=MODEL, cluster=CLUSTER, job=_job(seq, engine),
                layout=Layout(**{**base, **kw}))


# --- layout -----------------------------------------------------------------------------------

def test_layout_defaults_world_and_mesh_order():
    lay = Layout(dp=2, tp=4, pp=2, cp=2)
    assert (Layout().cp, Layout().cp_comm) == (1, "allgather")
    assert lay.world_size == 32 and lay.mesh_order == AXES == ("pp", "dp", "cp", "tp")
    # a three-axis order (plans before cp) gets cp right after dp
    assert Layout(mesh_order=("tp", "dp", "pp")).mesh_order == ("tp", "dp", "cp", "pp")
    with pytest.raises(ValueError, match="cp_comm must be one of"):
        Layout(cp=2, cp_comm="tree")
    with pytest.raises(ValueError, match="mesh_order must be a permutation"):
        Layout(mesh_order=("pp", "dp", "cp"))


def test_older_plan_without_cp_loads_with_defaults():
    plan = _plan(cp=1, tp=8, num_microbatches=8, dp=2)
    data = plan.to_dict()
    for key in ("cp", "cp_comm", "ep", "etp"):
        del data["layout"][key]
    data["layout"]["mesh_order"] = ["pp", "dp", "tp"]
    data["schema_version"] = 3
    for key in ("attention_head_dim", "moe", "mla"):
        data["model"].pop(key, None)
    loaded = Plan.from_dict(data)
    assert loaded.layout.cp == 1 and loaded.layout.mesh_order == AXES
    assert Plan.from_dict(json.loads(json.dumps(plan.to_dict()))) == plan


def test_cp_groups_are_neighbours_inside_dp():
    sizes = {"pp": 1, "dp": 2, "cp": 4, "tp": 2}
    assert axis_groups(AXES, sizes, "cp").tolist()[0] == [0, 2, 4, 6]
    assert axis_groups(AXES, sizes, "dp_cp").tolist()[0] == [0, 2, 4, 6, 8, 10, 12, 14]


# --- rules --------------------------------------------------------------------------------------

@pytest.mark.parametrize("kw,engine,seq,message", [
    (dict(cp=3, tp=4, num_microbatches=16), "megatron", 65536,
     "dp*tp*pp*cp = 1*4*1*3 = 12 does not equal the cluster's 16 GPUs"),
    (dict(cp=4), "megatron", 65540, "cp=4: seq len 65540 must divide into 2*cp = 8 equal chunks"),
    (dict(cp=1, tp=8, dp=2, num_microbatches=8, cp_comm="ring"), "megatron", 65536,
     "cp_comm ring is only meaningful with cp > 1 (cp = 1)"),
    (dict(cp_comm="a2a", cp=4, tp=4), "megatron", 65536,
     "cp_comm a2a splits heads over tp*cp = 16, which must divide num_heads 32 and "
     "num_kv_heads 8"),
    (dict(cp_comm="ring"), "torch", 65536,
     "cp_comm ring: the torch engine runs allgather only"),
    (dict(), "deepspeed", 65536, "cp=4: the deepspeed engine runs no context parallelism: "
     "DeepSpeed's sequence parallelism (Ulysses"),
    (dict(tp=2, cp=2, dp=4, num_microbatches=4, zero_stage=2, dp_shard=2), "torch", 65536,
     "cp=2 with dp_shard=2 < dp=4: ZeRO shards over dp x cp"),
])
def test_rules_name_the_numbers(kw, engine, seq, message):
    lay = Layout(**{**dict(tp=4, cp=4, micro_batch=1, num_microbatches=16), **kw})
    errors = layout_errors(MODEL, CLUSTER, _job(seq, engine), lay)
    assert errors and errors[0].startswith(message), errors


def test_zero_shards_over_dp_times_cp():
    lay = Layout(tp=4, cp=4, zero_stage=1, micro_batch=1, num_microbatches=16)
    assert not layout_errors(MODEL, CLUSTER, _job(), lay)


def test_cli_refusal_is_one_line(capsys):
    rc = main(["estimate", "--model", "llama3-8b", "--cluster", "h100-80g", "--nodes", "2",
               "--global-batch", "16", "--seq-len", "1004", "--tp", "4", "--cp", "4"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and "\n" not in err and "seq len 1004 must divide into 2*cp = 8" in err
    assert "--cp 4" in err


# --- cost model ---------------------------------------------------------------------------------

def test_attention_work_per_rank_is_one_cp_th_and_per_token_work_local():
    gpu, job = CLUSTER.profile.gpu, _job()
    shape = dict(tp=4, sequence_parallel=False, micro_batch=1)
    whole = layer_times(gpu, MODEL, job, **shape)
    for cp in (2, 4, 8):
        part = layer_times(gpu, MODEL, job, **shape, cp=cp)
        overhead = gpu.kernel_overhead_s
        # load-balanced causal chunks: every rank runs 1/cp of the causal score work
        assert part.attention_fwd_s - overhead == pytest.approx(
            (whole.attention_fwd_s - overhead) / cp, rel=1e-12)
        local = layer_times(gpu, MODEL, local_job(job, cp), **shape)
        assert part.gemm_fwd_s == local.gemm_fwd_s  # GEMMs see s/cp tokens


def test_activations_per_rank_local_plus_gathered_kv():
    job, shape = _job(), dict(tp=4, sequence_parallel=True, micro_batch=1, recompute="none")
    local = activation_pieces(MODEL, local_job(job, 4), **shape)
    ring = activation_pieces(MODEL, job, **shape, cp=4, cp_comm="ring")
    gather = activation_pieces(MODEL, job, **shape, cp=4, cp_comm="allgather")
    assert ring == local
    kv_local = 2 * 2 * 1 * (65536 // 4) * MODEL.kv_hidden_size / 4
    assert gather[0] - local[0] == pytest.approx(3 * kv_local)  # the other 3 ranks' K/V


def test_model_states_shard_over_dp_times_cp():
    kw = dict(tp=4, pp=1, zero_stage=3, rank_layers=32, holds_embedding=True,
              holds_head=True, tied_copy=False)
    job = _job(engine="torch")
    assert model_states(MODEL, job, dp=2, cp=2, **kw) == model_states(MODEL, job, dp=4, **kw)


def test_collectives_of_each_flavour():
    named = plan_fields(_plan(cp_comm="allgather"))
    fwd, bwd = call(cp_collectives, named)
    kv_gathered = 2 * 2 * 65536 * MODEL.kv_hidden_size / 4  # bf16 K and V of the whole sequence
    assert [(c.kind, c.count, c.bytes_each) for c in fwd + bwd] == [
        ("all_gather", 1, kv_gathered), ("reduce_scatter", 1, kv_gathered)]
    fwd, bwd = call(cp_collectives, {**named, "cp_comm": "ring"})
    assert [(c.kind, c.count, c.bytes_each) for c in fwd + bwd] == [
        ("p2p", 3, kv_gathered / 4), ("p2p", 3, 2 * kv_gathered / 4)]
    plan = Plan(model=MODEL, cluster=CLUSTER, job=_job(),
                layout=Layout(dp=2, tp=2, cp=4, micro_batch=1, num_microbatches=8,
                              cp_comm="a2a"))
    fwd, bwd = call(cp_collectives, plan_fields(plan))
    assert sum(c.count for c in fwd) == sum(c.count for c in bwd) == 4  # Ulysses: q, k, v, out
    assert {c.kind for c in fwd + bwd} == {"all_to_all"}


def test_ring_exposes_only_what_attention_does_not_hide():
    fwd, bwd = call(cp_collectives, {**plan_fields(_plan()), "cp_comm": "ring"})
    send_f, send_b = fwd[0].time_s, bwd[0].time_s
    assert cp_exposed("ring", 4, fwd, bwd, 1e3, 1e3) == 0.0  # long attention hides it all
    assert cp_exposed("ring", 4, fwd, bwd, 0.0, 0.0) == pytest.approx(send_f + send_b)
    assert cp_exposed("allgather", 4, fwd, bwd, 1e3, 1e3) == send_f + send_b


def test_estimate_counts_cp_traffic_and_time():
    est = estimate(_plan())
    cp = [c for c in est.communication if c.axis == "cp"]
    assert [c.count for c in cp] == [32 * 16, 32 * 16]  # layers x micro-batches
    assert est.time.cp_comm_s == pytest.approx(sum(c.time_s for c in cp))
    assert est.time.step_s == pytest.approx(est.step_s)


# --- search and exports -------------------------------------------------------------------------

def test_short_sequences_enumerate_no_cp():
    cols, _ = enumerate_space(MODEL, _job(seq=2 * CP_MIN_LOCAL_TOKENS - 2), 16, 8)
    assert set(cols["cp"].tolist()) == {1}
    cols, _ = enumerate_space(MODEL, _job(seq=65536), 16, 8)
    assert set(cols["cp"].tolist()) == {1, 2, 4, 8, 16}
    assert set(cols["cp_comm"][cols["cp"] > 1].tolist()) == {0, 1, 2}


def test_suggest_splits_a_long_sequence_and_picks_the_faster_flavour():
    res = search(MODEL, CLUSTER, _job(), SearchOptions(top=20))
    best = res.ranked[0]
    assert best.layout.cp > 1
    for flavour in ("allgather", "ring", "a2a"):
        lay = dataclasses.replace(best.layout, cp_comm=flavour)
        plan = dataclasses.replace(best.plan, layout=lay)
        if not layout_errors(plan.model, plan.cluster, plan.job, lay):
            assert estimate(plan).tokens_per_s <= best.tokens_per_s * (1 + 1e-12)


def test_exports():
    args = megatron_args(_plan(cp_comm="ring"))
    i = args.index("--context-parallel-size")
    assert args[i:i + 4] == ["--context-parallel-size", "4", "--cp-comm-type", "p2p"]
    assert "--context-parallel-size" not in megatron_args(_plan(cp=1, tp=8, dp=2,
                                                                num_microbatches=8))
    plan = _plan(engine="megatron")
    with pytest.raises(ValueError, match="DeepSpeed cannot express this plan: context "
                                         "parallelism cp=4"):
        deepspeed_config(plan)


@pytest.mark.parametrize("flavour", ["allgather", "ring"])
def test_simulator_schedules_cp_traffic_as_the_estimate_does(flavour):
    from planner.sim.costs import plan_costs
    from planner.sim.timeline import simulate_costs
    plan = _plan(cp_comm=flavour)
    est, sim = estimate(plan), simulate_costs(plan_costs(plan))
    fwd, bwd = call(cp_collectives, plan_fields(plan))
    per_step = 32 * 16 * sum(c.time_s for c in fwd + bwd)
    assert sim.comm["cp"].total_s == pytest.approx(per_step, rel=1e-9)
    assert sim.comm["cp"].exposed_s == pytest.approx(est.time.cp_comm_s, rel=1e-9, abs=1e-12)
    assert sim.step_s == pytest.approx(est.step_s, rel=1e-9)  # pp = 1: no bubble to model
