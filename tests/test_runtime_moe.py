"""The runtime's mixture-of-experts block (runtime/moe.py): routing and expert outputs against a
per-token reference, the auxiliary loss's injected gradient against the loss added explicitly,
and expert parallelism (all-to-all dispatch/combine, alone and with FSDP2 and pipelining) trains
exactly like one process (CPU, gloo, fp32, same seed, dropout 0)."""

import dataclasses
import functools

import pytest
import torch
from runtime_dist import SPEC, Layout, make_plan, train_worlds

from planner.moe_spec import MoESpec
from runtime.model import Transformer, materialize
from runtime.moe import MoE

STEPS = 3
LOSS_TOL = 2e-5    # tests/test_runtime_parity.py
PARAM_TOL = 1e-4   # tests/test_runtime_parity.py

MOE = dataclasses.replace(
    SPEC, name="test-moe", moe=MoESpec(num_experts=4, experts_per_token=2,
                                       expert_ffn_hidden_size=64, shared_ffn_hidden_size=32,
                                       first_dense_layers=1, aux_loss_coef=0.01))
GPT_MOE = dataclasses.replace(
    SPEC, name="test-gpt-moe", arch="gpt", num_kv_heads=8, tie_embeddings=True,
    linear_bias=True, moe=MoESpec(num_experts=8, experts_per_token=2,
                                  expert_ffn_hidden_size=32, moe_layer_every=2,
                                  router="sigmoid", aux_loss_coef=0.01))


def _model(spec, seed=0):
    with torch.device("meta"):
        model = Transformer(spec)
    materialize(model, "cpu", seed)
    return model


def _naive(moe: MoE, x):
    """Per token: its top-k experts' outputs weighted by the renormalised scores."""
    flat = x.reshape(-1, x.shape[-1])
    logits = flat @ moe.router.weight.T
    if moe.router.bias is not None:
        logits = logits + moe.router.bias
    scores = torch.sigmoid(logits) if moe.sigmoid else torch.softmax(logits, -1)
    out = torch.zeros_like(flat)
    for t in range(flat.shape[0]):
        top, idx = scores[t].topk(moe.top_k)
        for w, e in zip(top / top.sum(), idx.tolist()):
            out[t] += w * moe.experts.expert(e, flat[t:t + 1])[0]
    if moe.shared is not None:
        out = out + moe.shared(flat)
    return out.view_as(x)


@pytest.mark.parametrize("spec", [MOE, GPT_MOE], ids=["llama-softmax-shared", "gpt-sigmoid"])
def test_moe_block_equals_per_token_reference(spec):
    model = _model(spec)
    moe = next(m for m in model.modules() if isinstance(m, MoE))
    x = torch.randn(2, 8, spec.hidden_size)
    with torch.no_grad():
        torch.testing.assert_close(moe(x), _naive(moe, x), rtol=1e-5, atol=1e-6)


def test_moe_layers_follow_the_spec():
    assert [b.moe for b in _model(MOE).layers.values()] == [False] + [True] * 7
    assert [b.moe for b in _model(GPT_MOE).layers.values()] == [True, False] * 4
    shapes = {n: tuple(p.shape) for n, p in _model(GPT_MOE).named_parameters()}
    assert shapes["layers.0.mlp.experts.fc"] == (8, 32, 64)
    assert shapes["layers.0.mlp.experts.proj_bias"] == (8, 64)
    assert shapes["layers.1.mlp.fc.weight"] == (128, 64)


def test_aux_loss_gradient_equals_adding_it_to_the_loss():
    """The injected gradient (MoEAuxLossAutoScaler) is that of main + scale * sum of aux."""
    model = _model(MOE)
    moe = next(m for m in model.modules() if isinstance(m, MoE))
    x = torch.randn(2, 8, MOE.hidden_size, requires_grad=True)
    scale = 0.37
    moe.aux_grad_scale = scale
    moe(x).square().sum().backward()
    injected = [p.grad.clone() for p in moe.parameters()] + [x.grad.clone()]
    moe.zero_grad()
    x.grad = None
    moe.aux_grad_scale = 0.0
    out = moe(x)
    idx, _, scores = moe.route(x)
    (out.square().sum() + scale * moe.aux_loss(scores, idx)).backward()
    explicit = [p.grad for p in moe.parameters()] + [x.grad]
    for a, b in zip(injected, explicit):
        torch.testing.assert_close(a, b)
    assert moe.router.weight.grad.abs().sum() > 0


