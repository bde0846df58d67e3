"""FP8 training: the job fields and their rules, each cost term (GEMM rate, cast kernels, weight
copies, saved inputs, fp8 all-gather), the bf16 comparison, the exports and the runtime's
refusals (planner/cost/fp8.py, runtime/fp8.py)."""

import dataclasses
import json

import pytest

from planner.cost import fp8
from planner.cost.comm_plan import dp_collectives
from planner.cost.compute import _attention_times, gemm_time, layer_times, linear_gemm_time
from planner.cost.estimate import estimate
from planner.cost.fields import call, plan_fields, with_rank
from planner.cost.flops import Gemm
from planner.cost.ops import ops
from planner.export import deepspeed_config, megatron
from planner.hardware import load_cluster
from planner.job import Job
from planner.plan import Layout, Plan, layout_errors
from planner.presets import MODEL_PRESETS

MODEL = MODEL_PRESETS["llama3-8b"]


def _job(precision="fp8", recipe="tensorwise", engine="torch", seq=4096):
    return Job(global_batch=8, seq_len=seq, precision=precision,
               fp8_recipe=recipe if precision == "fp8" else "none", engine=engine)


def _plan(layout, profile="h100-80g", **job):
    return Plan(model=MODEL, cluster=load_cluster(profile, 1), job=_job(**job), layout=layout)


FSDP = Layout(dp=8, zero_stage=3)
DIST_OPT = Layout(dp=8, zero_stage=1)


# --- job fields ---------------------------------------------------------------------------

def test_fp8_needs_a_recipe_and_a_recipe_needs_fp8():
    with pytest.raises(ValueError, match="precision fp8 needs an fp8_recipe"):
        Job(global_batch=8, seq_len=128, precision="fp8")
    with pytest.raises(ValueError, match="fp8_recipe rowwise needs precision fp8, got bf16"):
        Job(global_batch=8, seq_len=128, precision="bf16", fp8_recipe="rowwise")
    with pytest.raises(ValueError, match="fp8_recipe"):
        Job(global_batch=8, seq_len=128, precision="fp8", fp8_recipe="mxfp8")


def test_job_round_trip_and_older_jobs_without_the_field():
    job = _job(recipe="rowwise")
    assert Job.from_dict(job.to_dict()) == job
    bf16 = _job(precision="bf16")
    assert "fp8_recipe" not in bf16.to_dict()  # a pre-FP8 job reads back unchanged
    assert Job.from_dict(bf16.to_dict()).fp8_recipe == "none"
    stripped = {k: v for k, v in job.to_dict().items() if k != "fp8_recipe"}
    with pytest.raises(ValueError, match="missing key 'fp8_recipe'"):
        Job.from_dict(stripped)  # an fp8 job must name its recipe


def test_fp8_plan_saves_and_loads(tmp_path):
    plan = _plan(FSDP, recipe="rowwise")
    plan.save(tmp_path / "p.json")
    data = json.loads((tmp_path / "p.json").read_text())
    assert data["job"]["fp8_recipe"] == "rowwise"
    assert Plan.load(tmp_path / "p.json") == plan


def test_dtype_is_bf16_under_fp8():
    assert _job().dtype == "bf16" and _job(precision="fp16").dtype == "fp16"


# --- rules --------------------------------------------------------------------------------

@pytest.mark.parametrize("profile", ["a100-80g", "v100-32g"])
def test_gpus_without_fp8_are_refused_with_the_reason(profile):
    errors = layout_errors(MODEL, load_cluster(profile, 1), _job(), FSDP)
    assert any("has no FP8 tensor cores" in e and profile in e for e in errors)


@pytest.mark.parametrize("engine,recipe,words", [
    ("torch", "delayed", "fp8_recipe delayed is not a torch engine recipe"),
    ("megatron", "rowwise", "fp8_recipe rowwise is not a megatron engine recipe"),
    ("deepspeed", "tensorwise", "DeepSpeed 0.19.8 has no FP8 training"),
])
def test_recipe_engine_combinations(engine, recipe, words):
    lay = DIST_OPT if engine != "torch" else FSDP
    errors = layout_errors(MODEL, load_cluster("h100-80g", 1),
                           _job(recipe=recipe, engine=engine), lay)
    assert any(words in e for e in errors)


