"""LoRA (planner/lora.py, runtime/lora.py): data-parallel layouts train the adapters exactly like
one process (CPU, gloo, fp32), the base stays frozen and unchanged, per-rank parameter, gradient
and optimizer bytes equal the planner's (fp32 and bf16, whose frozen base is 16-bit), activation
bytes are within 10%; the cost model's FLOPs, rules and search use the adapters; merged weights
give the adapter model's logits."""

import dataclasses
import functools
import json
import subprocess
import sys

import pytest
import torch
from runtime_dist import SPEC, Layout, make_plan, train_worlds
from test_runtime_parity import _max_param_diff, check_memory

from planner.cost.estimate import estimate
from planner.cost.flops import lora_first_block_skip, microbatch_flops, model_flops_per_step
from planner.cost.params import count_parameters
from planner.job import Job
from planner.lora import LoraSpec
from planner.plan import Plan

STEPS = 3
LOSS_TOL = 2e-5
PARAM_TOL = 1e-4
LORA = LoraSpec(rank=4, alpha=8.0, targets=("q", "k", "v", "o", "down"))
GPT = dataclasses.replace(SPEC, name="test-gpt", arch="gpt", num_kv_heads=8,
                          tie_embeddings=True, linear_bias=True)
GPT_LORA = LoraSpec(rank=4, alpha=8.0, targets=("q", "v", "fc", "proj"))


def lora_plan(layout, spec=SPEC, precision="fp32", lora=LORA) -> Plan:
    plan = make_plan(layout, spec, precision)
    return dataclasses.replace(plan, job=dataclasses.replace(plan.job, lora=lora))


CASES = {
    "dp2": Layout(dp=2, micro_batch=2, num_microbatches=2),
    "zero1-dp2": Layout(dp=2, micro_batch=2, num_microbatches=2, zero_stage=1),
    "zero2-dp2": Layout(dp=2, micro_batch=2, num_microbatches=2, zero_stage=2),
    "zero3-dp2": Layout(dp=2, micro_batch=4, zero_stage=3),
    "pp2-1f1b": Layout(pp=2, micro_batch=2, num_microbatches=4),
    "recompute-full-dp2": Layout(dp=2, micro_batch=2, num_microbatches=2, recompute="full"),
    "cp2": Layout(cp=2, micro_batch=2, num_microbatches=4),
    "cp2xdp2-zero3": Layout(cp=2, dp=2, micro_batch=2, num_microbatches=2, zero_stage=3),
}
GPT_CASES = {"gpt-tied-pp2": Layout(pp=2, micro_batch=2, num_microbatches=4)}
BF16 = {"bf16-zero2": Layout(dp=2, micro_batch=2, num_microbatches=2, zero_stage=2),
        "bf16-ddp": Layout(dp=2, micro_batch=2, num_microbatches=2)}
REFERENCE = Layout(micro_batch=2, num_microbatches=4)


def _plans() -> dict:
    plans = {("llama", k): lora_plan(v) for k, v in CASES.items()}
    plans.update({("gpt", k): lora_plan(v, GPT, lora=GPT_LORA) for k, v in GPT_CASES.items()})
    plans.update({("bf16", k): lora_plan(v, precision="bf16") for k, v in BF16.items()})
    plans[("llama", "reference")] = lora_plan(REFERENCE)
    plans[("gpt", "reference")] = lora_plan(REFERENCE, GPT, lora=GPT_LORA)
    return plans


@functools.cache
def results() -> dict:
    return train_worlds(_plans(), STEPS)


@pytest.mark.parametrize("key", [("llama", k) for k in CASES] + [("gpt", k) for k in GPT_CASES])
def test_lora_layouts_train_like_one_process(key):
    got, want = results()[key], results()[(key[0], "reference")]
    loss_diff = max(abs(a - b) for a, b in zip(got["losses"], want["losses"]))
    param_diff = _max_param_diff(got["params"], want["params"])
    print(f"lora {key}: max |loss diff| {loss_diff:.2e}  max |param diff| {param_diff:.2e}")
    assert loss_diff <= LOSS_TOL and param_diff <= PARAM_TOL
    if key[0] == "llama":  # (3 steps on 3 different batches: gpt's loss need not fall)
        assert got["losses"][-1] < got["losses"][0]
    check_memory(_plans()[key], got["ranks"])


