"""planner suggest: the search space is complete, the fast scorer equals estimate(), the ranking
is deterministic and explained, the CLI contract holds."""

import itertools
import json
import random

import numpy as np
import pytest

from planner import rules
from planner.cli import main
from planner.cost.estimate import estimate
from planner.engines import RECOMPUTE_EVERY_CHOICES
from planner.hardware import Cluster, load_cluster
from planner.job import Job
from planner.plan import INTERLEAVED, RECOMPUTE, SCHEDULES, Layout, Plan, layout_errors
from planner.presets import load_model
from planner.search.explain import reasons, why_better
from planner.search.ranking import SearchOptions, cluster_for, search
from planner.search.scorer import Scorer, layout_at
from planner.search.space import divisors, enumerate_space, take

# (model, profile, nodes, gpus, global batch, seq, engine, flash): spaces that exercise GQA,
# uneven pipeline splits, the DGX-1 cube mesh, fp16, megatron overlap, unfused attention and
# DeepSpeed's optimizers and rules
SPACES = [
    ("llama2-70b", "a100-80g", 2, 0, 64, 4096, "torch", "flash", "bf16"),
    ("gpt3-13b", "a100-80g", 4, 0, 64, 2048, "megatron", "fused", "bf16"),
    ("gpt3-2.7b", "a100-40g", 1, 0, 16, 2048, "torch", "eager", "fp32"),
    ("llama3-8b", "h100-80g", 3, 0, 48, 8192, "torch", "flash", "bf16"),
    ("gpt2-1.5b", "v100-16g", 1, 0, 32, 1024, "torch", "flash", "fp16"),
    ("tiny", "cpu", 1, 6, 12, 256, "torch", "flash", "bf16"),
    ("llama3-8b", "h100-80g", 2, 0, 64, 4096, "deepspeed", "flash", "bf16"),
    # long sequences: context parallelism (every flavour under megatron, all-gather under torch)
    ("llama3-8b-cp", "h100-80g", 2, 0, 16, 65536, "megatron", "flash", "bf16"),
    ("llama3-8b-cp", "h100-80g", 2, 0, 8, 32768, "torch", "flash", "bf16"),
    # mixture of experts: ep and etp searched; 3 dense layers + MLA; head_dim != hidden / heads
    ("mixtral-8x7b", "h100-80g", 2, 0, 64, 4096, "megatron", "flash", "bf16"),
    ("deepseek-v3", "h100-80g", 16, 0, 256, 4096, "megatron", "flash", "bf16"),
    ("qwen3-30b-a3b", "h100-80g", 1, 0, 32, 4096, "megatron", "flash", "bf16"),
]


def _inputs(name, profile, nodes, gpus, gb, seq, engine, attention, precision):
    cluster = Cluster(profile=load_cluster(profile, nodes).profile, num_nodes=nodes,
                      num_gpus=gpus)
    job = Job(global_batch=gb, seq_len=seq, engine=engine, attention=attention,
              precision=precision)
    return load_model(name.removesuffix("-cp")), cluster, job


@pytest.fixture(scope="module", params=SPACES, ids=[s[0] for s in SPACES])
def space(request):
    model, cluster, job = _inputs(*request.param)
    cols, _ = enumerate_space(model, job, cluster.world_size, cluster.profile.gpus_per_node)
    return model, cluster, job, cols


def _reasons(model, cluster, job, cols):
    ctx = rules.Context(model=model, profile=cluster.profile, job=job)
    return rules.first_broken(ctx, cols)


def test_structural_verdict_and_reason_match_layout_errors(space):
    """The column verdict of the rule table equals Plan validation of each row's Layout."""
    model, cluster, job, cols = space
    reason = _reasons(model, cluster, job, cols)
    ctx = rules.Context(model=model, profile=cluster.profile, job=job)
    for i in random.Random(1).sample(range(reason.size), min(150, reason.size)):
        errors = layout_errors(model, cluster, job, layout_at(cols, i))
        assert (reason[i] < 0) == (not errors)
        if errors:
            assert rules.RULES[reason[i]].message(ctx, rules.row_at(cols, i)) == errors[0]