@pytest.mark.parametrize("engine,recipe", [("torch", "tensorwise"), ("torch", "rowwise"),
                                           ("megatron", "delayed"), ("megatron", "tensorwise")])
def test_supported_combinations_are_valid(engine, recipe):
    lay = FSDP if engine == "torch" else DIST_OPT
    assert layout_errors(MODEL, load_cluster("h100-80g", 1),
                         _job(recipe=recipe, engine=engine), lay) == []


def test_torch_fp8_refuses_tensor_parallelism():
    errors = layout_errors(MODEL, load_cluster("h100-80g", 1), _job(), Layout(dp=4, tp=2))
    assert any("precision fp8 with tp=2" in e for e in errors)
    assert layout_errors(MODEL, load_cluster("h100-80g", 1), _job(engine="megatron",
                         recipe="delayed"), Layout(dp=4, tp=2, zero_stage=1, micro_batch=2)) == []


# --- GEMMs --------------------------------------------------------------------------------

def test_linear_gemms_at_the_fp8_rate_and_recipe_efficiency():
    gpu = load_cluster("h100-80g", 1).profile.gpu
    g = Gemm("mm", 8192, 4096, 14336, 1)
    over = gpu.kernel_overhead_s
    bf16 = gemm_time(gpu, g, "bf16") - over
    tensorwise = linear_gemm_time(gpu, g, _job()) - over
    rowwise = linear_gemm_time(gpu, g, _job(recipe="rowwise")) - over
    ratio = gpu.peak_flops["fp8"] / gpu.peak_flops["bf16"] * fp8.FP8_EFFICIENCY_VS_BF16
    assert bf16 / tensorwise == pytest.approx(ratio)
    assert rowwise / tensorwise == pytest.approx(1 / fp8.ROWWISE_GEMM_RATE)
    assert linear_gemm_time(gpu, g, _job(precision="bf16")) == gemm_time(gpu, g, "bf16")


def test_attention_stays_bf16():
    gpu = load_cluster("h100-80g", 1).profile.gpu
    assert _attention_times(gpu, MODEL, _job(), 1, 1) == \
        _attention_times(gpu, MODEL, _job(precision="bf16"), 1, 1)


def test_only_the_block_linears_speed_up():
    gpu = load_cluster("h100-80g", 1).profile.gpu
    shape = {"tp": 1, "sequence_parallel": False, "micro_batch": 1}
    a, b = layer_times(gpu, MODEL, _job(), **shape), \
        layer_times(gpu, MODEL, _job(precision="bf16"), **shape)
    assert a.gemm_fwd_s < b.gemm_fwd_s and a.attention_fwd_s == b.attention_fwd_s
    assert a.elementwise_fwd_s > b.elementwise_fwd_s  # the casts


# --- cast, amax, scale and transpose kernels ----------------------------------------------

def _linears(seq=4096):
    rows = ops(MODEL, "bf16", "block", "fwd", tp=1, micro_batch=1, seq_len=seq)
    out = []
    for op in rows:
        if op.name == "mm" and op.module.startswith(("attn.", "mlp.")):
            m, k, n = op.mkn
            out.append((m * k, k * n, m * n))
    return out


def test_linears_come_from_the_census():
    lin = _linears()
    assert len(lin) == 7  # q, k, v, o, gate, up, down
    h, f = MODEL.hidden_size, MODEL.ffn_hidden_size
    assert sum(w for _, w, _ in lin) == fp8.linear_weight_numel(MODEL, 1) == \
        2 * h * h + 2 * h * MODEL.kv_hidden_size + 3 * h * f


