"""The `deepspeed` engine: model states against the ZeRO paper's count (DeepSpeed's measured
allocation is checked by tests/test_export_consumers.py), the rules DeepSpeed's code imposes,
its communication and overlap, the export, and the search."""

import dataclasses

import pytest

from planner import export
from planner.cost import deepspeed as ds
from planner.cost.comm_plan import dp_collectives
from planner.cost.estimate import estimate
from planner.cost.fields import call, plan_fields, with_rank
from planner.cost.memory import zero_model_state_bytes
from planner.cost.params import count_parameters
from planner.hardware import load_cluster
from planner.job import Job
from planner.plan import Layout, Plan
from planner.presets import load_model
from planner.search.ranking import search

GIB = 2 ** 30
PSI = 8_030_261_248  # llama3-8b parameters (count_parameters, checked below)


def _plan(engine="deepspeed", precision="bf16", gpus=8, profile="h100-80g", **layout) -> Plan:
    base = dict(dp=gpus, tp=1, pp=1, micro_batch=1, num_microbatches=8, zero_stage=1,
                recompute="full")
    base.update(layout)
    lay = Layout(**base)
    return Plan(model=load_model("llama3-8b"), cluster=load_cluster(profile, 1), layout=lay,
                job=Job(global_batch=lay.dp * lay.micro_batch * lay.num_microbatches,
                        seq_len=4096, precision=precision, engine=engine))


@pytest.mark.parametrize("zero", [0, 1, 2, 3])
@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_weights_and_optimizer_are_the_zero_paper_count(zero, precision):
    """16-bit weights (partitioned at ZeRO-3) and K = 12 bytes (partitioned from ZeRO-1):
    Rajbhandari et al. 2020, Table 1, without a pipeline."""
    got = ds.model_state_bytes(PSI, 8, zero, precision, pp=1)
    paper = zero_model_state_bytes(PSI, 8, zero, precision)
    assert got.weights_bytes == pytest.approx(paper.weights_bytes, rel=1e-9)
    assert got.optimizer_bytes == pytest.approx(paper.optimizer_bytes, rel=1e-9)


@pytest.mark.parametrize("zero,extra_per_param", [
    (0, 4),              # FP16_Optimizer's fp32 flat gradient at the step
    (1, (2 + 4) / 8),    # the 16-bit flat partition and its fp32 copy
    (2, 4 / 8),          # the fp32 copy of the 16-bit partition the paper counts
    (3, 4 / 8)])
def test_gradients_are_the_paper_count_plus_what_deepspeed_copies(zero, extra_per_param):
    got = ds.model_state_bytes(PSI, 8, zero, "bf16", pp=1).gradients_bytes
    paper = zero_model_state_bytes(PSI, 8, zero, "bf16").gradients_bytes
    assert got - paper == pytest.approx(extra_per_param * PSI, rel=1e-9)


def test_bf16_pipeline_without_zero_runs_bf16_optimizer_sharded_like_zero1():
    assert ds.optimizer_wrapper("bf16", 0, pp=2) == "BF16_Optimizer"
    assert ds.optimizer_wrapper("bf16", 0, pp=1) == "FP16_Optimizer"
    assert ds.optimizer_wrapper("fp16", 0, pp=2) == "FP16_Optimizer"
    assert ds.optimizer_wrapper("bf16", 1, pp=2) == "DeepSpeedZeroOptimizer"
    states = ds.model_state_bytes(PSI, 4, 0, "bf16", pp=2)
    assert states.optimizer_bytes == pytest.approx(12 * PSI / 4, rel=1e-9)
    # bf16 .grad + the bf16 accumulation buffer + the fp32 partition at the step
    assert states.gradients_bytes == pytest.approx((2 + 2 + 4 / 4) * PSI, rel=1e-9)
    text = export.deepspeed_config(_plan(dp=4, pp=2, zero_stage=0, num_microbatches=16))
    assert "BF16_Optimizer" in text["comment"] and "as planned" in text["comment"]


def test_fp32_zero_keeps_a_master_copy_and_fp32_without_zero_does_not():
    assert ds.model_state_bytes(1000, 2, 0, "fp32", 1).optimizer_bytes == 8 * 1000
    z1 = ds.model_state_bytes(1000, 2, 1, "fp32", 1)
    assert (z1.weights_bytes, z1.optimizer_bytes) == (4 * 1000, 12 * 500)


def test_llama3_8b_dp8_zero1_fits_under_deepspeed_where_the_torch_layout_does_not():
    assert count_parameters(load_model("llama3-8b")) == PSI
    ours, theirs = estimate(_plan(engine="torch")), estimate(_plan())
    assert not ours.fits and theirs.fits
    mem = theirs.memory
    assert mem.weights_bytes == pytest.approx(2 * PSI, rel=1e-9)
    assert mem.optimizer_bytes == pytest.approx(12 * PSI / 8, rel=1e-9)
    assert mem.gradients_bytes == pytest.approx((2 + 6 / 8) * PSI, rel=1e-9)
    # contiguous_gradients + overlap_comm: two reduce_bucket_size buckets of bf16
    assert mem.comm_buffers_bytes == 2 * 2 * ds.REDUCE_BUCKET_SIZE
    assert mem.gathered_params_bytes == 0
    # the tensors (weights, gradients, optimizer, buckets, activations); outside them the
    # profile's itemised context, NCCL, cuBLAS and allocator terms
    assert mem.tensor_bytes / GIB == pytest.approx(51.6, abs=0.05)