def test_divisors_from_the_factorisation():
    for n in (1, 2, 12, 97, 360, 1024, 3072):
        assert divisors(n) == [d for d in range(1, n + 1) if n % d == 0]
    assert len(divisors(10**9)) == 100 and divisors(2**31 - 1) == [1, 2**31 - 1]


def test_fast_scorer_equals_estimate(space):
    """Step time, most-loaded-rank memory and the fits verdict, on a random sample."""
    model, cluster, job, cols = space
    valid = take(cols, _reasons(model, cluster, job, cols) < 0)
    rows = random.Random(2).sample(range(valid["dp"].size), min(40, valid["dp"].size))
    sample = take(valid, np.array(rows))
    scorer = Scorer(model, lambda w: cluster, job)
    mem, step = scorer.memory(sample), scorer.step_time(sample)
    for k in range(len(rows)):
        est = estimate(Plan(model=model, cluster=cluster, job=job, layout=layout_at(sample, k)))
        assert step[k] == pytest.approx(est.step_s, rel=1e-9)
        assert mem[k] == pytest.approx(est.memory.total_bytes, rel=1e-9)
        assert (mem[k] <= cluster.profile.gpu.memory_bytes) == est.fits


def test_memory_verdict_with_limit_is_exact(space):
    """The early-stopping memory pass gives the same fits verdict as the full one."""
    model, cluster, job, cols = space
    valid = take(cols, _reasons(model, cluster, job, cols) < 0)
    limit = 0.9 * cluster.profile.gpu.memory_bytes
    full = Scorer(model, lambda w: cluster, job).memory(valid)
    fast = Scorer(model, lambda w: cluster, job).memory(valid, limit)
    assert np.array_equal(full <= limit, fast <= limit)
    assert np.array_equal(full[full <= limit], fast[full <= limit])


def _brute_force(model, cluster, job):
    """Every distinct valid layout by plain loops over the fields (the definition); dp_shard = dp
    is the same layout as dp_shard 0 (the whole dp group), so only 0 stands for it."""
    world, L = cluster.world_size, model.num_layers
    found = set()
    for tp, pp in itertools.product(range(1, world + 1), repeat=2):
        if world % (tp * pp):
            continue
        dp = world // (tp * pp)
        for mb, sp, zero, rc, every, sched, v, shard in itertools.product(
                range(1, job.global_batch + 1), (False, True), range(4), RECOMPUTE,
                RECOMPUTE_EVERY_CHOICES, SCHEDULES, range(1, L + 1), [0, *range(1, dp)]):
            if job.global_batch % (dp * mb) or (sp and tp == 1) or (zero and dp == 1):
                continue
            if pp == 1 and sched != "1f1b" or sched in INTERLEAVED and L % (pp * v):
                continue
            lay = Layout(dp=dp, tp=tp, pp=pp, sequence_parallel=sp, zero_stage=zero,
                         micro_batch=mb, num_microbatches=job.global_batch // (dp * mb),
                         schedule=sched, virtual_stages=v, recompute=rc, recompute_every=every,
                         dp_shard=shard)
            if not layout_errors(model, cluster, job, lay):
                found.add(lay)
    return found


def test_enumeration_is_complete():
    model, cluster, job = _inputs("tiny-gpt", "cpu", 1, 4, 4, 256, "torch", "flash", "bf16")
    cols, _ = enumerate_space(model, job, cluster.world_size, cluster.profile.gpus_per_node)
    valid = take(cols, _reasons(model, cluster, job, cols) < 0)
    ours = {layout_at(valid, i) for i in range(valid["dp"].size)}
    assert len(ours) == valid["dp"].size  # no duplicates
    assert ours == _brute_force(model, cluster, job)


