import json

import pytest

from planner.cost.estimate import estimate
from planner.hardware import load_cluster
from planner.job import Job
from planner.plan import SCHEMA_VERSION, Layout, Plan
from planner.presets import MODEL_PRESETS


def _plan(model="llama2-7b", cluster="a100-80g", nodes=1, job=None, **layout):
    job = job or Job(global_batch=32, seq_len=4096)
    return Plan(model=MODEL_PRESETS[model], cluster=load_cluster(cluster, nodes), job=job,
                layout=Layout(**layout))


@pytest.mark.parametrize("layout, message", [
    (dict(dp=4, tp=1, num_microbatches=8), "dp\\*tp\\*pp = 4\\*1\\*1 = 4 does not equal the "
                                           "cluster's 8 GPUs"),
    (dict(tp=16, dp=1, num_microbatches=32, nodes=2), "TP=16 needs 16 GPUs per node; a node has 8"),
    (dict(dp=8, micro_batch=3, num_microbatches=1), "global batch 32 != micro batch 3 x 1 "
                                                    "micro-batches x dp 8 = 24"),
    (dict(dp=8, num_microbatches=4, sequence_parallel=True), "sequence_parallel needs tp > 1"),
    (dict(tp=8, num_microbatches=32, zero_stage=2), "ZeRO-2 shards over data parallel ranks; "
                                                    "it needs dp > 1"),
    (dict(pp=8, num_microbatches=33 - 1, schedule="interleaved_1f1b", virtual_stages=1),
     "needs virtual_stages >= 2"),
    (dict(pp=8, num_microbatches=4, micro_batch=8, schedule="interleaved_1f1b",
          virtual_stages=2), "micro-batches \\(4\\) divisible by pp \\(8\\)"),
])
def test_validation_names_the_numbers(layout, message):
    nodes = layout.pop("nodes", 1)
    with pytest.raises(ValueError, match=message):
        _plan(nodes=nodes, **layout)


def test_tp_must_divide_kv_heads():
    job = Job(global_batch=8, seq_len=1024)
    with pytest.raises(ValueError, match="tp=8 must divide num_heads 8 and num_kv_heads 4"):
        Plan(model=MODEL_PRESETS["tiny"].__class__(**{**MODEL_PRESETS["tiny"].to_dict(),
                                                      "max_seq_len": 1024}),
             cluster=load_cluster("cpu", 1), job=job,
             layout=Layout(tp=8, num_microbatches=8))


def test_bf16_on_v100_is_an_error():
    with pytest.raises(ValueError, match="precision bf16 is not supported by profile v100-16g"):
        _plan(model="gpt2-1.5b", cluster="v100-16g", job=Job(global_batch=8, seq_len=1024),
              dp=8)


def test_plan_json_round_trip_with_estimate(tmp_path):
    plan = _plan(dp=2, tp=2, pp=2, num_microbatches=16, zero_stage=1,
                 sequence_parallel=True, recompute="selective")
    plan = plan.with_estimate(estimate(plan).to_dict())
    path = tmp_path / "plan.json"
    plan.save(path)
    loaded = Plan.load(path)
    assert loaded == plan
    saved = json.loads(path.read_text())
    assert saved["schema_version"] == SCHEMA_VERSION and "plan" not in saved["estimate"]
    assert saved["estimate"]["time"]["step_s"] == estimate(plan).step_s


def test_version_1_plans_still_load_and_lose_the_estimates_plan_copy():
    plan = _plan(dp=8, num_microbatches=4)
    old = {**plan.to_dict(), "schema_version": 1, "estimate": estimate(plan).to_dict()}
    assert "plan" in old["estimate"]
    loaded = Plan.from_dict(old)
    assert loaded.schema_version == SCHEMA_VERSION and "plan" not in loaded.estimate
    assert loaded.estimate["time"] == old["estimate"]["time"]


