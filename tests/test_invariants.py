"""Properties of the cost model over whole search spaces: recomputation never makes a step
faster, and never needs more memory."""

import numpy as np
import pytest

from planner import rules
from planner.engines import RECOMPUTE
from planner.hardware import Cluster, load_cluster
from planner.job import Job
from planner.presets import load_model
from planner.search.scorer import Scorer
from planner.search.space import enumerate_space, take

SPACES = [("gpt2-124m", "a100-80g", 64, 2048, 1024, "torch"),
          ("llama2-70b", "a100-80g", 4, 256, 4096, "torch"),
          ("gpt3-13b", "a100-80g", 4, 64, 2048, "megatron"),
          ("llama3-8b", "h100-80g", 3, 48, 8192, "torch"),
          ("tiny", "cpu", 1, 32, 256, "torch")]


def _valid_space(name, profile, nodes, batch, seq, engine):
    model = load_model(name)
    cluster = Cluster(profile=load_cluster(profile, nodes).profile, num_nodes=nodes)
    job = Job(global_batch=batch, seq_len=seq, engine=engine,
              precision="fp32" if profile == "cpu" else "bf16")
    cols, _ = enumerate_space(model, job, cluster.world_size, cluster.profile.gpus_per_node)
    ctx = rules.Context(model=model, profile=cluster.profile, job=job)
    return Scorer(model, lambda w: cluster, job), take(cols, rules.first_broken(ctx, cols) < 0)


@pytest.mark.parametrize("space", SPACES, ids=[s[0] for s in SPACES])
def test_recompute_is_never_faster_and_never_larger(space):
    scorer, cols = _valid_space(*space)
    base = take(cols, cols["recompute"] == RECOMPUTE.index("none"))
    step_none, mem_none = scorer.step_time(base), scorer.memory(base)
    for policy in ("selective", "full"):
        other = {**base, "recompute": np.full(base["dp"].size, RECOMPUTE.index(policy))}
        step = scorer.step_time(other)
        worst = np.argmin(step - step_none)
        assert np.all(step >= step_none * (1 - 1e-12)), (policy, worst, step[worst],
                                                          step_none[worst])
        assert np.all(scorer.memory(other) <= mem_none * (1 + 1e-12)), policy