def test_aux_loss_is_the_coefficient_under_uniform_routing():
    """Switch eq. 4: coef * E * sum f_i P_i = coef when load and probability are uniform."""
    moe = next(m for m in _model(MOE).modules() if isinstance(m, MoE))
    e, k = MOE.moe.num_experts, MOE.moe.experts_per_token
    scores = torch.full((1, e, e), 1.0 / e)
    idx = torch.stack([torch.arange(k) + i for i in range(e)]) % e  # every expert k times
    assert float(moe.aux_loss(scores, idx)) == pytest.approx(MOE.moe.aux_loss_coef)


def L(**kw):
    return Layout(**kw)


REFERENCE = L(micro_batch=2, num_microbatches=4)
CASES = {  # (spec, layout); global batch 8 as the reference's
    "ep2": (MOE, L(dp=2, ep=2, micro_batch=2, num_microbatches=2)),
    "ep2-zero2": (MOE, L(dp=2, ep=2, micro_batch=2, num_microbatches=2, zero_stage=2)),
    "ep4-zero2": (MOE, L(dp=4, ep=4, micro_batch=2, zero_stage=2)),
    "ep4-ddp": (MOE, L(dp=4, ep=4, micro_batch=1, num_microbatches=2)),
    "ep2-edp2-zero3": (MOE, L(dp=4, ep=2, micro_batch=2, zero_stage=3)),
    "ep2-edp2-ddp": (MOE, L(dp=4, ep=2, micro_batch=1, num_microbatches=2)),
    "ep2xpp2-1f1b": (MOE, L(pp=2, dp=2, ep=2, micro_batch=1, num_microbatches=4,
                            schedule="1f1b")),
    "ep2xpp2-zero2-interleaved": (MOE, L(pp=2, dp=2, ep=2, micro_batch=1, num_microbatches=4,
                                         zero_stage=2, schedule="interleaved_1f1b",
                                         virtual_stages=2)),
    "tp2xep2-zero2": (MOE, L(dp=2, tp=2, ep=2, micro_batch=2, num_microbatches=2,
                             zero_stage=2)),
    "tp2xep2-replicate": (MOE, L(dp=2, tp=2, ep=2, micro_batch=2, num_microbatches=2)),
    "pp2xtp2xep2-zero2": (MOE, L(pp=2, dp=2, tp=2, ep=2, micro_batch=1, num_microbatches=4,
                                 zero_stage=2)),
    "ep2-recompute-full": (MOE, L(dp=2, ep=2, micro_batch=2, num_microbatches=2,
                                  recompute="full")),
    "ep2-recompute-op-zero3": (MOE, L(dp=2, ep=2, micro_batch=2, num_microbatches=2,
                                      recompute="op", zero_stage=3)),
    "gpt-ep4-zero3": (GPT_MOE, L(dp=4, ep=4, micro_batch=2, zero_stage=3)),
    "gpt-ep2xpp2": (GPT_MOE, L(pp=2, dp=2, ep=2, micro_batch=1, num_microbatches=4)),
}


@functools.cache
def results() -> dict:
    plans = {name: make_plan(lay, spec) for name, (spec, lay) in CASES.items()}
    plans.update({("reference", s.name): make_plan(REFERENCE, s) for s in (MOE, GPT_MOE)})
    return train_worlds(plans, STEPS)


def diffs(name: str) -> tuple:
    spec, _ = CASES[name]
    got, want = results()[name], results()[("reference", spec.name)]
    loss = max(abs(a - b) for a, b in zip(got["losses"], want["losses"]))
    assert set(got["params"]) == set(want["params"])
    param = max(float((got["params"][k] - want["params"][k]).abs().max())
                for k in want["params"] if not k.endswith("k.bias"))  # RUNTIME_NOTES item 9
    return loss, param, abs(got["val_loss"] - want["val_loss"])