@pytest.mark.parametrize("name", BF16)
def test_bf16_lora_holds_the_frozen_base_in_bf16(name):
    got = results()[("bf16", name)]
    frozen = [v for k, v in got["params"].items() if ".lora_" not in k]
    assert {v.dtype for v in frozen} == {torch.bfloat16}
    assert {v.dtype for k, v in got["params"].items() if ".lora_" in k} == {torch.float32}
    check_memory(_plans()[("bf16", name)], got["ranks"])


def _initial(spec, lora=LORA, dtype=torch.float32):
    from runtime.lora import apply_lora
    from runtime.model import Transformer, materialize
    with torch.device("meta"):
        model = Transformer(spec)
    apply_lora(model, lora, dtype)
    materialize(model, torch.device("cpu"), 0)
    return model


def test_the_base_is_frozen_and_only_the_adapters_move():
    trained = results()[("llama", "dp2")]["params"]
    start = dict(_initial(SPEC).named_parameters())
    assert set(trained) == set(start)
    for name, value in trained.items():
        moved = not torch.equal(value, start[name].detach())
        assert moved == (".lora_" in name), name
    assert all(not p.requires_grad for n, p in start.items() if ".lora_" not in n)
    assert all(not p.detach().any() for n, p in start.items() if n.endswith("lora_B"))


def test_the_planner_counts_the_runtime_parameters_and_trained_ones():
    for spec, lora in ((SPEC, LORA), (GPT, GPT_LORA)):
        job = Job(global_batch=8, seq_len=32, lora=lora)
        model = _initial(spec, lora)
        assert sum(p.numel() for p in model.parameters()) == count_parameters(spec, job)
        trained = sum(p.numel() for p in model.parameters() if p.requires_grad)
        assert trained == count_parameters(spec, job, trainable_only=True)
    # llama, q, k, v, o and down adapted: r x (in + out) each
    h, kv, f, r = SPEC.hidden_size, SPEC.kv_hidden_size, SPEC.ffn_hidden_size, LORA.rank
    per_layer = r * ((h + h) + (h + kv) * 2 + (h + h) + (f + h))
    job = Job(global_batch=8, seq_len=32, lora=LORA)
    assert count_parameters(SPEC, job, trainable_only=True) == SPEC.num_layers * per_layer


