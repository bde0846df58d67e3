"""Recompute policies (none, selective, op, full) and recompute_every K: the runtime saves exactly
the bytes the planner predicts, block by block and for a pipeline rank's blocks; the rules,
the search, the simulator and the exports follow the same policy.  Multi-rank parity of the
policies is in tests/test_runtime_parity.py."""

import dataclasses
import json

import pytest
import torch
from runtime_dist import SPEC, make_plan

from planner import export
from planner.cost import activations as act
from planner.cost.estimate import estimate
from planner.cost.fields import plan_fields, recomputed_layers_of, with_rank
from planner.cost.memory import rank_memory
from planner.cost.pipeline import rank_recomputed_layers, recomputed
from planner.engines import RECOMPUTE
from planner.hardware import load_cluster
from planner.job import Job
from planner.plan import Layout, Plan, layout_errors
from planner.presets import load_model
from planner.search.ranking import SearchOptions, search
from planner.search.space import recompute_options
from planner.sim.costs import plan_costs
from runtime import measure
from runtime.model import Transformer, materialize, set_recompute

GPT_BIAS = dataclasses.replace(SPEC, name="test-gpt", arch="gpt", num_kv_heads=8,
                               tie_embeddings=True, linear_bias=True)
GPT = dataclasses.replace(GPT_BIAS, linear_bias=False)
BERT = dataclasses.replace(GPT_BIAS, name="test-bert", arch="bert")
SPECS = {"llama": SPEC, "gpt-bias": GPT_BIAS, "gpt": GPT, "bert": BERT}
MICRO, SEQ = 2, 32


def _saved_bytes(spec, layer_ids, mode, every=1, dtype=torch.float32) -> tuple:
    """(bytes the runtime saves for backward, bytes still held after it) for one micro-batch
    through a chunk of blocks, measured with the runtime's ActivationCounter."""
    with torch.device("meta"):
        chunk = Transformer(spec, layer_ids=layer_ids, has_embed=False, has_head=False)
    materialize(chunk, "cpu")
    set_recompute(chunk, mode, every)
    if dtype != torch.float32:
        chunk.autocast_dtype = dtype
    x = torch.randn(MICRO, SEQ, spec.hidden_size, dtype=dtype, requires_grad=True)
    counter = measure.ActivationCounter([chunk])
    with counter.hooks():
        chunk(x).float().sum().backward()
    return counter.total_bytes, counter.live_bytes


def _predicted(spec, mode, precision="fp32") -> float:
    job = Job(global_batch=MICRO, seq_len=SEQ, precision=precision)
    return act.layer_bytes(spec, job, tp=1, sequence_parallel=False, micro_batch=MICRO,
                           recompute=mode)


@pytest.mark.parametrize("family", SPECS)
@pytest.mark.parametrize("mode", RECOMPUTE)
def test_block_saves_exactly_the_predicted_bytes(family, mode):
    spec = SPECS[family]
    got, left = _saved_bytes(spec, [0], mode)
    assert got == _predicted(spec, mode)
    assert left == 0  # the op policy's cache is released with the block's backward


def test_op_policy_in_bf16_autocast():
    got, _ = _saved_bytes(SPEC, [0], "op", dtype=torch.bfloat16)
    assert got == _predicted(SPEC, "op", "bf16")


def test_op_policy_saves_between_full_and_none():
    none, op, full = (_predicted(SPEC, m) for m in ("none", "op", "full"))
    assert full < op < none
    # without biases every other GEMM output is kept; GPT-2's addmm (bias) is not in the list
    assert _predicted(GPT_BIAS, "op") < _predicted(GPT, "op")


def test_recompute_every_applies_to_blocks_k_minus_1_2k_minus_1():
    assert [i for i in range(8) if recomputed(i, 2)] == [1, 3, 5, 7]
    assert [i for i in range(8) if recomputed(i, 4)] == [3, 7]
    with torch.device("meta"):
        model = Transformer(SPEC)
    set_recompute(model, "op", 4)
    assert [int(k) for k, b in model.layers.items() if b.recompute_op] == [3, 7]


@pytest.mark.parametrize("mode", ("selective", "op", "full"))
def test_recompute_every_2_chunk_bytes(mode):
    """Layers 3..7 of a pipeline chunk: blocks 3, 5, 7 run the policy, 4 and 6 none."""
    got, _ = _saved_bytes(SPEC, range(3, 8), mode, every=2)
    assert got == 3 * _predicted(SPEC, mode) + 2 * _predicted(SPEC, "none")