def test_eager_torchao_cast_traffic():
    lin = _linears()
    shape = {"tp": 1, "micro_batch": 1}
    fwd = fp8.cast_traffic(MODEL, _job(), "fwd", **shape)
    assert fwd == (33 * sum(x + w for x, w, _ in lin), 2 * 10 * len(lin))
    bwd = fp8.cast_traffic(MODEL, _job(), "bwd", **shape)
    # grad_output twice, input, weight; three fp8 layout copies (read + write)
    assert bwd[0] == sum(33 * (2 * g + x + w) + 2 * (w + g + x) for x, w, g in lin)
    gathered = fp8.cast_traffic(MODEL, _job(), "fwd", zero_stage=3, **shape)
    assert gathered[0] == 33 * sum(x for x, _, _ in lin)  # weights arrive in fp8
    rowwise = fp8.cast_traffic(MODEL, _job(recipe="rowwise"), "fwd", zero_stage=3, **shape)
    assert rowwise == fwd  # no fp8 all-gather for rowwise
    compiled = fp8.cast_traffic(MODEL, _job(), "fwd", compiled=True, **shape)
    assert compiled[0] == 5 * sum(x + w for x, w, _ in lin)
    assert fp8.cast_traffic(MODEL, _job(precision="bf16"), "fwd", **shape) == (0.0, 0)


def test_transformer_engine_cast_traffic():
    lin = _linears()
    shape = {"tp": 1, "micro_batch": 1}
    delayed = fp8.cast_traffic(MODEL, _job(engine="megatron", recipe="delayed"), "fwd", **shape)
    current = fp8.cast_traffic(MODEL, _job(engine="megatron"), "fwd", **shape)
    assert delayed[0] == 4 * sum(x + w for x, w, _ in lin)
    assert current[0] == 6 * sum(x + w for x, w, _ in lin)  # + the amax pass
    bwd = fp8.cast_traffic(MODEL, _job(engine="megatron", recipe="delayed"), "bwd", **shape)
    assert bwd[0] == 4 * sum(g for _, _, g in lin)


# --- memory -------------------------------------------------------------------------------

def _mem(plan):
    return estimate(plan).memory


@pytest.mark.parametrize("engine,recipe,lay", [("torch", "tensorwise", FSDP),
                                               ("torch", "rowwise", FSDP),
                                               ("megatron", "delayed", DIST_OPT)])
def test_model_states_unchanged(engine, recipe, lay):
    a = _mem(_plan(lay, engine=engine, recipe=recipe))
    b = _mem(_plan(lay, engine=engine, precision="bf16"))
    for key in ("weights_bytes", "gradients_bytes", "optimizer_bytes"):
        assert getattr(a, key) == getattr(b, key)


def test_torchao_saves_bf16_inputs_and_gathers_fp8_weights():
    a, b = _mem(_plan(FSDP)), _mem(_plan(FSDP, precision="bf16"))
    assert a.activations_bytes == b.activations_bytes
    transient = fp8.weight_copy_bytes(MODEL, _job(), tp=1, micro_batch=1, rank_layers=32)
    x, w, g = max(_linears(), key=lambda t: sum(t))
    assert transient == 2 * (x + w + g)
    # ZeRO-3 prefetch: two blocks gathered, their linears in 1 byte instead of 2
    saved = 2 * fp8.linear_weight_numel(MODEL, 1)
    assert a.gathered_params_bytes == pytest.approx(b.gathered_params_bytes - saved + transient)
    r = _mem(_plan(FSDP, recipe="rowwise"))
    assert r.gathered_params_bytes == pytest.approx(b.gathered_params_bytes + transient)


def test_transformer_engine_weight_copies_and_fp8_saved_inputs():
    a = _mem(_plan(DIST_OPT, engine="megatron", recipe="delayed"))
    b = _mem(_plan(DIST_OPT, engine="megatron", precision="bf16"))
    assert a.gathered_params_bytes - b.gathered_params_bytes == \
        2 * fp8.linear_weight_numel(MODEL, 1) * MODEL.num_layers
    tokens, h, f = 4096, MODEL.hidden_size, MODEL.ffn_hidden_size
    per_layer = 2 * tokens * h + tokens * f - tokens * h  # norm outputs, down in; o in (+1)
    saving = b.activations_bytes - a.activations_bytes
    assert saving == pytest.approx(per_layer * MODEL.num_layers * b.inflight_microbatches)


