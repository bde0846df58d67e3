"""The cost model's per-layer TP collectives (planner.cost.comm_plan.tp_pattern) are the ones the
runtime really issues: one transformer block under DTensor TP on 2 forked ranks, its forward and
backward counted with torch.profiler."""

import collections
import dataclasses

import pytest
import torch

from planner.cost.comm_plan import tp_pattern
from planner.plan import Layout
from planner.presets import MODEL_PRESETS
from tests.runtime_dist import SEQ_LEN, SPEC, make_plan, run_world

GPT = dataclasses.replace(MODEL_PRESETS["tiny-gpt"], max_seq_len=SEQ_LEN)


def _count(fn) -> dict:
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    counts = collections.Counter()
    for event in prof.events():
        namespace, _, op = event.name.partition("::")
        if namespace == "_c10d_functional" and op != "wait_tensor" and "wrap" not in op:
            counts[op.removesuffix("_into_tensor").removesuffix("_tensor")] += 1
    return dict(counts)


def _census(spec, sp: bool) -> tuple:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor.parallel import parallelize_module

    from runtime.model import Block, rope_tables
    from runtime.parallelize import block_plan
    torch.distributed.init_process_group("gloo")
    mesh = init_device_mesh("cpu", (2,), mesh_dim_names=("tp",))
    torch.manual_seed(0)
    block = Block(spec)
    parallelize_module(block, mesh, block_plan(block, sp))
    cos, sin = rope_tables(spec, "cpu")
    x = torch.randn(1, SEQ_LEN // 2 if sp else SEQ_LEN, spec.hidden_size, requires_grad=True)
    out = {}
    forward = _count(lambda: out.setdefault("y", block(x, cos, sin)))
    backward = _count(lambda: out["y"].sum().backward())
    return forward, backward


@pytest.mark.parametrize("spec", [SPEC, GPT], ids=["llama", "gpt"])
@pytest.mark.parametrize("sp", [True, False], ids=["sp", "no-sp"])
def test_runtime_issues_the_modelled_tp_collectives(spec, sp):
    plan = make_plan(Layout(tp=2, sequence_parallel=sp), spec=spec)
    forward, backward = (dict(p) for p in tp_pattern(plan))
    measured = run_world(2, _census, spec, sp)[0]
    assert measured == (forward, backward)


_PG_KINDS = (("allgather", "all_gather"), ("allreduce", "all_reduce"),
             ("reduce_scatter", "reduce_scatter"))


def _count_process_group_calls(fn) -> dict:
    """Collectives that reach the process group (c10d:: ops).  Under a selective checkpoint
    the functional op is recorded twice (at the policy's dispatch mode and below it), and a
    cached one is recorded without communicating, so count the real calls."""
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    counts = collections.Counter()
    for event in prof.events():
        namespace, _, op = event.name.partition("::")
        if namespace == "c10d":
            kinds = [kind for key, kind in _PG_KINDS if key in op]
            counts[kinds[0]] += 1
    return dict(counts)


def _recompute_census(spec, sp: bool, mode: str) -> dict:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor.parallel import parallelize_module

    from runtime.model import Block, rope_tables
    from runtime.parallelize import block_plan
    torch.distributed.init_process_group("gloo")
    mesh = init_device_mesh("cpu", (2,), mesh_dim_names=("tp",))
    torch.manual_seed(0)
    block = Block(spec)
    block.recompute_full, block.recompute_op = mode == "full", mode == "op"
    parallelize_module(block, mesh, block_plan(block, sp))
    cos, sin = rope_tables(spec, "cpu")
    x = torch.randn(1, SEQ_LEN // 2 if sp else SEQ_LEN, spec.hidden_size, requires_grad=True)
    y = block(x, cos, sin)
    return _count_process_group_calls(lambda: y.sum().backward())


@pytest.mark.parametrize("mode", ["op", "full"])
@pytest.mark.parametrize("sp", [True, False], ids=["sp", "no-sp"])
def test_recompute_reruns_the_modelled_tp_collectives(mode, sp):
    """A recomputed block's backward issues the backward's collectives plus those
    comm_plan.recomputed_tp_pattern says its recompute re-runs: op under SP the two all-gathers
    (the reduce-scatters are saved), without SP one all-reduce; full all but the last one
    (checkpoint early stop)."""
    from planner.cost.comm_plan import recomputed_tp_pattern
    plan = make_plan(Layout(tp=2, sequence_parallel=sp, recompute=mode), spec=SPEC)
    forward, backward = tp_pattern(plan)
    want = collections.Counter(dict(backward))
    want.update(dict(recomputed_tp_pattern(forward, mode, stops_early=True)))
    assert run_world(2, _recompute_census, SPEC, sp, mode)[0] == dict(want)