def test_pipeline_rank_counts_its_own_recomputed_blocks():
    """pp=2 split 3 + 5: rank 0 holds blocks 0-2 (block 1 recomputed), rank 1 blocks 3-7 (3, 5,
    7); the rank's one-micro-batch activations are those blocks' bytes."""
    lay = Layout(pp=2, micro_batch=2, num_microbatches=4, layers_per_stage=(3, 5),
                 recompute="op", recompute_every=2)
    assert [rank_recomputed_layers(8, pp=2, virtual_stages=1, schedule="1f1b", rank=r,
                                   every=2, layers_per_stage=(3, 5)) for r in (0, 1)] == [1, 3]
    plan = make_plan(lay)
    named = plan_fields(plan)
    assert [recomputed_layers_of(**{k: v for k, v in with_rank(named, r).items() if k in (
        "spec", "pp", "virtual_stages", "schedule", "rank", "recompute", "recompute_every",
        "layers_per_stage")}) for r in (0, 1)] == [1, 3]
    job = plan.job
    shape = dict(tp=1, sequence_parallel=False, micro_batch=2)
    op, none = (act.layer_bytes(SPEC, job, **shape, recompute=m) for m in ("op", "none"))
    emb = act.embedding_bytes(SPEC, job, **shape)
    head = act.head_bytes(SPEC, job, **shape)
    mems = [rank_memory(plan, r).activation_bytes_per_microbatch for r in (0, 1)]
    assert mems[0] == pytest.approx(op + 2 * none + emb, rel=1e-12)
    assert mems[1] == pytest.approx(3 * op + 2 * none + head, rel=1e-12)


def _h100_plan(**layout) -> Plan:
    model = load_model("llama3-8b")
    base = dict(dp=8, zero_stage=3, micro_batch=2, num_microbatches=4)
    base.update(layout)
    return Plan(model=model, cluster=load_cluster("h100-80g", 1),
                job=Job(global_batch=64, seq_len=4096, precision="bf16"), layout=Layout(**base))


def test_every_k_scales_recompute_time_and_memory():
    full = estimate(_h100_plan(recompute="full"))
    half = estimate(_h100_plan(recompute="full", recompute_every=2))
    none = estimate(_h100_plan())
    assert half.time.recompute_s == pytest.approx(full.time.recompute_s / 2, rel=1e-9)
    act_of = lambda e: e.memory.activations_bytes  # noqa: E731
    assert act_of(half) == pytest.approx((act_of(full) + act_of(none)) / 2, rel=1e-9)
    op = estimate(_h100_plan(recompute="op"))
    assert 0 < op.time.recompute_s < full.time.recompute_s
    assert act_of(full) < act_of(op) < act_of(none)
    assert op.hardware_flops_per_step > none.hardware_flops_per_step


def test_op_policy_reruns_tp_gathers_not_reduce_scatters():
    """Under TP+SP the op policy saves the reduce-scatters and re-runs the two all-gathers; full
    recompute re-runs those and the first reduce-scatter (PyTorch's checkpoint stops before the
    last one), all four of one size: op adds 2/3 of what full adds."""
    kw = dict(dp=1, tp=8, zero_stage=0, sequence_parallel=True, micro_batch=1,
              num_microbatches=64)
    base, op, full = (estimate(_h100_plan(**kw, recompute=r)).time.tp_comm_s
                      for r in ("none", "op", "full"))
    assert op - base == pytest.approx((full - base) * 2 / 3, rel=1e-9)


def test_simulator_uses_the_estimates_recompute_time():
    plan = make_plan(Layout(pp=2, micro_batch=2, num_microbatches=4, layers_per_stage=(3, 5),
                            recompute="op", recompute_every=2))
    costs = plan_costs(plan)
    # every block recomputed, 4 per rank: the step's recompute is 4 micro-batches x 4 blocks
    per_layer = estimate(dataclasses.replace(plan, layout=dataclasses.replace(
        plan.layout, recompute_every=1, layers_per_stage=(4, 4)))).time.recompute_s / (4 * 4)
    assert costs.chunk_recompute_s == pytest.approx((1 * per_layer, 3 * per_layer), rel=1e-9)