def planner_state_bytes(plan, coords) -> dict:
    """Per-rank weight, gradient and AdamW bytes from the planner's inventory
    (planner/cost/params.py rank_param_tensors, local shapes over tp and ep) sharded as the
    planner's torch engine shards them (planner/cost/memory.py torch_model_state_bytes), the
    routed experts over the expert-data-parallel group dp / ep instead of dp."""
    import math

    from planner.cost.memory import ADAM_STATE_BYTES_FP32, ADAM_STEP_BYTES, _fsdp_numel
    from planner.cost.params import rank_param_tensors
    lay = plan.layout
    ep_rank, edp, edp_rank = coords["dp"] % lay.ep, lay.dp // lay.ep, coords["dp"] // lay.ep
    numel = count = 0
    for t in rank_param_tensors(plan.model, lay, coords["pp"]):
        shape = t.local_shape(lay.tp, coords["tp"], ep=lay.ep, ep_rank=ep_rank)
        if lay.zero_stage >= 2 and t.expert:
            numel += _fsdp_numel(shape, edp, edp_rank)
        elif lay.zero_stage >= 2:
            numel += _fsdp_numel(shape, lay.dp, coords["dp"])
        else:
            numel += math.prod(shape)
        count += 1
    # the runtime measures after the step's reduce-scatter: gradients sharded as parameters
    return {"weights_bytes": 4 * numel, "gradients_bytes": 4 * numel,
            "optimizer_bytes": ADAM_STATE_BYTES_FP32 * numel + ADAM_STEP_BYTES * count}


@pytest.mark.parametrize("name", CASES)
def test_expert_parallel_parity(name):
    loss, param, val = diffs(name)
    print(f"{name}: max |loss diff| {loss:.2e}  max |param diff| {param:.2e}")
    assert loss <= LOSS_TOL
    assert param <= PARAM_TOL
    assert val <= LOSS_TOL
    got = results()[name]
    assert got["losses"][-1] < got["losses"][0]
    plan = make_plan(CASES[name][1], CASES[name][0])
    for coords, record in got["ranks"]:
        want = planner_state_bytes(plan, coords)
        assert {k: record[k] for k in want} == want, coords


def test_aux_loss_moves_the_parameters_beyond_the_tolerance():
    """The parity above would catch a wrong aux-gradient scale: the aux loss alone moves the
    parameters by more than PARAM_TOL in these 3 steps."""
    no_aux = dataclasses.replace(MOE, moe=dataclasses.replace(MOE.moe, aux_loss_coef=0.0))
    got = train_worlds({"no-aux": make_plan(REFERENCE, no_aux)}, STEPS)["no-aux"]
    want = results()[("reference", MOE.name)]
    assert max(float((got["params"][k] - want["params"][k]).abs().max())
               for k in want["params"]) > 10 * PARAM_TOL


# --- all-to-all census ---------------------------------------------------------------------------
CENSUS = L(dp=2, ep=2, micro_batch=2, num_microbatches=2)


def _census_rank(plan, tokens) -> dict:
    from runtime.data import TokenData
    from runtime.engine import Engine
    from runtime.mesh import init_distributed
    from runtime.moe import count_all_to_all
    ctx = init_distributed(plan.layout, timeout_s=60)
    engine = Engine(plan, ctx)
    data = TokenData(tokens, plan.job.seq_len, plan.layout, ctx.dp_rank, causal=True)
    with count_all_to_all() as log:
        engine.train_step(*data.batch(0))
    return {"log": log}


def a2a_bytes_per_direction(plan) -> int:
    """tokens x top-k x hidden x bytes: one dispatch (or combine) of one rank's micro-batch."""
    moe = plan.model.moe
    tokens = plan.layout.micro_batch * plan.job.seq_len
    return tokens * moe.experts_per_token * plan.model.hidden_size * 4  # fp32 activations


def test_cost_model_all_to_all_bytes_are_the_formula():
    """planner/cost/moe.py a2a_bytes at a routing imbalance of 1 is what a rank sends in its
    dispatch (the census below); the imbalance factor scales it for the busiest rank."""
    from planner.cost.moe import a2a_bytes
    plan = make_plan(CENSUS, MOE)
    job = dataclasses.replace(plan.job, moe_imbalance=1.0)
    assert a2a_bytes(plan.model, job, tp=1, sequence_parallel=False,
                     micro_batch=CENSUS.micro_batch) == a2a_bytes_per_direction(plan)


