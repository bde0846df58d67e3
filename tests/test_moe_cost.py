"""MoE cost model (planner/cost/moe.py): expert states over ep and expert-dp, active-parameter
FLOPs, the all-to-all's bytes and links, the routing imbalance, and the simulator's events."""

import dataclasses

import pytest

from planner.cost.estimate import estimate
from planner.cost.flops import attention_core_flops, model_flops_per_step
from planner.cost.moe import a2a_bytes, moe_layer_numels
from planner.cost.params import block_tensors, count_active_parameters, dense_view
from planner.hardware import load_cluster
from planner.job import Job
from planner.plan import Layout, Plan
from planner.presets import MODEL_PRESETS
from planner.sim.costs import plan_costs

MIXTRAL = MODEL_PRESETS["mixtral-8x7b"]
EXPERTS = 32 * 3 * 8 * 14336 * 4096   # Mixtral's routed-expert parameters


def _estimate(model=MIXTRAL, nodes=1, gb=64, imbalance=1.25, **layout):
    job = Job(global_batch=gb, seq_len=4096, engine="megatron", moe_imbalance=imbalance)
    layout.setdefault("num_microbatches", gb // (layout.get("dp", 1) * layout.get(
        "micro_batch", 1)))
    plan = Plan(model=model, cluster=load_cluster("h100-80g", nodes), job=job,
                layout=Layout(**layout))
    return estimate(plan)


def test_expert_weights_split_over_ep():
    """bf16 weights: the non-expert part whole, the experts 1/ep (Megatron-Core)."""
    w8 = _estimate(dp=8, ep=8, zero_stage=1).memory.weights_bytes
    w4 = _estimate(dp=8, ep=4, zero_stage=1).memory.weights_bytes
    assert w4 - w8 == 2 * (EXPERTS / 4 - EXPERTS / 8)
    other = sum(t.numel for t in block_tensors(MIXTRAL, 0) if not t.expert) * 32 + \
        2 * 32000 * 4096 + 4096
    assert w8 == 2 * (other + EXPERTS / 8)


def test_expert_optimizer_shards_over_expert_dp():
    """ZeRO-1 (distributed optimizer): 12 bytes per parameter over dp for the dense part and
    over expert-dp = tp x dp / (ep x etp) for the experts."""
    one = _estimate(nodes=8, gb=256, dp=64, ep=8, zero_stage=1).memory.optimizer_bytes
    other = sum(t.numel for t in block_tensors(MIXTRAL, 0) if not t.expert) * 32 + \
        2 * 32000 * 4096 + 4096
    assert one == pytest.approx(12 * (other / 64 + EXPERTS / 8 / 8), rel=1e-12)


def test_model_flops_count_active_parameters():
    """6 x tokens x active matmul weights (the input embedding is a lookup) + attention: MFU is
    on active FLOPs (Kaplan et al. 2020, Sec. 2.1)."""
    spec, tokens = MIXTRAL, 8 * 4096
    mats = sum(t.numel for t in block_tensors(spec, 0) if len(t.shape) >= 2 and not t.expert)
    mats += sum(t.numel for t in block_tensors(spec, 0) if t.expert) * 2 // 8
    active = 32 * mats + 32000 * 4096  # + the output layer
    attention = 3 * 32 * attention_core_flops(spec, 8, 4096, 1)
    assert model_flops_per_step(spec, 8, 4096) == pytest.approx(6 * tokens * active + attention,
                                                                 rel=1e-12)
    dense = model_flops_per_step(dense_view(spec), 8, 4096)
    assert model_flops_per_step(spec, 8, 4096) > dense  # two 14336 experts > one dense MLP
    assert count_active_parameters(spec) < 13e9


def test_all_to_all_bytes_and_count():
    est = _estimate(dp=8, ep=8, zero_stage=1, micro_batch=2)
    a2a = next(c for c in est.communication if c.name == "ep_all_to_all")
    assert a2a.bytes_each == 1.25 * 2 * 4096 * 2 * 4096 * 2  # f T k h bytes
    assert a2a.count == 4 * 32 * 4  # dispatch + combine, fwd + bwd, per layer and micro-batch
    assert a2a.tier == "intra" and a2a.group_size == 8
    assert est.time.ep_comm_s == pytest.approx(a2a.time_s)


