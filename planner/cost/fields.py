"""The named inputs of the cost functions.  A cost function's keyword parameters are named after
what it reads - Layout fields (dp, tp, micro_batch, schedule, ...), a pipeline rank's facts
(rank, rank_layers, rank_chunks, holds_embedding, holds_head, tied_copy, rank_moe_layers) and
the fixed inputs (profile, gpu, spec, job) - so its signature says what it reads and is the
search's memo key (planner/search/scorer.py).  estimate() fills the same names from one plan."""

import inspect
from functools import cache

import numpy as np

from planner.cost.pipeline import rank_facts, rank_recomputed_layers

LAYOUT_FIELDS = ("dp", "tp", "pp", "sequence_parallel", "zero_stage", "micro_batch",
                 "num_microbatches", "schedule", "virtual_stages", "recompute", "recompute_every",
                 "mesh_order", "layers_per_stage", "compile", "cp", "cp_comm", "ep", "etp",
                 "dp_shard", "offload")


@cache
def parameters(fn) -> tuple:
    """(name, has a default) of each of fn's parameters, in order."""
    return tuple((name, p.default is not p.empty)
                 for name, p in inspect.signature(fn).parameters.items())


def arguments(fn, named: dict) -> dict:
    """Each parameter fn declares, taken from `named` by name (one with a default may be
    missing)."""
    return {k: named[k] for k, optional in parameters(fn) if not optional or k in named}


def call(fn, named: dict):
    return fn(**arguments(fn, named))


FIXED = ("profile", "gpu", "spec", "job")  # the same for every rank of a plan


class PlanEvaluations:
    """Evaluators for the ranks of one plan: fn's result as a numpy value (a tuple becomes a
    1-d array), computed once per distinct input (a layer's times are the same on every rank)."""

    def __init__(self, named: dict):
        self.named = named
        self._memo: dict = {}

    def evaluator(self, rank: int | None = None):
        named = self.named if rank is None else with_rank(self.named, rank)
        return lambda fn: self.value(fn, named)

    def value(self, fn, named: dict):
        args = arguments(fn, named)
        key = (fn, tuple(v for k, v in args.items() if k not in FIXED))
        if key not in self._memo:
            self._memo[key] = np.asarray(fn(**args), dtype=float)
        return self._memo[key]


def unpack(values, n: int) -> list:
    """The n outputs of an evaluated function (scalars, or one column each)."""
    return [values[..., i] for i in range(n)]


def rank_facts_of(spec, *, pp, virtual_stages, schedule, rank, layers_per_stage=()) -> tuple:
    """(layers, chunks, holds the first chunk, holds the last chunk) of pipeline rank `rank`."""
    return rank_facts(spec.num_layers, pp=pp, virtual_stages=virtual_stages, schedule=schedule,
                      rank=rank, layers_per_stage=layers_per_stage)


def recomputed_layers_of(spec, *, pp, virtual_stages, schedule, rank, recompute,
                         recompute_every, layers_per_stage=()) -> int:
    """Blocks of pipeline rank `rank` running the recompute policy (none: 0)."""
    if recompute == "none":
        return 0
    return rank_recomputed_layers(spec.num_layers, pp=pp, virtual_stages=virtual_stages,
                                  schedule=schedule, rank=rank, every=recompute_every,
                                  layers_per_stage=layers_per_stage)


def plan_fields(plan) -> dict:
    """The fixed inputs and the layout fields of a plan."""
    lay = plan.layout
    return {"profile": plan.cluster.profile, "gpu": plan.cluster.profile.gpu,
            "spec": plan.model, "job": plan.job, "world": plan.cluster.world_size,
            **{k: getattr(lay, k) for k in LAYOUT_FIELDS}}


def with_rank(named: dict, rank: int) -> dict:
    """`named` plus pipeline rank `rank`'s facts."""
    layers, chunks, first, last = rank_facts(
        named["spec"].num_layers, pp=named["pp"], virtual_stages=named["virtual_stages"],
        schedule=named["schedule"], rank=rank, layers_per_stage=named["layers_per_stage"])
    from planner.cost.moe import rank_moe_layers_of
    moe = call(rank_moe_layers_of, {**named, "rank": rank})
    return {**named, "rank": rank, "rank_layers": layers, "rank_chunks": chunks,
            "holds_embedding": first, "holds_head": last,
            "tied_copy": named["pp"] * named["virtual_stages"] > 1, "rank_moe_layers": moe}