def test_all_to_all_census_equals_tokens_topk_hidden_bytes():
    """Each rank sends its tokens x top-k rows in the dispatch and gets them back in the
    combine (and the reverse in backward); what its experts return is routing-dependent, the
    group's total is ep x that."""
    from runtime_dist import corpus_tokens, run_world
    plan = make_plan(CENSUS, MOE)
    ranks = run_world(2, _census_rank, plan, corpus_tokens())
    calls = MOE.moe.num_moe_layers(MOE.num_layers) * CENSUS.num_microbatches
    want = a2a_bytes_per_direction(plan)
    own = {"dispatch": "bytes", "combine": "recv_bytes", "combine_backward": "bytes",
           "dispatch_backward": "recv_bytes"}
    for kind, key in own.items():
        per_rank = [[e for e in r["log"] if e["kind"] == kind] for r in ranks]
        assert all(len(entries) == calls for entries in per_rank), kind
        assert all(e[key] == want for entries in per_rank for e in entries), kind
        other = "recv_bytes" if key == "bytes" else "bytes"
        for i in range(calls):  # the other side: routing-dependent, summing to ep x want
            assert sum(entries[i][other] for entries in per_rank) == CENSUS.ep * want, kind
            assert all(0 < entries[i]["remote_bytes"] < entries[i]["bytes"]
                       for entries in per_rank), kind
    assert all(len(r["log"]) == 4 * calls for r in ranks)


# --- the training CLI ----------------------------------------------------------------------------
def _main_rank(argv: list) -> tuple:
    import contextlib
    import io

    from runtime.train import main
    err, out = io.StringIO(), io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(out):
        code = main(argv)
    return code, err.getvalue(), out.getvalue()


def test_training_cli_runs_an_expert_parallel_plan(tmp_path):
    import json

    from runtime_dist import run_world
    plan = tmp_path / "plan.json"
    make_plan(L(dp=2, ep=2, micro_batch=2, num_microbatches=2, zero_stage=2), MOE).save(plan)
    out = tmp_path / "measured.json"
    argv = ["--plan", str(plan), "--steps", "3", "--data-cap-mb", "1", "--timeout", "30",
            "--out", str(out)]
    results = run_world(2, _main_rank, argv, timeout_s=120)
    assert [code for code, _, _ in results] == [0, 0], results
    measured = json.loads(out.read_text())
    assert measured["plan"]["layout"]["ep"] == 2 and len(measured["steps"]) == 3
    assert measured["steps"][-1]["loss"] < measured["steps"][0]["loss"]


def test_training_cli_refuses_checkpoints_of_expert_parallel_runs(tmp_path):
    from runtime.train import main
    plan = tmp_path / "plan.json"
    make_plan(L(dp=2, ep=2, micro_batch=2, num_microbatches=2), MOE).save(plan)
    code = main(["--plan", str(plan), "--steps", "1", "--checkpoint-dir", str(tmp_path / "ck")])
    assert code == 2


# --- what the runtime refuses (planner/rules.py _runtime_moe_rules) ------------------------------
@pytest.mark.parametrize("layout, text", [
    (L(dp=2, tp=2, ep=2, micro_batch=4, sequence_parallel=True),
     "sequence parallel with tp=2: runtime/model.py's MoE blocks route whole sequences"),
    (L(dp=2, ep=2, micro_batch=2, num_microbatches=2, zero_stage=1), "ep=2 with ZeRO-1"),
])
def test_plan_refuses_what_the_runtime_does_not_build(layout, text):
    with pytest.raises(ValueError, match=text):
        make_plan(layout, MOE)


def test_engine_refuses_the_same_layouts_in_one_line():
    from runtime.moe import check_runtime_layout
    with pytest.raises(ValueError, match="ep=2 with ZeRO-1"):
        check_runtime_layout(MOE, L(dp=2, ep=2, num_microbatches=2, zero_stage=1))
    with pytest.raises(ValueError, match="etp=2: expert tensor parallelism is not built"):
        check_runtime_layout(MOE, L(dp=2, ep=1, etp=2))


