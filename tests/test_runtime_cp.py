"""Context parallelism on gloo (runtime/context.py): every layout trains exactly like one
process (fp32, same seed, dropout 0), its model-state bytes equal the planner's over dp x cp
shards, activation bytes per micro-batch are within 10% of the prediction (which counts the
gathered K/V, except under recompute), and the K/V bytes the collectives move equal the cost
model's."""

import functools

import pytest
from runtime_dist import Layout, make_plan, run_world, train_worlds

from planner.cost.context import cp_collectives
from planner.cost.fields import call, plan_fields, recomputed_layers_of, with_rank
from planner.cost.memory import rank_memory, rank_model_state

STEPS = 3
LOSS_TOL = 2e-5    # as tests/test_runtime_parity.py
PARAM_TOL = 1e-4
ACT_TOL = 0.10

CASES = {
    "cp2": Layout(cp=2, micro_batch=2, num_microbatches=4),
    "cp4": Layout(cp=4, micro_batch=2, num_microbatches=4),
    "cp2xdp2-zero3": Layout(cp=2, dp=2, micro_batch=2, num_microbatches=2, zero_stage=3),
    "cp4-zero3": Layout(cp=4, micro_batch=2, num_microbatches=4, zero_stage=3),
    "cp2xtp2": Layout(cp=2, tp=2, micro_batch=2, num_microbatches=4),
    "cp2xpp2": Layout(cp=2, pp=2, micro_batch=2, num_microbatches=4),
    # recompute: the gathered K/V is made again inside the recomputed attention, not saved
    "cp2-selective": Layout(cp=2, micro_batch=2, num_microbatches=4, recompute="selective"),
    "cp2-op": Layout(cp=2, micro_batch=2, num_microbatches=4, recompute="op"),
    "cp2-full-every2": Layout(cp=2, micro_batch=2, num_microbatches=4, recompute="full",
                              recompute_every=2),
}
REFERENCE = Layout(micro_batch=2, num_microbatches=4)


@functools.cache
def results(world: int) -> dict:
    if world == 1:
        return train_worlds({"reference": make_plan(REFERENCE)}, STEPS)
    return train_worlds({k: make_plan(v) for k, v in CASES.items() if v.world_size == world},
                        STEPS)


def _param_diff(got: dict, want: dict) -> float:
    assert set(got) == set(want)
    return max(float((got[k] - want[k]).abs().max()) for k in want)


def _check_memory(plan, ranks) -> None:
    lay = plan.layout
    for coords, record in ranks:
        shard = coords["dp"] * lay.cp + coords["cp"]  # the dp x cp mesh, dp outer
        states = rank_model_state(plan, coords["pp"], shard, coords["tp"])
        for key in ("weights_bytes", "gradients_bytes", "optimizer_bytes"):
            assert record[key] == getattr(states, key), (coords, key)
        predicted = rank_memory(plan, coords["pp"]).activation_bytes_per_microbatch
        got = record["activation_bytes_per_microbatch"]
        assert abs(got - predicted) <= ACT_TOL * predicted, (coords, got, predicted)


@pytest.mark.parametrize("name", CASES)
def test_cp_parity(name):
    lay = CASES[name]
    got, want = results(lay.world_size)[name], results(1)["reference"]
    loss_diff = max(abs(a - b) for a, b in zip(got["losses"], want["losses"]))
    param_diff = _param_diff(got["params"], want["params"])
    print(f"{name}: max |loss diff| {loss_diff:.2e}  max |param diff| {param_diff:.2e}")
    assert loss_diff <= LOSS_TOL
    assert param_diff <= PARAM_TOL
    assert abs(got["val_loss"] - want["val_loss"]) <= LOSS_TOL
    _check_memory(make_plan(lay), got["ranks"])


def _census_rank(plan, tokens) -> dict:
    """Bytes and calls of the runtime's CP collectives over one training step."""
    import torch

    import runtime.context as rc
    from runtime.data import TokenData
    from runtime.engine import Engine
    from runtime.mesh import init_distributed
    ctx = init_distributed(plan.layout, timeout_s=60)
    engine = Engine(plan, ctx)
    data = TokenData(tokens, plan.job.seq_len, plan.layout, ctx.dp_rank)
    counted = {"all_gather": [0, 0.0], "reduce_scatter": [0, 0.0]}

    def counting(kind, fn):
        def wrapped(out, inp, **kw):
            big = out if kind == "all_gather" else inp  # the gathered (full) buffer
            counted[kind][0] += 1
            counted[kind][1] += big.numel() * big.element_size()
            return fn(out, inp, **kw)
        return wrapped

    real = (rc.dist.all_gather_single, rc.dist.reduce_scatter_single)
    rc.dist.all_gather_single = counting("all_gather", real[0])
    rc.dist.reduce_scatter_single = counting("reduce_scatter", real[1])
    try:
        inputs, labels = data.batch(0)
        torch.manual_seed(0)
        engine.train_step(inputs, labels)
    finally:
        rc.dist.all_gather_single, rc.dist.reduce_scatter_single = real
    return counted


@pytest.mark.parametrize("name", ["cp2", "cp4", "cp2xtp2", "cp2-selective", "cp2-full-every2"])
def test_cp_collective_bytes_equal_the_cost_model(name):
    """Every K/V all-gather and dK/dV reduce-scatter the runtime runs in a step, counted and
    sized, against the estimate's cp collectives (count per step x gathered buffer); a
    recomputed layer gathers K/V once more."""
    from runtime_dist import corpus_tokens

    from planner.cost.estimate import estimate
    plan = make_plan(CASES[name])
    counted = run_world(plan.layout.world_size, _census_rank, plan, corpus_tokens())[0]
    comm = {c.kind: c for c in estimate(plan).communication if c.axis == "cp"}
    lay = plan.layout
    for kind in ("all_gather", "reduce_scatter"):
        want = comm[kind]
        # 2 calls per layer (K and V) where the model moves them as one buffer
        assert counted[kind][0] == 2 * want.count, kind
        assert counted[kind][1] == pytest.approx(want.count * want.bytes_each, rel=1e-12), kind
    recomputed = call(recomputed_layers_of, with_rank(plan_fields(plan), 0))
    assert comm["all_gather"].count == \
        (plan.model.num_layers + recomputed) * lay.num_microbatches
    assert comm["reduce_scatter"].count == plan.model.num_layers * lay.num_microbatches
    fwd, bwd = call(cp_collectives, plan_fields(plan))
    assert [c.kind for c in fwd + bwd] == ["all_gather", "reduce_scatter"]
