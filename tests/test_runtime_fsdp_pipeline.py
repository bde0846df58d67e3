"""ZeRO-2/3 under pipelining, measured on the runtime: PyTorch 2.13's pipelining keeps every
FSDP2 parameter of a stage unsharded and its gradients unreduced until the step's last backward,
then reduce-scatters once (planner.engines.deferred_fsdp).  At that moment the runtime's
unsharded parameter and gradient bytes, and the step's gathers and reduce-scatters per rank,
equal what the planner predicts for the rank."""

import collections

import pytest
import torch.distributed as dist

from planner.cost.comm_plan import dp_collectives
from planner.cost.fields import call, plan_fields, with_rank
from planner.cost.memory import rank_memory
from planner.plan import Layout
from tests.runtime_dist import SEQ_LEN, corpus_tokens, make_plan, run_world

pytestmark = pytest.mark.slow

CASES = [(2, "1f1b", "fp32"), (3, "1f1b", "bf16"), (3, "gpipe", "fp32")]


def _plans():
    return [make_plan(Layout(dp=2, pp=2, zero_stage=zero, micro_batch=2, num_microbatches=4,
                             schedule=schedule), precision=precision)
            for zero, schedule, precision in CASES]


def _unsharded_bytes(engine) -> tuple:
    """(unsharded parameter bytes, unsharded gradient bytes) of this rank's FSDP2 groups."""
    from torch.distributed.fsdp import FSDPModule, fully_shard
    params = grads = 0
    for part in engine.parts:
        for module in part.modules():
            group = fully_shard.state(module)._fsdp_param_group \
                if isinstance(module, FSDPModule) else None
            for fp in group.fsdp_params if group else ():
                p = fp._unsharded_param
                if p.untyped_storage().nbytes():
                    params += p.numel() * p.element_size()
                for g in (p.grad, fp.unsharded_accumulated_grad):
                    grads += g.numel() * g.element_size() if g is not None else 0
    return params, grads


def _counting(counts: collections.Counter):
    """Wrap FSDP2's collectives (torch.distributed all_gather_single / reduce_scatter_single)."""
    def wrap(name, fn):
        def counted(*args, **kwargs):
            counts[name] += 1
            return fn(*args, **kwargs)
        return counted
    dist.all_gather_single = wrap("all_gather", dist.all_gather_single)
    dist.reduce_scatter_single = wrap("reduce_scatter", dist.reduce_scatter_single)


def _measure(plans: list) -> list:
    from torch.distributed.pipelining import stage

    from runtime.data import TokenData
    from runtime.engine import Engine
    from runtime.mesh import init_distributed
    counts, seen = collections.Counter(), []
    _counting(counts)
    reduce_grad = stage._PipelineStageBase.perform_reduce_grad

    def measured(self, *args, **kwargs):
        seen.append(_unsharded_bytes(current[0]))
        return reduce_grad(self, *args, **kwargs)

    stage._PipelineStageBase.perform_reduce_grad = measured
    out, current = [], [None]
    for plan in plans:
        ctx = init_distributed(plan.layout, timeout_s=60)
        current[0] = engine = Engine(plan, ctx)
        data = TokenData(corpus_tokens(), SEQ_LEN, plan.layout, ctx.dp_rank, causal=True)
        for step in range(2):  # the second step: no first-step effects
            counts.clear()
            seen.clear()
            engine.forward_backward(*data.batch(step))
            engine.optimizer_step()
        out.append({"coords": dict(ctx.coords), "unsharded": seen[-1], "counts": dict(counts)})
    return out


@pytest.fixture(scope="module")
def measured():
    return run_world(4, _measure, _plans())


@pytest.mark.parametrize("case", range(len(CASES)), ids=[f"zero{z}-{s}-{p}" for z, s, p in CASES])
def test_unsharded_bytes_and_collectives_match_the_plan(measured, case):
    plan = _plans()[case]
    for rank in measured:
        got = rank[case]
        pp = got["coords"]["pp"]
        mem = rank_memory(plan, pp)
        assert got["unsharded"] == (mem.gathered_params_bytes, mem.gradients_bytes), pp
        predicted = {c.kind: c.count for c in
                     call(dp_collectives, with_rank(plan_fields(plan), pp))}
        assert got["counts"] == predicted, pp