# --- communication ------------------------------------------------------------------------

def _gather_bytes(plan):
    named = with_rank(plan_fields(plan), 0)
    return {c.name: c for c in call(dp_collectives, named)}["dp_param_all_gather"]


def test_fsdp_fp8_all_gather_halves_the_linear_weights():
    a, b = _gather_bytes(_plan(FSDP)), _gather_bytes(_plan(FSDP, precision="bf16"))
    lin = fp8.linear_weight_numel(MODEL, 1) * MODEL.num_layers
    assert (b.bytes_each - a.bytes_each) * a.count / 2 == pytest.approx(lin)  # 2 gathers/step
    assert _gather_bytes(_plan(FSDP, recipe="rowwise")).bytes_each == b.bytes_each


# --- the bf16 comparison ------------------------------------------------------------------

def test_fp8_gain_against_the_bf16_counterpart():
    plan = _plan(FSDP)
    gain = estimate(plan).fp8_gain()
    base = estimate(dataclasses.replace(plan, job=_job(precision="bf16")))
    assert gain["speedup"] == pytest.approx(estimate(plan).tokens_per_s / base.tokens_per_s)
    assert gain["bf16_total_bytes"] == base.memory.total_bytes
    assert estimate(plan).to_dict()["fp8_gain"] == gain
    assert estimate(dataclasses.replace(plan, job=_job(precision="bf16"))).fp8_gain() is None
    assert "fp8_gain" not in base.to_dict()


def test_compiled_tensorwise_beats_rowwise_and_bf16():
    lay = dataclasses.replace(FSDP, compile=True)
    t, r = estimate(_plan(lay)).fp8_gain(), estimate(_plan(lay, recipe="rowwise")).fp8_gain()
    assert t["speedup"] > r["speedup"] and t["speedup"] > 1


# --- exports ------------------------------------------------------------------------------

def test_megatron_export_flags():
    text = megatron(_plan(DIST_OPT, engine="megatron", recipe="delayed"))
    assert "--fp8-format hybrid" in text.replace("\n    ", " ")
    assert "--fp8-recipe delayed" in text.replace("\n    ", " ") and "--bf16" in text
    current = megatron(_plan(DIST_OPT, engine="megatron")).replace("\n    ", " ")
    assert "--fp8-recipe tensorwise" in current
    with pytest.raises(ValueError, match="no torchao-style rowwise"):
        megatron(_plan(FSDP, recipe="rowwise"))


def test_megatron_flags_exist_in_megatron_core():
    mc = pytest.importorskip("megatron.core.transformer.transformer_config")
    fields = {f.name: f for f in dataclasses.fields(mc.TransformerConfig)}
    assert fields["fp8"].metadata["argparse_meta"]["arg_names"] == ["--fp8-format"]
    for name in ("fp8_recipe", "fp8_amax_history_len", "fp8_amax_compute_algo"):
        assert name in fields
    assert "hybrid" in str(fields["fp8"].type) and "delayed" in str(fields["fp8_recipe"].type)


def test_deepspeed_refuses_fp8():
    with pytest.raises(ValueError, match="DeepSpeed cannot express this plan: precision fp8"):
        deepspeed_config(_plan(FSDP))


# --- CLI ----------------------------------------------------------------------------------

def _cli(argv):
    from planner.cli import main
    return main(argv)


BASE = ["--model", "llama3-8b", "--cluster", "h100-80g", "--global-batch", "8",
        "--seq-len", "4096", "--dp", "8", "--zero", "3"]