# --- parameter inventory: planner/cost/params.py lists the runtime's MoE tensors -----------------
QWEN2_MOE_LIKE = dataclasses.replace(
    MOE, name="test-qwen2-moe-like", attention_head_dim=16, num_heads=8, num_kv_heads=2,
    moe=dataclasses.replace(MOE.moe, shared_expert_gate=True, moe_layer_every=2))
INVENTORY = {s.name: s for s in (MOE, GPT_MOE, QWEN2_MOE_LIKE)}


@pytest.mark.parametrize("key", sorted(INVENTORY))
def test_moe_names_shapes_and_count_equal_planner(key):
    from test_param_names import planner_shapes, planner_tensors, runtime_shapes

    from planner.cost.params import count_parameters
    spec = INVENTORY[key]
    with torch.device("meta"):
        model = Transformer(spec)
    assert runtime_shapes(model) == planner_shapes(planner_tensors(spec, range(spec.num_layers)))
    assert sum(p.numel() for p in model.parameters()) == count_parameters(spec)


@pytest.mark.parametrize("tp", [1, 2])
@pytest.mark.parametrize("key", sorted(INVENTORY))
def test_moe_local_shapes_under_tp_and_ep_equal_planner(key, tp):
    """Every tp rank's placements after apply_tp, every ep rank's experts after apply_ep.  In a
    spawned process: the fake process groups leave state in this one that made later forked
    TP worlds train differently (test_runtime_parity's tp2 case, when run after this)."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor
    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
        pool.submit(_check_local_shapes, key, tp).result()


def _check_local_shapes(key, tp):
    from test_param_names import fake_tp_mesh, planner_tensors, tp_placements

    from runtime.parallelize import apply_ep, apply_tp
    spec, ep = INVENTORY[key], 2
    expected = planner_tensors(spec, range(spec.num_layers))

    class _Ctx:  # the two fields apply_ep reads besides the group
        def __init__(self, rank):
            self.ep, self.ep_rank = ep, rank

        def group(self, axis):
            return None

    for tp_rank in range(tp):
        for ep_rank in range(ep):
            with fake_tp_mesh(tp, tp_rank) as mesh:
                with torch.device("meta"):
                    module = Transformer(spec)
                if tp > 1:
                    apply_tp(module, mesh, sp=False)
                apply_ep(module, _Ctx(ep_rank))
                want = {n: (t.local_shape(tp, tp_rank, ep=ep, ep_rank=ep_rank),
                            t.tp_dim if tp > 1 and not t.expert else None)
                        for n, t in expected}
                got = {n: (local, dim if tp > 1 else None)
                       for n, (_, local, dim) in tp_placements(module).items()}
                assert got == want, (tp_rank, ep_rank)


MIXED = {"bf16-ep2-zero2": L(dp=2, ep=2, micro_batch=2, num_microbatches=2, zero_stage=2),
         "bf16-ep2-autocast-ddp": L(dp=2, ep=2, micro_batch=2, num_microbatches=2)}


def test_bf16_expert_parallel_tracks_fp32():
    """bf16 compute (FSDP2's policy over dp and expert-dp, or autocast under DDP): bf16 token
    rows through the all-to-all, fp32 parameters and states (as the dense bf16 tests)."""
    got = train_worlds({k: make_plan(v, MOE, "bf16") for k, v in MIXED.items()}, STEPS)
    want = results()[("reference", MOE.name)]
    for name, run in got.items():
        assert max(abs(a - b) for a, b in zip(run["losses"], want["losses"])) < 0.05, name
        assert all(v.dtype == torch.float32 for v in run["params"].values()), name


@pytest.mark.parametrize("name", sorted(CASES))
def test_planner_memory_model_holds_the_runtimes_model_states(name):
    """planner.cost.memory.rank_memory (dense view plus planner/cost/moe.py's MoE terms) gives
    the weights and AdamW bytes the runtime holds on each pipeline rank's most loaded rank."""
    from planner.cost.memory import rank_memory
    spec, layout = CASES[name]
    plan = make_plan(layout, spec)
    for pp_rank in range(layout.pp):
        mem = rank_memory(plan, pp_rank)
        want = planner_state_bytes(plan, {"dp": 0, "tp": 0, "pp": pp_rank})
        assert (mem.weights_bytes, mem.optimizer_bytes) == \
            (want["weights_bytes"], want["optimizer_bytes"]), pp_rank