@pytest.fixture(scope="module")
def result():
    model, cluster, job = _inputs("llama2-70b", "a100-80g", 2, 0, 64, 4096, "torch", "flash",
                                  "bf16")
    return search(model, cluster, job, SearchOptions(top=8))


def test_top_plans_are_exact_estimates_in_order(result):
    assert len(result.ranked) == min(8, result.num_fit) and result.num_fit >= 3
    t = result.fit_table
    limit = 0.9 * result.cluster.profile.gpu.memory_bytes
    for c in result.ranked:
        fresh = estimate(c.plan)
        assert c.step_s == fresh.step_s and c.total_bytes == fresh.memory.total_bytes
        assert c.total_bytes <= limit
        row = next(i for i in range(t["dp"].size) if layout_at(t, i) == c.layout)
        assert t["step_s"][row] == pytest.approx(c.step_s, rel=1e-9)
    feasible = result.feasible
    assert len(feasible) == result.num_fit and feasible[0].layout == result.ranked[0].layout
    speeds = [c.tokens_per_s for c in result.ranked]
    assert speeds == sorted(speeds, reverse=True)
    assert max(t["tokens_per_s"]) == pytest.approx(speeds[0], rel=1e-9)


def test_search_is_deterministic(result):
    again = search(result.model, result.cluster, result.job, SearchOptions(top=8))
    assert [c.layout for c in again.ranked] == [c.layout for c in result.ranked]
    assert again.rejections == result.rejections


def test_every_returned_plan_round_trips_json(result):
    for c in result.ranked:
        saved = c.saved()
        text = json.dumps(saved.to_dict())
        back = Plan.from_dict(json.loads(text))
        assert back.to_dict() == saved.to_dict()
        assert back.estimate["tokens_per_s"] == pytest.approx(c.tokens_per_s)


def test_rejections_are_counted_with_real_examples(result):
    total = sum(r.count for r in result.rejections) + result.num_fit
    assert total == result.num_considered
    assert all(r.example for r in result.rejections)
    assert any(r.key == "memory" for r in result.rejections)


def test_why_lines_name_a_reason(result):
    lines = reasons(result)
    assert len(lines) == len(result.ranked) - 1
    assert all(": " in line for line in lines)
    a, b = result.ranked[0], result.ranked[-1]
    if a.tokens_per_s > b.tokens_per_s * 1.001:
        assert "% tokens/s" in why_better(a, b)


def test_headroom_and_max_tp():
    model, cluster, job = _inputs("llama2-13b", "a100-40g", 1, 0, 16, 4096, "torch", "flash",
                                  "bf16")
    loose = search(model, cluster, job, SearchOptions(headroom=0.0, top=1000))
    tight = search(model, cluster, job, SearchOptions(headroom=0.3, top=1000))
    assert tight.num_fit < loose.num_fit
    assert all(c.total_bytes <= 0.7 * cluster.profile.gpu.memory_bytes for c in tight.ranked)
    capped = search(model, cluster, job, SearchOptions(max_tp=2, top=1000))
    assert capped.ranked and all(c.layout.tp <= 2 for c in capped.ranked)
    two_nodes = Cluster(profile=cluster.profile, num_nodes=2)
    lifted = search(load_model("llama2-7b"), two_nodes, job, SearchOptions(max_tp=16))
    assert any(r.key == "tp_node" and "TP=16" in r.example for r in lifted.rejections)


def test_min_gpus_objective_and_target():
    model, cluster, job = _inputs("llama3-8b", "a100-80g", 2, 0, 64, 4096, "torch", "flash",
                                  "bf16")
    fast = search(model, cluster, job, SearchOptions(top=1)).best
    target = 0.3 * fast.tokens_per_s
    res = search(model, cluster, job, SearchOptions(objective="min-gpus",
                                                    target_tokens_per_s=target, top=3))
    best = res.best
    assert best.tokens_per_s >= target and best.num_gpus <= 16
    assert [c.num_gpus for c in res.ranked] == sorted(c.num_gpus for c in res.ranked)
    with pytest.raises(ValueError, match="token-budget"):
        SearchOptions(objective="time-to-train")