def test_cli_recipe_flags(capsys):
    assert _cli(["estimate", *BASE, "--fp8-recipe", "rowwise"]) == 2
    assert "--fp8-recipe rowwise needs --precision fp8" in capsys.readouterr().err
    assert _cli(["estimate", *BASE, "--precision", "fp8", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["plan"]["job"]["fp8_recipe"] == "tensorwise"  # the torch engine's default
    assert out["fp8_gain"]["speedup"] > 0
    assert _cli(["estimate", *BASE, "--precision", "fp8"]) == 0
    assert "FP8 (tensorwise)" in capsys.readouterr().out
    a100 = [a if a != "h100-80g" else "a100-80g" for a in BASE]
    assert _cli(["estimate", *a100, "--precision", "fp8"]) == 2
    assert "no FP8 tensor cores" in capsys.readouterr().err


def test_suggest_says_what_fp8_gains(capsys):
    argv = ["suggest", "--model", "llama3-8b", "--cluster", "h100-80g", "--global-batch", "8",
            "--seq-len", "4096", "--precision", "fp8", "--top", "2"]
    assert _cli(argv) == 0
    assert "#1: FP8 (tensorwise)" in capsys.readouterr().out


# --- runtime ------------------------------------------------------------------------------

def test_runtime_refusals():
    from runtime.fp8 import fp8_refusal
    assert "need a CUDA GPU" in fp8_refusal(_job(), FSDP, cuda=False)
    assert "Transformer Engine" in fp8_refusal(_job(recipe="delayed", engine="megatron"),
                                               DIST_OPT, cuda=True)
    assert "tp=2" in fp8_refusal(_job(), Layout(dp=4, tp=2), cuda=True)
    assert fp8_refusal(_job(precision="bf16"), FSDP, cuda=False) == ""


@pytest.mark.gpu
def test_torchao_float8_block_trains_on_cuda():
    torch = pytest.importorskip("torch")
    pytest.importorskip("torchao")
    if not torch.cuda.is_available() or torch.cuda.get_device_capability() < (8, 9):
        pytest.skip("needs a CUDA GPU with FP8 tensor cores")
    from runtime.fp8 import apply_fp8
    from runtime.model import Transformer
    spec = dataclasses.replace(MODEL_PRESETS["tiny"], hidden_size=256, ffn_hidden_size=512,
                               num_heads=4, num_kv_heads=4)
    model = Transformer(spec).cuda().to(torch.bfloat16)
    apply_fp8(model, "tensorwise", zero_stage=0)
    kinds = {type(m).__name__ for m in model.layers.modules()}
    assert "Float8Linear" in kinds
    assert "Float8Linear" not in {type(m).__name__ for m in model.head.modules()}
    tokens = torch.randint(0, spec.vocab_size, (2, 64), device="cuda")
    loss = model(tokens).float().pow(2).mean()
    loss.backward()
    assert torch.isfinite(loss)


def test_simulator_runs_the_fp8_costs():
    from planner.sim.timeline import simulate
    lay = dataclasses.replace(FSDP, compile=True)
    sim = simulate(_plan(lay)).step_s / simulate(_plan(lay, precision="bf16")).step_s
    est = estimate(_plan(lay)).step_s / estimate(_plan(lay, precision="bf16")).step_s
    assert sim < 1
    assert sim == pytest.approx(est, rel=0.01)  # the simulator sees the same FP8 gain


def test_nothing_fits_says_fp8_is_no_memory_lever(capsys):
    argv = ["suggest", "--model", "llama3-70b", "--cluster", "h100-80g", "--global-batch", "8",
            "--seq-len", "8192", "--precision", "fp8"]
    assert _cli(argv) == 2
    out = capsys.readouterr()
    assert "FP8 is no memory lever: in bf16 that layout needs" in out.out + out.err


def test_op_policy_recompute_reruns_the_casts():
    from planner.cost.compute import op_policy_recompute_s
    gpu = load_cluster("h100-80g", 1).profile.gpu
    shape = {"tp": 1, "sequence_parallel": False, "micro_batch": 1}
    nbytes, kernels = fp8.cast_traffic(MODEL, _job(), "fwd", tp=1, micro_batch=1)
    cast_s = nbytes / (gpu.hbm_bandwidth_bytes_per_s * gpu.memory_efficiency) + \
        kernels * gpu.kernel_overhead_s
    with_casts = op_policy_recompute_s(gpu, MODEL, _job(), **shape)
    gemm_only = dataclasses.replace(_job(), fp8_recipe="rowwise")  # same casts, slower GEMMs
    assert with_casts > cast_s
    assert op_policy_recompute_s(gpu, MODEL, gemm_only, **shape) > with_casts