def test_rules_refuse_every_without_policy_and_op_on_megatron():
    model, cluster = load_model("llama2-7b"), load_cluster("a100-80g", 1)
    job = Job(global_batch=64, seq_len=4096, precision="bf16")
    lay = dict(dp=8, micro_batch=2, num_microbatches=4)
    assert layout_errors(model, cluster, job, Layout(**lay, recompute_every=2)) == [
        "recompute_every 2 picks the blocks a recompute policy runs on; recompute is none"]
    assert layout_errors(model, cluster, job, Layout(**lay, recompute="op",
                                                     recompute_every=64)) == [
        "recompute_every 64 exceeds the model's 32 layers: no block would recompute"]
    mega = dataclasses.replace(job, engine="megatron")
    assert layout_errors(model, cluster, mega, Layout(**lay, recompute="op")) == [
        "recompute op is not a megatron engine policy (it runs none, selective, full)"]
    assert layout_errors(model, cluster, mega, Layout(**lay, recompute="full",
                                                      recompute_every=2)) == [
        "recompute_every 2 (every K-th block) is not expressible in the megatron engine; use 1"]


def test_search_space_includes_op_and_every_k_unless_fixed():
    model = load_model("llama2-7b")
    pairs = {(RECOMPUTE[r], k) for r, k in recompute_options(model, "torch")}
    assert pairs == {("none", 1)} | {(p, k) for p in ("selective", "op", "full")
                                     for k in (1, 2, 4)}
    assert {RECOMPUTE[r] for r, _ in recompute_options(model, "megatron")} == {
        "none", "selective", "full"}
    assert {k for _, k in recompute_options(model, "megatron")} == {1}
    assert recompute_options(model, "torch", "op", None) == [(RECOMPUTE.index("op"), k)
                                                             for k in (1, 2, 4)]
    assert recompute_options(model, "torch", "full", 2) == [(RECOMPUTE.index("full"), 2)]


def test_suggest_keeps_a_fixed_policy():
    model, cluster = load_model("llama3-8b"), load_cluster("h100-80g", 1)
    job = Job(global_batch=64, seq_len=4096, precision="bf16")
    result = search(model, cluster, job, SearchOptions(top=50))
    assert {c.layout.recompute for c in result.ranked} >= {"op"}
    assert any(c.layout.recompute_every > 1 for c in result.ranked)
    fixed = search(model, cluster, job, SearchOptions(top=50, recompute="op", recompute_every=2))
    assert {(c.layout.recompute, c.layout.recompute_every) for c in fixed.ranked} == {("op", 2)}


def test_megatron_export_refuses_op_and_every_k():
    plan = _h100_plan(recompute="op")
    with pytest.raises(ValueError, match="^Megatron-LM cannot express this plan: recompute op"):
        export.megatron_args(plan)
    with pytest.raises(ValueError, match="recompute_every 2"):
        export.megatron_args(_h100_plan(recompute="full", recompute_every=2))
    assert "--recompute-granularity" in export.megatron_args(_h100_plan(recompute="full"))


def test_deepspeed_export_notes_op_and_every_k():
    note = export.deepspeed_config(_h100_plan(recompute="op", recompute_every=2))["comment"]
    assert "op-level recompute is not a DeepSpeed config key" in note
    assert "blocks 1, 3, ... only" in note


_CLI = ["--model", "llama3-8b", "--cluster", "h100-80g", "--global-batch", "64",
        "--seq-len", "4096"]


def test_cli_flags(capsys):
    from planner.cli import main
    assert main(["estimate", *_CLI, "--dp", "8", "--zero", "3", "--micro-batch", "2",
                 "--recompute", "op", "--recompute-every", "2", "--json"]) == 0
    out = capsys.readouterr().out
    assert '"recompute": "op"' in out and '"recompute_every": 2' in out
    assert main(["estimate", *_CLI, "--dp", "8", "--micro-batch", "2",
                 "--recompute-every", "2"]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "recompute_every 2" in err and "--recompute none" in err
    assert main(["suggest", *_CLI, "--recompute", "op", "--recompute-every", "4",
                 "--top", "3", "--json"]) == 0
    ranked = json.loads(capsys.readouterr().out)
    assert {(e["plan"]["layout"]["recompute"], e["plan"]["layout"]["recompute_every"])
            for e in ranked} == {("op", 4)}