def test_fewer_gpus_table_equals_estimate():
    """With several GPU counts in one search (shared caches), sampled rows are still exact."""
    model, cluster, job = _inputs("llama2-13b", "a100-80g", 3, 0, 48, 4096, "torch", "flash",
                                  "bf16")
    res = search(model, cluster, job, SearchOptions(allow_fewer_gpus=True))
    t = res.fit_table
    assert set(t["world"].tolist()) == {8, 16, 24}
    for i in random.Random(3).sample(range(t["dp"].size), 30):
        plan = Plan(model=model, cluster=cluster_for(cluster, int(t["world"][i])), job=job,
                    layout=layout_at(t, i))
        est = estimate(plan)
        assert t["step_s"][i] == pytest.approx(est.step_s, rel=1e-9)
        assert t["total_bytes"][i] == pytest.approx(est.memory.total_bytes, rel=1e-9)


def test_suggest_cli_json_and_out(tmp_path, capsys):
    out = tmp_path / "plan.json"
    args = ["--model", "llama2-7b", "--cluster", "a100-80g", "--nodes", "1",
            "--global-batch", "16", "--seq-len", "4096"]
    assert main(["suggest", *args, "--top", "3", "--json", "--out", str(out)]) == 0
    plans = json.loads(capsys.readouterr().out)
    assert len(plans) == 3
    assert main(["estimate", "--plan", str(out), "--json"]) == 0
    single = json.loads(capsys.readouterr().out)
    assert set(plans[0]) == set(single)
    assert plans[0]["tokens_per_s"] == pytest.approx(single["tokens_per_s"])
    saved = Plan.load(out)
    assert saved.estimate["tokens_per_s"] == pytest.approx(plans[0]["tokens_per_s"])
    assert main(["suggest", *args, "--top", "3", "--rank", "2", "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "Why each beats the next" in text and "Rejected layouts by reason" in text
    assert Plan.load(out).estimate["tokens_per_s"] == pytest.approx(plans[1]["tokens_per_s"])


def _one_line_error(capsys, argv) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and err.startswith("planner suggest: error:")
    return err


def test_impossible_request_is_one_line(capsys):
    err = _one_line_error(capsys, ["suggest", "--model", "llama2-70b", "--cluster", "a100-80g",
                                   "--gpus", "7", "--global-batch", "7", "--seq-len", "4096"])
    assert "nothing fits" in err and "GiB" in err
    err = _one_line_error(capsys, ["suggest", "--model", "llama2-7b", "--cluster", "v100-16g",
                                   "--global-batch", "8", "--seq-len", "1024"])
    assert "bf16" in err


def test_nothing_fits_says_what_would(capsys):
    argv = ["suggest", "--model", "llama2-70b", "--cluster", "a100-80g", "--nodes", "1",
            "--global-batch", "8", "--seq-len", "4096"]
    assert main(argv) == 2
    out = capsys.readouterr().out
    assert "Nothing fits" in out and "least memory" in out
    assert "more node(s)" in out and "tokens/s" in out


def test_searches_that_would_not_finish_are_refused():
    """Every whole-node count of 4,096 nodes, or a space of over 10^6 layouts: one line, at
    once, instead of minutes of enumeration."""
    model, job = load_model("llama3-8b"), Job(global_batch=2**20, seq_len=2048)
    with pytest.raises(ValueError, match="would search 4,096 GPU counts"):
        search(model, load_cluster("a100-80g", 4096), job,
               SearchOptions(top=1, allow_fewer_gpus=True))
    with pytest.raises(ValueError, match="would enumerate more than"):
        search(model, load_cluster("a100-80g", 200), job,
               SearchOptions(top=1, allow_fewer_gpus=True))