@pytest.mark.parametrize("version", [1, 2])
def test_older_layouts_without_recompute_every_and_compile_take_their_defaults(version):
    plan = _plan(dp=8, num_microbatches=4)
    old = plan.to_dict()
    old["schema_version"] = version
    for key in ("recompute_every", "compile"):
        del old["layout"][key]
    assert Plan.from_dict(old).layout == plan.layout
    with pytest.raises(ValueError, match="missing key 'recompute_every'"):
        Plan.from_dict({**old, "schema_version": 3})


def test_version_3_models_without_moe_keys_are_dense():
    plan = _plan(dp=8, num_microbatches=4)
    old = plan.to_dict()
    old["schema_version"] = 3
    for key in ("attention_head_dim", "moe", "mla"):
        del old["model"][key]
    assert Plan.from_dict(old).model == plan.model
    with pytest.raises(ValueError, match="missing key 'attention_head_dim'"):
        Plan.from_dict({**old, "schema_version": 4})


@pytest.mark.parametrize("part", ["", "layout", "job", "model"])
def test_every_key_of_a_plan_is_required(part):
    """Dropping layout.zero_stage or job.precision must not turn the plan into another one."""
    data = _plan(dp=8, num_microbatches=4, zero_stage=1).to_dict()
    section = data[part] if part else data
    for key in list(section):
        broken = json.loads(json.dumps(data))
        del (broken[part] if part else broken)[key]
        with pytest.raises(ValueError, match=f"missing key '{key}'"):
            Plan.from_dict(broken)


def test_plan_rejects_unknown_keys_and_versions(tmp_path):
    data = _plan(dp=8, num_microbatches=4).to_dict()
    with pytest.raises(ValueError, match="unknown key 'gpus'"):
        Plan.from_dict({**data, "gpus": 8})
    with pytest.raises(ValueError, match="schema_version 99"):
        Plan.from_dict({**data, "schema_version": 99})
    bad = dict(data, layout={**data["layout"], "zero_stage": 5})
    with pytest.raises(ValueError, match="zero_stage must be 0, 1, 2 or 3, got 5"):
        Plan.from_dict(bad)


def test_pytorch_1f1b_needs_as_many_microbatches_as_stages():
    """torch.distributed.pipelining.Schedule1F1B refuses n_microbatches < pp."""
    with pytest.raises(ValueError, match="1F1B schedule needs at least as many micro-batches "
                                         "\\(2\\) as stages \\(pp=4\\)"):
        _plan(pp=4, dp=2, zero_stage=3, micro_batch=8, num_microbatches=2)
    _plan(pp=4, dp=2, zero_stage=3, micro_batch=8, num_microbatches=2, schedule="gpipe")


def test_ddp_under_gpipe_or_short_interleaving_is_refused():
    """DDP (ZeRO-0/1, no TP) crashes under PyTorch's GPipe schedule and under an interleaved one
    with no more micro-batches than chunks; FSDP2 (ZeRO-2) and TP's replicate run them."""
    with pytest.raises(ValueError, match="schedule gpipe with DDP \\(ZeRO-0, dp=2\\)"):
        _plan(pp=4, dp=2, micro_batch=2, num_microbatches=8, schedule="gpipe")
    with pytest.raises(ValueError, match="more micro-batches \\(8\\) than chunks "
                                         "\\(pp x virtual_stages = 8\\)"):
        _plan(pp=4, dp=2, zero_stage=1, micro_batch=2, num_microbatches=8,
              schedule="interleaved_1f1b", virtual_stages=2)
    _plan(pp=4, dp=2, zero_stage=2, micro_batch=2, num_microbatches=8, schedule="gpipe")
    _plan(pp=4, dp=2, micro_batch=1, num_microbatches=16, schedule="interleaved_1f1b",
          virtual_stages=2)
    _plan(pp=2, dp=2, tp=2, micro_batch=2, num_microbatches=8, schedule="gpipe")


def test_expert_parallelism_needs_an_moe_model():
    with pytest.raises(ValueError, match="ep=2 etp=1: model llama2-7b has no experts"):
        _plan(dp=8, num_microbatches=4, ep=2)