def test_merged_weights_give_the_adapter_models_logits():
    from runtime.lora import merge
    from runtime.model import Transformer
    model = _initial(SPEC)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".lora_" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.1)
    tokens = torch.randint(0, SPEC.vocab_size, (2, 16), generator=gen)
    merged = merge(dict(model.state_dict()), LORA)
    assert not any(".lora_" in k for k in merged)
    plain = Transformer(SPEC)
    plain.load_state_dict(merged)
    with torch.no_grad():
        want, got = model(tokens), plain(tokens)
        base = _initial(SPEC)(tokens)
    assert torch.allclose(got, want, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(base, want, atol=1e-3)  # the adapters did change the model


def test_frozen_weights_skip_the_weight_gradient_gemms():
    """LoRA's FLOPs: every frozen GEMM costs forward + input gradient (2x, not 3x); adapters
    and the attention core 3x; the frozen vocabulary head 2x."""
    job = Job(global_batch=8, seq_len=2048, lora=LoraSpec(rank=16))
    from planner.presets import load_model
    spec = load_model("llama3-8b")
    mb = microbatch_flops(spec, 8, 2048, 1, job)
    full = microbatch_flops(spec, 8, 2048, 1)
    # q and o: r(h + h), k and v: r(h + kv), for each of 8 x 2048 tokens, 2 FLOPs a product
    assert mb.adapter_flops == 8 * 2048 * 2 * 16 * (2 * (4096 + 4096) + 2 * (4096 + 1024))
    want = spec.num_layers * (2 * full.layer_gemm_flops + 3 * full.layer_attention_flops
                              + 3 * mb.adapter_flops) + 2 * full.head_flops \
        - lora_first_block_skip(spec, 8 * 2048, job.lora)
    assert model_flops_per_step(spec, 8, 2048, job) == pytest.approx(want, rel=1e-12)
    assert model_flops_per_step(spec, 8, 2048, job) < 0.75 * model_flops_per_step(spec, 8, 2048)


def _llama8b(layout_kw, lora=None, gpus=8, batch=64):
    from planner.hardware import load_cluster
    from planner.presets import load_model
    job = Job(global_batch=batch, seq_len=2048, lora=lora)
    return Plan(model=load_model("llama3-8b"), cluster=load_cluster("a100-80g", 1, num_gpus=gpus),
                job=job, layout=Layout(**layout_kw))


def test_lora_memory_is_adapter_states_on_a_16_bit_base():
    lora = LoraSpec(rank=16, targets=("q", "k", "v", "o", "gate", "up", "down"))
    plan = _llama8b({"micro_batch": 1, "num_microbatches": 8}, lora, gpus=1, batch=8)
    mem = estimate(plan).memory
    job = plan.job
    assert mem.weights_bytes == 2 * count_parameters(plan.model, job, trainable_only=False) + \
        2 * count_parameters(plan.model, job, trainable_only=True)  # bf16 base + fp32 adapters
    assert mem.gradients_bytes == 4 * count_parameters(plan.model, job, trainable_only=True)
    full = estimate(dataclasses.replace(plan, job=dataclasses.replace(job, lora=None))).memory
    assert mem.fits and not full.fits
    quant = estimate(dataclasses.replace(plan, job=dataclasses.replace(
        job, lora=dataclasses.replace(lora, base_4bit=True)))).memory
    assert quant.weights_bytes < 0.4 * mem.weights_bytes


def test_the_search_picks_another_zero_stage_under_lora():
    out = {}
    for extra in ([], ["--lora-rank", "16", "--lora-targets", "q,k,v,o,gate,up,down"]):
        proc = subprocess.run([sys.executable, "-m", "planner.cli", "suggest", "--model",
                               "llama3-8b", "--cluster", "a100-80g", "--global-batch", "64",
                               "--seq-len", "2048", "--top", "1", "--json", *extra],
                              capture_output=True, text=True, check=True)
        best = json.loads(proc.stdout)[0]
        out[bool(extra)] = best
    assert out[False]["plan"]["layout"]["zero_stage"] == 3
    assert out[True]["plan"]["layout"]["zero_stage"] < 2
    assert out[True]["plan"]["job"]["lora"]["rank"] == 16


@pytest.mark.parametrize("args, message", [
    (["--lora-rank", "0"], "--lora-rank"),
    (["--lora-rank", "8", "--lora-targets", "q,x"], "lora target 'x' is not one of"),
    (["--lora-rank", "8", "--lora-targets", "fc"], "lora target 'fc' is not in llama3-8b"),
    (["--lora-rank", "8", "--tp", "2", "--dp", "4"], "LoRA with tp=2"),
    (["--lora-rank", "8", "--engine", "megatron", "--dp", "8"], "torch engine only"),
    (["--lora-targets", "q"], "--lora-targets needs --lora-rank"),
    (["--task", "classify", "--tp", "2", "--dp", "4"], "task classify with tp=2"),
])
def test_bad_lora_requests_are_one_line_errors(args, message):
    proc = subprocess.run([sys.executable, "-m", "planner.cli", "estimate", "--model",
                           "llama3-8b", "--cluster", "a100-80g", "--global-batch", "64",
                           "--seq-len", "2048", *(["--dp", "8"] if "--dp" not in args else []),
                           "--micro-batch", "1", *args], capture_output=True, text=True)
    assert proc.returncode == 2, proc.stderr
    assert message in proc.stderr and "Traceback" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1


def test_plans_round_trip_and_older_plans_are_full_pretraining():
    plan = _llama8b({"dp": 8, "micro_batch": 1, "num_microbatches": 8},
                    LoraSpec(rank=8, targets=("q", "v")))
    assert Plan.from_dict(json.loads(json.dumps(plan.to_dict()))) == plan
    old = plan.to_dict()
    old["schema_version"] = 3
    for key in ("task", "num_labels", "lora"):
        del old["job"][key]
    for key in ("attention_head_dim", "moe", "mla"):
        old["model"].pop(key, None)
    job = Plan.from_dict(old).job
    assert job.task == "pretrain" and job.lora is None


def test_exports_refuse_or_note_lora():
    from planner.export import deepspeed_config, megatron_args, torchrun
    plan = _llama8b({"dp": 8, "micro_batch": 1, "num_microbatches": 8}, LoraSpec(rank=16))
    with pytest.raises(ValueError, match="Megatron-LM cannot express this plan: LoRA"):
        megatron_args(plan)
    assert "LoRA rank 16 on q,k,v,o" in deepspeed_config(plan)["comment"]
    assert "--plan" in torchrun(plan)  # the runtime reads the lora field from the plan


def _checkpoint_scenario(tmp: str) -> dict:
    from test_runtime_checkpoint import CRASH_AT, EVERY, _run
    z1 = lora_plan(Layout(dp=2, micro_batch=2, num_microbatches=2, zero_stage=1))
    z3 = lora_plan(Layout(dp=2, micro_batch=4, zero_stage=3))
    out = {"ref": _run(z1, None)}
    out["crash"] = _run(z1, f"{tmp}/a", every=EVERY, crash_at=CRASH_AT)
    out["resume"] = _run(z1, f"{tmp}/a", resume=True)
    out["cross_z3"] = _run(z3, f"{tmp}/a", resume=True)
    return out


def test_lora_checkpoints_resume_exactly_and_under_another_zero_stage(tmp_path):
    from runtime_dist import run_world
    from test_runtime_checkpoint import EVERY, STEPS
    runs = run_world(2, _checkpoint_scenario, str(tmp_path))[0]
    want = [loss for s, loss in runs["ref"] if s >= EVERY]
    for key in ("resume", "cross_z3"):
        assert [s for s, _ in runs[key]] == list(range(EVERY, STEPS))
        assert max(abs(a - b) for (_, a), b in zip(runs[key], want)) < 1e-5, key


@pytest.mark.parametrize("lora, task", [(None, "pretrain"), (LORA, "pretrain"),
                                        (LoraSpec(rank=4, targets=("q", "v", "down")), "sft"),
                                        (LoraSpec(rank=2, targets=("k",)), "classify")])
def test_the_planners_gemm_flops_are_the_runtimes(lora, task):
    """torch.utils.flop_counter over one forward + backward of the runtime model equals the
    planner's model FLOPs less the attention core (FlopCounterMode has no formula for the CPU
    flash-attention kernel: its count is the GEMMs' alone)."""
    from torch.utils.flop_counter import FlopCounterMode

    from runtime.lora import apply_lora
    from runtime.model import Transformer, materialize
    from runtime.pipeline import lm_loss_sum
    job = Job(global_batch=2, seq_len=32, lora=lora, task=task, num_labels=3)
    with torch.device("meta"):
        model = Transformer(SPEC, num_labels=3 if task == "classify" else None)
    apply_lora(model, lora, torch.float32)
    materialize(model, torch.device("cpu"))
    tokens = torch.randint(0, 3, (2, 32))
    with FlopCounterMode(display=False) as counter:
        lm_loss_sum(model(tokens), tokens).backward()
    attention = 3 * SPEC.num_layers * microbatch_flops(SPEC, 2, 32, 1).layer_attention_flops
    assert set(map(str, counter.get_flop_counts()["Global"])) <= {"aten.mm", "aten.addmm"}
    assert counter.get_total_flops() == model_flops_per_step(SPEC, 2, 32, job) - attention
