"""Hybrid sharding measured on the runtime (4 gloo ranks, dp=4 as 2 replicas x 2 shards): the
FSDP2 collectives of one step - all-gathers and reduce-scatters within the shard group, the
all-reduce across replicas - in number, group size and full-buffer bytes equal the planner's
dp_collectives (parity and per-rank model-state bytes: tests/test_runtime_parity.py)."""

import collections

import pytest
import torch.distributed as dist

from planner.cost.comm_plan import dp_collectives
from planner.cost.fields import call, plan_fields, with_rank
from planner.plan import Layout
from tests.runtime_dist import SEQ_LEN, corpus_tokens, make_plan, run_world

CASES = {"zero3-m1": Layout(dp=4, dp_shard=2, zero_stage=3, micro_batch=2),
         "zero2-m2": Layout(dp=4, dp_shard=2, zero_stage=2, micro_batch=1, num_microbatches=2),
         "zero3-m2-bf16": Layout(dp=4, dp_shard=2, zero_stage=3, micro_batch=1,
                                 num_microbatches=2)}
PRECISION = {"zero3-m2-bf16": "bf16"}
AXIS_OF = {"all_gather": "dp_shard", "reduce_scatter": "dp_shard", "all_reduce": "dp_replicate"}


def _plans() -> list:
    return [make_plan(lay, precision=PRECISION.get(name, "fp32")) for name, lay in CASES.items()]


def _counting(record: list, groups: dict):
    """Wrap the collectives FSDP2 calls; record (kind, axis, full-buffer bytes) of each call on
    the HSDP groups (the loss and norm all-reduces run on other groups and are not counted)."""
    def wrap(kind, fn, full):
        def counted(*args, **kwargs):
            group = kwargs.get("group")
            if group is not None and group in groups:
                record.append((kind, groups[group], full(*args, **kwargs)))
            return fn(*args, **kwargs)
        return counted
    nbytes = lambda t: t.numel() * t.element_size()  # noqa: E731
    dist.all_gather_single = wrap("all_gather", dist.all_gather_single,
                                  lambda out, *a, **k: nbytes(out))
    dist.reduce_scatter_single = wrap("reduce_scatter", dist.reduce_scatter_single,
                                      lambda *a, **k: nbytes(k.get("input", a[1] if len(a) > 1
                                                                    else None)))
    dist.all_reduce = wrap("all_reduce", dist.all_reduce, lambda t, *a, **k: nbytes(t))


def _measure(plans: list) -> list:
    from runtime.data import TokenData
    from runtime.engine import Engine
    from runtime.mesh import init_distributed
    record, groups, out = [], {}, []
    _counting(record, groups)
    for plan in plans:
        ctx = init_distributed(plan.layout, timeout_s=60)
        groups.clear()
        groups.update({ctx.hsdp_mesh.get_group(a): a for a in ("dp_replicate", "dp_shard")})
        engine = Engine(plan, ctx)
        data = TokenData(corpus_tokens(), SEQ_LEN, plan.layout, ctx.dp_rank, causal=True)
        for step in range(2):  # the second step: no first-step effects
            record.clear()
            engine.train_step(*data.batch(step))
        out.append(list(record))
    return out


def _census(calls: list) -> dict:
    """{(kind, axis): (calls, total full-buffer bytes)}."""
    out = collections.defaultdict(lambda: [0, 0])
    for kind, axis, nbytes in calls:
        out[(kind, axis)][0] += 1
        out[(kind, axis)][1] += nbytes
    return {k: tuple(v) for k, v in out.items()}


@pytest.fixture(scope="module")
def measured():
    return run_world(4, _measure, _plans())


@pytest.mark.parametrize("case", range(len(CASES)), ids=list(CASES))
def test_hsdp_collectives_match_the_plan(measured, case):
    plan = _plans()[case]
    predicted = {(c.kind, c.axis): (c.count, c.count * c.bytes_each)
                 for c in call(dp_collectives, with_rank(plan_fields(plan), 0))}
    assert {AXIS_OF[k] for k, _ in predicted} == {a for _, a in predicted}
    for rank in measured:
        assert _census(rank[case]) == predicted