def test_all_to_all_crosses_nodes_when_ep_does():
    """ep = 8 inside a node runs on NVLink; ep over 2 nodes pays the NIC for half the bytes."""
    intra = _estimate(nodes=2, gb=128, dp=16, ep=8, zero_stage=1)
    wide = _estimate(nodes=2, gb=128, dp=16, ep=8, zero_stage=1, mesh_order=("pp", "tp", "dp"))
    split = _estimate(nodes=2, gb=128, tp=1, dp=16, ep=4, zero_stage=1)
    assert intra.time.ep_comm_s > 0
    inter = _estimate(model=dataclasses.replace(MIXTRAL, moe=dataclasses.replace(
        MIXTRAL.moe, num_experts=16)), nodes=2, gb=128, dp=16, ep=16, zero_stage=1)
    a2a = next(c for c in inter.communication if c.name == "ep_all_to_all")
    assert a2a.tier == "inter"
    per_byte = inter.time.ep_comm_s / a2a.bytes_each
    assert per_byte > 2 * intra.time.ep_comm_s / next(
        c.bytes_each for c in intra.communication if c.name == "ep_all_to_all")
    assert wide.time.ep_comm_s == intra.time.ep_comm_s  # tp = 1: the same ranks
    assert split.time.ep_comm_s < intra.time.ep_comm_s  # a smaller group sends less off-rank


def test_imbalance_scales_bytes_compute_and_activations():
    lo, hi = (_estimate(dp=8, ep=8, zero_stage=1, imbalance=f) for f in (1.0, 2.0))
    assert 1.5 * lo.time.ep_comm_s < hi.time.ep_comm_s < 2 * lo.time.ep_comm_s  # + latency
    assert hi.time.compute_s > lo.time.compute_s
    assert hi.memory.activations_bytes > lo.memory.activations_bytes
    assert a2a_bytes(MIXTRAL, hi.plan.job, tp=1, sequence_parallel=False, micro_batch=1) == \
        2 * a2a_bytes(MIXTRAL, lo.plan.job, tp=1, sequence_parallel=False, micro_batch=1)


def test_etp_splits_expert_ffn_and_adds_token_gathers():
    base = _estimate(dp=8, ep=4, zero_stage=1)
    etp = _estimate(dp=8, ep=4, etp=2, zero_stage=1)
    assert moe_layer_numels(MIXTRAL, 1, 4, 2)[1] * 2 == moe_layer_numels(MIXTRAL, 1, 4, 1)[1]
    assert etp.memory.weights_bytes < base.memory.weights_bytes
    assert etp.time.ep_comm_s > 0


def test_dense_first_layers_and_mla_estimate():
    """DeepSeek-V3 on 1024 H100: 3 dense layers (on stage 0), MLA, 256 experts over ep."""
    est = _estimate(model=MODEL_PRESETS["deepseek-v3"], nodes=128, gb=1024, dp=16, tp=2,
                    pp=32, ep=8, sequence_parallel=True, zero_stage=1)
    assert est.memory.pp_rank != 0  # the dense first layers make stage 0 lighter
    assert 0.1 < est.mfu < 0.7
    assert est.time.ep_comm_s > 0


def test_simulator_has_the_all_to_all():
    est = _estimate(nodes=2, gb=32, dp=8, pp=2, ep=8, zero_stage=1, num_microbatches=4)
    costs = plan_costs(est.plan)
    # per micro-batch, both stages (the estimate's step: 4 micro-batches of one stage, half the
    # layers): half the all-to-all in the forward, half in the backward
    assert sum(costs.chunk_ep_fwd_s) == pytest.approx(est.time.ep_comm_s / 4)
    assert sum(costs.chunk_ep_bwd_s) == pytest.approx(est.time.ep_comm_s / 4)


def test_moe_imbalance_is_validated():
    with pytest.raises(ValueError, match="moe imbalance must be in"):
        Job(global_batch=8, seq_len=128, moe_imbalance=0.5)


def _cli_error(capsys, argv) -> tuple:
    from planner.cli import main
    code = main(argv)
    return code, capsys.readouterr().err.strip()


MIXTRAL_ARGS = ["estimate", "--model", "mixtral-8x7b", "--cluster", "h100-80g", "--nodes", "2",
                "--global-batch", "32", "--seq-len", "4096", "--engine", "megatron",
                "--dp", "16", "--zero", "1"]


def test_cli_ep_flags(capsys):
    code, err = _cli_error(capsys, MIXTRAL_ARGS + ["--ep", "3"])
    assert code == 2 and "\n" not in err
    assert "ep=3 must divide the 8 routed experts of mixtral-8x7b; from --ep 3" in err
    with pytest.raises(SystemExit) as exc:  # argparse's usage error
        _cli_error(capsys, MIXTRAL_ARGS + ["--moe-imbalance", "0.5"])
    assert exc.value.code == 2
    assert "--moe-imbalance: expected a finite number in [1, 64], got '0.5'" in \
        capsys.readouterr().err
    from planner.cli import main
    assert main(MIXTRAL_ARGS + ["--ep", "8", "--moe-imbalance", "1.5", "--json"]) == 0
    out = capsys.readouterr().out
    import json
    est = json.loads(out)
    assert est["time"]["ep_comm_s"] > 0 and est["plan"]["job"]["moe_imbalance"] == 1.5
    assert any(c["name"] == "ep_all_to_all" for c in est["communication"])