def test_zero3_holds_the_running_block_and_the_prefetch_bucket():
    mem = estimate(_plan(zero_stage=3)).memory
    spec = load_model("llama3-8b")
    block = count_parameters(dataclasses.replace(spec, num_layers=2)) \
        - count_parameters(dataclasses.replace(spec, num_layers=1))
    assert mem.gathered_params_bytes == 2 * (block + ds.PREFETCH_BUCKET_SIZE)
    assert mem.comm_buffers_bytes == 2 * ds.REDUCE_BUCKET_SIZE


def _dp_colls(plan):
    return {c.name: c for c in call(dp_collectives, with_rank(plan_fields(plan), 0))}


def test_gradients_reduced_in_bf16_and_zero2_gathers_once_per_step():
    z1, z2 = _dp_colls(_plan(zero_stage=1)), _dp_colls(_plan(zero_stage=2))
    assert z1["dp_reduce_scatter"].bytes_each == 2 * PSI
    assert z1["dp_param_all_gather"].bytes_each == 2 * PSI
    assert z2["dp_reduce_scatter"].count == 8 * z2["dp_param_all_gather"].count
    torch_z1 = _dp_colls(_plan(engine="torch"))
    assert torch_z1["dp_all_reduce"].bytes_each == 4 * PSI  # the torch engine is unchanged


def test_overlap_comm_from_zero1_but_not_without_zero_or_under_the_pipeline():
    def exposed(**layout):
        t = estimate(_plan(**layout)).time
        return t.dp_comm_exposed_s, t.dp_comm_total_s
    z0_exposed, z0_total = exposed(zero_stage=0)
    assert z0_exposed == pytest.approx(z0_total)
    z1_exposed, z1_total = exposed(zero_stage=1)
    assert z1_exposed < z1_total
    pp_exposed, pp_total = exposed(dp=4, pp=2, zero_stage=1, num_microbatches=16)
    assert pp_exposed == pytest.approx(pp_total)


@pytest.mark.parametrize("layout,message", [
    (dict(dp=4, pp=2, zero_stage=2, num_microbatches=16),
     ("ZeRO-2 with pp=2: DeepSpeed's pipeline engine asserts ZeRO-2 and ZeRO-3 are "
      "incompatible with pipeline parallelism; use ZeRO-0 or 1")),
    (dict(dp=4, pp=2, zero_stage=2, num_microbatches=16, schedule="gpipe"),
     "schedule gpipe: the deepspeed engine runs 1f1b only"),
    (dict(dp=2, tp=2, pp=2, zero_stage=1, num_microbatches=32),
     "tp=2 with pp=2: DeepSpeed runs tensor parallelism through AutoTP"),
    (dict(dp=4, tp=2, sequence_parallel=True, num_microbatches=16),
     "sequence_parallel: DeepSpeed's AutoTP has no sequence parallelism"),
])
def test_what_deepspeed_refuses_is_refused_in_one_line(layout, message):
    with pytest.raises(ValueError, match="^" + message.replace("(", r"\(")) as err:
        _plan(**layout)
    assert "\n" not in str(err.value)
    _plan(engine="torch", **layout)  # the torch engine runs each of these


def test_autotp_without_pipeline_or_sp_is_planned():
    est = estimate(_plan(dp=4, tp=2, num_microbatches=16))
    assert est.time.tp_comm_s > 0
    assert export.deepspeed_config(est.plan)["tensor_parallel"] == {"autotp_size": 2}


def test_export_sets_what_the_plan_assumed():
    cfg = export.deepspeed_config(_plan(zero_stage=2))
    assert cfg["communication_data_type"] == "bf16"
    assert cfg["data_types"] == {"grad_accum_dtype": "bf16"}
    assert cfg["zero_optimization"] == {
        "stage": 2, "overlap_comm": True, "contiguous_gradients": True,
        "reduce_bucket_size": ds.REDUCE_BUCKET_SIZE,
        "allgather_bucket_size": ds.ALLGATHER_BUCKET_SIZE}
    z3 = export.deepspeed_config(_plan(zero_stage=3))["zero_optimization"]
    assert z3["stage3_prefetch_bucket_size"] == ds.PREFETCH_BUCKET_SIZE
    assert z3["stage3_max_live_parameters"] == ds.MAX_LIVE_PARAMETERS
    # a torch-engine plan still asks DeepSpeed for fp32 reduction, as that plan counts
    assert export.deepspeed_config(_plan(engine="torch"))["communication_data_type"] == "fp32"


def test_estimate_text_names_deepspeeds_optimizer():
    from planner.report import estimate_text
    text = estimate_text(estimate(_plan(dp=4, pp=2, zero_stage=0, num_microbatches=16)))
    assert "engine: DeepSpeed BF16_Optimizer" in text
    assert "engine:" not in estimate_text(estimate(_plan(engine="torch")))


def test_suggest_searches_only_what_deepspeed_runs():
    cluster = load_cluster("h100-80g", 2)
    job = Job(global_batch=128, seq_len=4096, precision="bf16", engine="deepspeed")
    result = search(load_model("llama3-8b"), cluster, job, top=20)
    assert len(result.ranked) == 20
    for candidate in result.ranked:
        plan, lay = candidate.plan, candidate.layout
        assert lay.pp == 1 or (lay.schedule == "1f1b" and lay.zero_stage <= 1)
        assert not lay.sequence_parallel and (lay.tp == 1 or lay.pp == 1)
        assert export.deepspeed_config(plan)["data_types"] == {"grad_accum_dtype": "bf16"}
