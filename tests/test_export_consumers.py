"""The exports read by their real consumers: torchrun's own argument parser, DeepSpeed
(deepspeed.runtime.config.DeepSpeedConfig for every config; deepspeed.initialize and one
training step on CPU/gloo for one plan of each kind), and Megatron Core (the megatron-core
wheel: TransformerConfig, DistributedDataParallelConfig and OptimizerConfig built from the
Megatron-LM arguments, and a GPTModel whose parameter count must be the plan's).

The megatron-core wheel does not ship Megatron-LM's `megatron.training` (its argument parser
and validate_args), and Megatron-LM is not on PyPI: how a flag becomes a Megatron Core field
(MEGATRON_LM_FLAGS below) is written from Megatron-LM's arguments.py and
core_transformer_config_from_args, not read from them.  Tests skip, saying which package is
missing, where DeepSpeed or Megatron Core is not installed (both are in the `test` extra)."""

import dataclasses
import importlib.util
import itertools
import json
import os
import shlex
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from planner import export
from planner.cost.params import count_parameters
from planner.hardware import load_cluster
from planner.job import Job
from planner.plan import Layout, Plan
from planner.presets import load_model
from planner.spec import ModelSpec

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent


def _have(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except ImportError:
        return False


needs_deepspeed = pytest.mark.skipif(not _have("deepspeed"),
                                     reason="deepspeed not installed (pip install deepspeed)")
needs_megatron = pytest.mark.skipif(not _have("megatron.core"),
                                    reason="megatron-core not installed "
                                           "(pip install megatron-core)")


def _plan(*, gpus=8, model="llama2-7b", precision="bf16", attention="flash", seq_len=2048,
          engine="torch", **layout) -> Plan:
    base = dict(dp=gpus, tp=1, pp=1, micro_batch=2, num_microbatches=4, schedule="1f1b")
    base.update(layout)
    lay = Layout(**base)
    spec = load_model(model) if isinstance(model, str) else model
    nodes = -(-gpus // 8)
    cluster = load_cluster("a100-80g", nodes, num_gpus=gpus if gpus < 8 else 0)
    return Plan(model=spec, cluster=cluster, layout=lay,
                job=Job(global_batch=lay.dp * lay.micro_batch * lay.num_microbatches,
                        seq_len=seq_len, precision=precision, attention=attention,
                        engine=engine))


# ---- torchrun: torch.distributed.run's own parser -------------------------------------------

def _torchrun_args(argv: list):
    from torch.distributed.run import parse_args
    assert argv[0] == "torchrun"
    return parse_args(argv[1:])


def test_torchrun_parses_the_single_node_line():
    (line,) = export.torchrun_lines(_plan(), steps=7, plan_path="my plan.json")
    args = _torchrun_args(shlex.split(line))
    assert args.standalone and args.nproc_per_node == "8" and args.module
    assert args.training_script == "runtime.train"
    assert args.training_script_args == ["--plan", "my plan.json", "--steps", "7"]


def test_torchrun_parses_the_multi_node_lines():
    from torch.distributed.run import config_from_args
    lines = export.torchrun_lines(_plan(gpus=16), hosts=["n0", "n1"], master_port=29555)
    for text in lines:
        args = _torchrun_args(shlex.split(text.split("\n")[1]))
        config, _, cmd_args = config_from_args(args)
        assert (config.min_nodes, config.max_nodes, config.nproc_per_node) == (2, 2, 8)
        assert config.rdzv_backend == "c10d" and config.rdzv_endpoint == "n0:29555"
        assert config.run_id == "llama2-7b-dp16tp1pp1"
        assert cmd_args[-4:] == ["--plan", "plan.json", "--steps", "50"]


def test_torchrun_parses_the_slurm_line():
    from torch.distributed.run import config_from_args
    text = export.slurm(_plan(gpus=16))
    srun = next(x for x in text.replace("\\\n", " ").splitlines() if x.startswith("srun "))
    srun = srun.replace("$SLURM_JOB_ID", "4242").replace("$MASTER_ADDR", "n0") \
        .replace("$MASTER_PORT", "29500")
    argv = shlex.split(srun)
    config, _, _ = config_from_args(_torchrun_args(argv[argv.index("torchrun"):]))
    assert (config.min_nodes, config.max_nodes, config.nproc_per_node) == (2, 2, 8)
    assert config.run_id == "4242" and config.rdzv_endpoint == "n0:29500"


# ---- DeepSpeed: every config through DeepSpeedConfig ----------------------------------------

def _deepspeed_plans() -> list:
    """A plan of every kind the DeepSpeed export handles (the refused ones left out)."""
    plans = []
    for precision, zero, (tp, pp), recompute, sp in itertools.product(
            ("bf16", "fp16", "fp32"), (0, 1, 2, 3), ((1, 1), (2, 1), (1, 2), (2, 2)),
            ("none", "selective", "full"), (False, True)):
        if (sp and tp == 1) or (pp > 1 and zero >= 2):
            continue
        plans.append(_plan(dp=8 // (tp * pp), tp=tp, pp=pp, zero_stage=zero,
                           precision=precision, recompute=recompute, sequence_parallel=sp))
    return plans


DEEPSPEED_PLANS = _deepspeed_plans()


class _Mpu:
    """What PipelineModule, Megatron-DeepSpeed or deepspeed.utils.groups hand DeepSpeed: the
    data-parallel size."""

    def __init__(self, dp):
        self.dp = dp

    def get_data_parallel_world_size(self):
        return self.dp


@pytest.fixture
def ds_world(monkeypatch):
    """DeepSpeedConfig asks deepspeed.comm for the rank and world size; give it a world of
    `size` ranks without starting one."""
    import deepspeed.runtime.config as ds_config

    def world(size):
        monkeypatch.setattr(ds_config.dist, "get_rank", lambda *a, **k: 0)
        monkeypatch.setattr(ds_config.dist, "get_world_size", lambda *a, **k: size)
    return world


@needs_deepspeed
@pytest.mark.parametrize("plan", DEEPSPEED_PLANS,
                         ids=[f"{p.job.precision}-z{p.layout.zero_stage}-tp{p.layout.tp}"
                              f"pp{p.layout.pp}-{p.layout.recompute}"
                              f"{'-sp' if p.layout.sequence_parallel else ''}"
                              for p in DEEPSPEED_PLANS])
def test_deepspeed_parses_every_config(plan, ds_world):
    import torch
    from deepspeed.runtime.config import DeepSpeedConfig
    lay = plan.layout
    cfg = json.loads(export.deepspeed(plan))
    ds_world(plan.cluster.world_size)
    parsed = DeepSpeedConfig(cfg, mpu=_Mpu(lay.dp))
    assert parsed.train_batch_size == plan.job.global_batch
    assert parsed.train_micro_batch_size_per_gpu == lay.micro_batch
    assert parsed.gradient_accumulation_steps == lay.num_microbatches
    assert parsed.zero_optimization_stage == lay.zero_stage
    assert parsed.bfloat16_config.enabled == (plan.job.precision == "bf16")
    assert parsed.float16_config.enabled == (plan.job.precision == "fp16")
    assert parsed.gradient_clipping == export.CLIP_NORM
    assert parsed.optimizer_name == "adamw"
    assert parsed.optimizer_params["lr"] == export.LR_PLACEHOLDER
    bf16 = plan.job.precision == "bf16"
    assert parsed.communication_data_type == (torch.float32 if bf16 else None)
    assert parsed.grad_accum_dtype == ("fp32" if bf16 and lay.zero_stage >= 1 else None)
    full_pipe = lay.recompute == "full" and lay.pp > 1
    assert parsed.pipeline["activation_checkpoint_interval"] == (1 if full_pipe else 0)
    autotp = lay.tp > 1 and lay.pp == 1 and not lay.sequence_parallel
    assert parsed.tensor_parallel_config.autotp_size == (lay.tp if autotp else 0)


@needs_deepspeed
@pytest.mark.parametrize("zero,offload,engine", [(1, "optimizer", "deepspeed"),
                                                 (2, "optimizer", "deepspeed"),
                                                 (3, "params", "deepspeed"),
                                                 (3, "params", "torch")])
def test_deepspeed_reads_the_offload(zero, offload, engine, ds_world):
    """CPU offload: DeepSpeed's config classes read offload_optimizer (and offload_param)."""
    from deepspeed.runtime.config import DeepSpeedConfig
    plan = _plan(dp=8, zero_stage=zero, offload=offload, engine=engine)
    ds_world(8)
    zero_cfg = DeepSpeedConfig(export.deepspeed_config(plan), mpu=_Mpu(8)).zero_config
    assert zero_cfg.offload_optimizer.device == "cpu" and zero_cfg.offload_optimizer.pin_memory
    if offload == "params":
        assert zero_cfg.offload_param.device == "cpu"
    else:
        assert zero_cfg.offload_param is None


@needs_deepspeed
def test_deepspeed_batch_check_needs_the_mpu_the_note_names(ds_world):
    """Without an mpu DeepSpeed counts every rank as data parallel: train_batch_size (the
    plan's global batch) then fails its check under TP or PP."""
    from deepspeed.runtime.config import DeepSpeedConfig
    for plan in (_plan(dp=4, tp=2), _plan(dp=4, pp=2, zero_stage=1)):
        cfg = export.deepspeed_config(plan)
        ds_world(8)
        with pytest.raises(AssertionError, match="train_batch_size is not equal"):
            DeepSpeedConfig(cfg)
        assert DeepSpeedConfig(cfg, mpu=_Mpu(4)).train_batch_size == plan.job.global_batch


# ---- DeepSpeed: deepspeed.initialize and one step on two or four CPU processes -----------

# (name, layout, precision, mode, what DeepSpeed must build)
DEEPSPEED_RUNS = [
    ("dp2-bf16-zero0", dict(dp=2, zero_stage=0), "bf16", "plain",
     {"optimizer": "FP16_UnfusedOptimizer", "grad_accum_dtype": "torch.bfloat16"}),
    ("dp2-bf16-zero1", dict(dp=2, zero_stage=1), "bf16", "plain",
     {"optimizer": "BF16_Optimizer", "grad_accum_dtype": "torch.float32"}),
    ("dp2-bf16-zero2-full", dict(dp=2, zero_stage=2, recompute="full"), "bf16", "plain",
     {"optimizer": "DeepSpeedZeroOptimizer", "grad_accum_dtype": "torch.float32"}),
    ("dp2-bf16-zero3", dict(dp=2, zero_stage=3), "bf16", "plain",
     {"optimizer": "DeepSpeedZeroOptimizer_Stage3", "grad_accum_dtype": "torch.float32"}),
    ("pp2-bf16-zero0-full", dict(dp=1, pp=2, zero_stage=0, recompute="full"), "bf16", "pipe",
     {"engine": "PipelineEngine", "optimizer": "BF16_Optimizer",
      "grad_accum_dtype": "torch.bfloat16", "activation_checkpoint_interval": 1}),
    ("pp2-dp2-bf16-zero1", dict(dp=2, pp=2, zero_stage=1), "bf16", "pipe",
     {"engine": "PipelineEngine", "optimizer": "BF16_Optimizer",
      "grad_accum_dtype": "torch.float32", "activation_checkpoint_interval": 0}),
    ("tp2-dp2-autotp-bf16-zero1", dict(dp=2, tp=2, zero_stage=1), "bf16", "autotp",
     {"optimizer": "BF16_Optimizer", "grad_accum_dtype": "torch.float32",
      "q_proj_shape": [8, 16]}),
    ("dp2-fp32-zero0", dict(dp=2, zero_stage=0), "fp32", "plain",
     {"optimizer": "AdamW", "grad_accum_dtype": "torch.float32"}),
]


@needs_deepspeed
@pytest.mark.slow
@pytest.mark.parametrize("name,layout,precision,mode,expect", DEEPSPEED_RUNS,
                         ids=[r[0] for r in DEEPSPEED_RUNS])
def test_deepspeed_trains_a_step_under_the_config(name, layout, precision, mode, expect,
                                                  tmp_path):
    lay = Layout(**{"dp": 1, **layout})
    plan = _plan(gpus=lay.world_size, precision=precision, **layout)
    config, out = tmp_path / "ds_config.json", tmp_path / "result.json"
    config.write_text(export.deepspeed(plan))
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node",
         str(lay.world_size),
         str(HERE / "ds_export_step.py"), str(config), mode, str(out)],
        capture_output=True, text=True, env=env, timeout=400, check=False)
    assert done.returncode == 0, (done.stdout + done.stderr)[-4000:]
    result = json.loads(out.read_text())
    assert result["loss_finite"] and result["global_steps"] == 1
    assert result["train_batch_size"] == plan.job.global_batch
    assert result["model_dtype"] == {"bf16": "torch.bfloat16", "fp32": "torch.float32"}[
        precision]
    if precision == "bf16":
        assert result["communication_data_type"] == "torch.float32"
    for key, value in {"engine": "DeepSpeedEngine", **expect}.items():
        assert result[key] == value, (key, result)


# ---- DeepSpeed: plans made for the deepspeed engine ----------------------------------------

def _ds_engine(plan: Plan) -> Plan:
    return dataclasses.replace(plan, job=dataclasses.replace(plan.job, engine="deepspeed"))


def _deepspeed_engine_plans() -> list:
    """Every kind a `--engine deepspeed` plan can be (its rules leave out ZeRO-2/3 with a
    pipeline, tensor parallelism with a pipeline and sequence parallelism)."""
    return [_ds_engine(_plan(dp=8 // (tp * pp), tp=tp, pp=pp, zero_stage=zero,
                             precision=precision))
            for precision, zero, (tp, pp) in itertools.product(
                ("bf16", "fp16", "fp32"), (0, 1, 2, 3), ((1, 1), (2, 1), (1, 2)))
            if not (pp > 1 and zero >= 2)]


DEEPSPEED_ENGINE_PLANS = _deepspeed_engine_plans()


@needs_deepspeed
@pytest.mark.parametrize("plan", DEEPSPEED_ENGINE_PLANS,
                         ids=[f"{p.job.precision}-z{p.layout.zero_stage}-tp{p.layout.tp}"
                              f"pp{p.layout.pp}" for p in DEEPSPEED_ENGINE_PLANS])
def test_deepspeed_parses_what_the_deepspeed_engine_assumed(plan, ds_world):
    """The dtypes and buckets planner/cost/deepspeed.py counts, as DeepSpeed reads them."""
    import torch
    from deepspeed.runtime.config import DeepSpeedConfig
    from planner.cost import deepspeed as ds
    lay = plan.layout
    ds_world(plan.cluster.world_size)
    parsed = DeepSpeedConfig(export.deepspeed_config(plan), mpu=_Mpu(lay.dp))
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
    assert parsed.communication_data_type == dtype[plan.job.precision]
    assert parsed.grad_accum_dtype == plan.job.precision
    zero = parsed.zero_config
    assert parsed.zero_optimization_stage == lay.zero_stage
    if lay.zero_stage >= 1:
        assert zero.overlap_comm and zero.contiguous_gradients
        assert zero.reduce_bucket_size == ds.REDUCE_BUCKET_SIZE
        assert zero.allgather_bucket_size == ds.ALLGATHER_BUCKET_SIZE
        assert zero.prefetch_bucket_size == ds.PREFETCH_BUCKET_SIZE
        assert zero.max_live_parameters == ds.MAX_LIVE_PARAMETERS


# (name, layout, precision, mode, the optimizer DeepSpeed builds on CPU with torch_adam): the
# fused FP16_Optimizer and FusedAdam of the plan become FP16_UnfusedOptimizer and AdamW there,
# which hold the same fp32 master copies and moments
DEEPSPEED_ENGINE_RUNS = [
    ("dp2-bf16-zero0", dict(dp=2, zero_stage=0), "bf16", "plain", "FP16_UnfusedOptimizer"),
    ("dp2-bf16-zero1", dict(dp=2, zero_stage=1), "bf16", "plain", "DeepSpeedZeroOptimizer"),
    ("dp2-bf16-zero2", dict(dp=2, zero_stage=2), "bf16", "plain", "DeepSpeedZeroOptimizer"),
    ("dp2-bf16-zero3", dict(dp=2, zero_stage=3), "bf16", "plain",
     "DeepSpeedZeroOptimizer_Stage3"),
    ("pp2-dp2-bf16-zero0", dict(dp=2, pp=2, zero_stage=0), "bf16", "pipe", "BF16_Optimizer"),
    ("dp2-fp32-zero1", dict(dp=2, zero_stage=1), "fp32", "plain", "DeepSpeedZeroOptimizer"),
    ("dp2-fp32-zero0", dict(dp=2, zero_stage=0), "fp32", "plain", "AdamW"),
]
ON_CPU = {"FP16_Optimizer": "FP16_UnfusedOptimizer", "FusedAdam": "AdamW"}


@needs_deepspeed
@pytest.mark.slow
@pytest.mark.parametrize("name,layout,precision,mode,optimizer", DEEPSPEED_ENGINE_RUNS,
                         ids=[r[0] for r in DEEPSPEED_ENGINE_RUNS])
def test_deepspeed_allocates_the_model_states_the_engine_counts(name, layout, precision, mode,
                                                                optimizer, tmp_path):
    """deepspeed.initialize and one step under a deepspeed-engine plan's config: the weights,
    fp32 master copies and AdamW moments DeepSpeed holds for the rank's parameters are
    planner/cost/deepspeed.py's bytes, and it builds the optimizer the plan names."""
    from planner.cost import deepspeed as ds
    lay = Layout(**{"dp": 1, **layout})
    plan = _ds_engine(_plan(gpus=lay.world_size, precision=precision, **layout))
    config, out = tmp_path / "ds_config.json", tmp_path / "result.json"
    config.write_text(export.deepspeed(plan))
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node",
         str(lay.world_size), str(HERE / "ds_export_step.py"), str(config), mode, str(out)],
        capture_output=True, text=True, env=env, timeout=400, check=False)
    assert done.returncode == 0, (done.stdout + done.stderr)[-4000:]
    result = json.loads(out.read_text())
    wrapper = ds.optimizer_wrapper(precision, lay.zero_stage, lay.pp)
    assert result["optimizer"] == optimizer == ON_CPU.get(wrapper, wrapper)
    assert result["grad_accum_dtype"] == result["model_dtype"]
    assert result["communication_data_type"] == result["model_dtype"]
    measured = result["model_states"]
    states = ds.model_state_bytes(measured["numel"], lay.dp, lay.zero_stage, precision, lay.pp)
    assert measured["weights_bytes"] == states.weights_bytes
    assert measured["master_bytes"] + measured["moment_bytes"] == states.optimizer_bytes


# ---- Megatron Core --------------------------------------------------------------------------

# How Megatron-LM turns each flag the export writes into Megatron Core (from its arguments.py,
# core_transformer_config_from_args and pretrain_gpt.py's model_provider; not checked here):
#   "transformer" / "ddp" / "optimizer": a field of that Megatron Core config, named as the
#       flag's argparse dest, is set to the flag's value (typed by the field's default);
#   "model": a GPTModel argument; "training": read by Megatron-LM's training loop alone.
MEGATRON_LM_FLAGS = {
    "--tensor-model-parallel-size": "transformer", "--pipeline-model-parallel-size": "transformer",
    "--pipeline-model-parallel-layout": "transformer", "--sequence-parallel": "transformer",
    "--num-layers-per-virtual-pipeline-stage": "special",
    "--recompute-granularity": "transformer", "--recompute-method": "transformer",
    "--recompute-num-layers": "transformer", "--num-layers": "transformer",
    "--hidden-size": "transformer", "--num-attention-heads": "transformer",
    "--ffn-hidden-size": "transformer", "--attention-dropout": "transformer",
    "--hidden-dropout": "transformer", "--normalization": "transformer",
    "--norm-epsilon": "special", "--swiglu": "special", "--group-query-attention": "special",
    "--num-query-groups": "transformer", "--disable-bias-linear": "special",
    "--bf16": "special", "--fp16": "special", "--attention-backend": "special",
    "--no-masked-softmax-fusion": "special",
    "--use-distributed-optimizer": "ddp", "--use-megatron-fsdp": "ddp",
    "--num-distributed-optimizer-instances": "ddp", "--optimizer-cpu-offload": "optimizer",
    "--data-parallel-sharding-strategy": "ddp", "--clip-grad": "optimizer", "--lr": "optimizer",
    "--vocab-size": "model", "--max-position-embeddings": "model",
    "--position-embedding-type": "model", "--rotary-base": "model",
    "--untie-embeddings-and-output-weights": "model",
    "--micro-batch-size": "training", "--global-batch-size": "training",
    "--seq-length": "training", "--train-iters": "training", "--data-path": "training",
    "--tokenizer-type": "training", "--tokenizer-model": "training",
    # attention shapes and mixture of experts (arguments.py _add_moe_args, _add_mla_args)
    "--kv-channels": "special", "--qk-layernorm": "transformer", "--add-qkv-bias": "transformer",
    "--multi-latent-attention": "special", "--q-lora-rank": "transformer",
    "--kv-lora-rank": "transformer", "--qk-head-dim": "transformer",
    "--qk-pos-emb-head-dim": "transformer", "--v-head-dim": "transformer",
    "--num-experts": "special", "--moe-router-topk": "transformer",
    "--moe-ffn-hidden-size": "transformer", "--expert-model-parallel-size": "transformer",
    "--expert-tensor-parallel-size": "transformer", "--moe-grouped-gemm": "transformer",
    "--moe-token-dispatcher-type": "transformer", "--moe-router-score-function": "transformer",
    "--moe-layer-freq": "special", "--moe-router-load-balancing-type": "transformer",
    "--moe-aux-loss-coeff": "transformer",
    "--moe-shared-expert-intermediate-size": "transformer",
    "--moe-shared-expert-gate": "transformer", "--moe-expert-capacity-factor": "special",
}
FILL = {"LR": "3e-4", "TRAIN_ITERS": "100", "DATA_PATH": "/data/text_document",
        "TOKENIZER_MODEL": "gpt2"}


def _megatron_plans() -> list:
    spec = load_model("llama2-70b")
    plans = [
        _plan(gpus=64, model=spec, dp=2, tp=8, pp=4, sequence_parallel=True, zero_stage=1,
              schedule="interleaved_1f1b", virtual_stages=2, recompute="selective",
              num_microbatches=16),
        _plan(gpus=16, model=spec, dp=2, tp=4, pp=2, layers_per_stage=(38, 42),
              recompute="full"),
        _plan(gpus=32, model=spec, dp=1, tp=8, pp=4, schedule="interleaved_1f1b",
              virtual_stages=2, layers_per_stage=(9, 10, 11, 10, 10, 10, 11, 9),
              num_microbatches=8),
        _plan(gpus=24, model=load_model("llama2-7b"), dp=8, pp=3, zero_stage=1),  # 32 / 3
    ]
    for zero, attention in ((0, "fused"), (2, "eager"), (3, "flash")):
        plans.append(_plan(gpus=8, model="llama3-8b", dp=4, tp=2, zero_stage=zero,
                           attention=attention, sequence_parallel=True))
    plans.append(_plan(gpus=8, model="gpt3-1.3b", dp=8, precision="fp16", zero_stage=1))
    plans.append(_plan(gpus=8, model="gpt3-1.3b", dp=2, pp=4, precision="fp32",
                       num_microbatches=8))
    plans.append(_plan(gpus=16, model="llama3-8b", dp=8, tp=2, zero_stage=3, dp_shard=4,
                       attention="flash", sequence_parallel=True))  # hybrid sharding
    plans.append(_plan(gpus=8, model="llama3-8b", dp=8, zero_stage=1, offload="optimizer",
                       engine="megatron"))  # CPU offload of the distributed optimizer
    return plans


MEGATRON_PLANS = _megatron_plans()


def _parse_megatron(args: list) -> dict:
    """{flag: value} (True for a switch) of export.megatron_args."""
    out, i = {}, 0
    while i < len(args):
        has_value = i + 1 < len(args) and not args[i + 1].startswith("--")
        out[args[i]] = args[i + 1] if has_value else True
        i += 2 if has_value else 1
    return out


def _typed(cls, name: str, value):
    field = {f.name: f for f in dataclasses.fields(cls)}[name]
    default = field.default
    if value is True or isinstance(default, bool):
        return bool(value)
    if isinstance(default, int) or name.endswith("_size") or name.startswith("num_") or \
            name == "recompute_num_layers":
        return int(value)
    if isinstance(default, float) or name in ("lr", "clip_grad") or name.endswith("dropout"):
        return float(value)
    return value


def megatron_core_configs(args: list) -> tuple:
    """(TransformerConfig, DistributedDataParallelConfig, OptimizerConfig, GPTModel kwargs)
    built from the arguments as Megatron-LM builds them (MEGATRON_LM_FLAGS)."""
    import torch
    from megatron.core.distributed import DistributedDataParallelConfig
    from megatron.core.optimizer import OptimizerConfig
    from megatron.core.transformer.enums import AttnBackend
    from megatron.core.transformer.transformer_config import (MLATransformerConfig,
                                                              TransformerConfig)
    flags = _parse_megatron(args)
    if "--multi-latent-attention" in flags:  # Megatron-LM builds MLATransformerConfig
        TransformerConfig = MLATransformerConfig  # noqa: N806
    unknown = set(flags) - set(MEGATRON_LM_FLAGS)
    assert not unknown, f"flags with no known Megatron-LM meaning: {sorted(unknown)}"
    classes = {"transformer": TransformerConfig, "ddp": DistributedDataParallelConfig,
               "optimizer": OptimizerConfig}
    kwargs = {kind: {} for kind in classes}
    for flag, value in flags.items():
        kind, dest = MEGATRON_LM_FLAGS[flag], flag[2:].replace("-", "_")
        if kind in classes:
            names = {f.name for f in dataclasses.fields(classes[kind])}
            assert dest in names, f"{flag}: Megatron Core's {classes[kind].__name__} has no {dest}"
            kwargs[kind][dest] = _typed(classes[kind], dest, value)
    t, dtype = kwargs["transformer"], torch.float32
    if "--bf16" in flags or "--fp16" in flags:
        dtype = torch.bfloat16 if "--bf16" in flags else torch.float16
        t["bf16" if "--bf16" in flags else "fp16"] = True
    t.update(params_dtype=dtype, pipeline_dtype=dtype,
             attention_backend=AttnBackend[flags["--attention-backend"]],
             masked_softmax_fusion="--no-masked-softmax-fusion" not in flags,
             add_bias_linear="--disable-bias-linear" not in flags)
    if "--norm-epsilon" in flags:
        t["layernorm_epsilon"] = float(flags["--norm-epsilon"])
    if "--kv-channels" in flags:
        t["kv_channels"] = int(flags["--kv-channels"])
    if "--num-experts" in flags:
        t["num_moe_experts"] = int(flags["--num-experts"])
        t["moe_layer_freq"] = json.loads(flags["--moe-layer-freq"])
    if "--moe-expert-capacity-factor" in flags:
        t["moe_expert_capacity_factor"] = float(flags["--moe-expert-capacity-factor"])
    if "--swiglu" in flags:
        t.update(gated_linear_unit=True, activation_func=torch.nn.functional.silu)
    if "--num-layers-per-virtual-pipeline-stage" in flags:
        t["virtual_pipeline_model_parallel_size"] = (
            t["num_layers"] // t["pipeline_model_parallel_size"]
            // int(flags["--num-layers-per-virtual-pipeline-stage"]))
    assert ("--num-query-groups" in flags) == ("--group-query-attention" in flags)
    o = kwargs["optimizer"]
    o.update(bf16=t.get("bf16", False), fp16=t.get("fp16", False), params_dtype=dtype,
             use_distributed_optimizer="--use-distributed-optimizer" in flags)
    model = {"vocab_size": int(flags["--vocab-size"]),
             "max_sequence_length": int(flags["--max-position-embeddings"]),
             "share_embeddings_and_output_weights":
                 "--untie-embeddings-and-output-weights" not in flags,
             "position_embedding_type": flags.get("--position-embedding-type",
                                                  "learned_absolute")}
    if "--rotary-base" in flags:
        model["rotary_base"] = int(flags["--rotary-base"])  # Megatron-LM: type=int
    return (TransformerConfig(**t), DistributedDataParallelConfig(**kwargs["ddp"]),
            OptimizerConfig(**o), model)


def _ids(plans):
    return [f"{p.model.name}-tp{p.layout.tp}pp{p.layout.pp}v{p.layout.virtual_stages}"
            f"-z{p.layout.zero_stage}-{p.job.attention}-{p.job.precision}"
            f"{'-uneven' if p.layout.layers_per_stage else ''}" for p in plans]


@needs_megatron
@pytest.mark.parametrize("plan", MEGATRON_PLANS, ids=_ids(MEGATRON_PLANS))
def test_megatron_core_accepts_every_export(plan):
    from megatron.core.distributed.fsdp.src.megatron_fsdp.fully_shard import ShardingStrategy
    from megatron.core.transformer.enums import LayerType
    lay, spec = plan.layout, plan.model
    tc, ddp, opt, model = megatron_core_configs(export.megatron_args(plan, fill=FILL))
    assert (tc.tensor_model_parallel_size, tc.pipeline_model_parallel_size) == (lay.tp, lay.pp)
    assert tc.sequence_parallel == lay.sequence_parallel
    assert (tc.num_layers, tc.hidden_size, tc.num_attention_heads, tc.ffn_hidden_size) == \
        (spec.num_layers, spec.hidden_size, spec.num_heads, spec.ffn_hidden_size)
    assert (tc.num_query_groups or spec.num_heads) == spec.num_kv_heads
    assert tc.recompute_granularity == (None if lay.recompute == "none" else lay.recompute)
    assert (tc.virtual_pipeline_model_parallel_size or 1) == lay.virtual_stages
    assert model["share_embeddings_and_output_weights"] == spec.tie_embeddings
    # the layers each model chunk builds, in pipeline order, are the plan's
    chunks = lay.stage_layers(spec.num_layers)
    layout = tc.pipeline_model_parallel_layout
    if layout is None:
        assert len(set(chunks)) == 1
    else:
        built = [layout.layout[c % lay.pp][c // lay.pp].count(LayerType.decoder)
                 for c in range(lay.num_chunks)]
        assert built == list(chunks)
    # ZeRO stage n is Megatron-FSDP's sharding strategy n
    assert ddp.use_distributed_optimizer == opt.use_distributed_optimizer == \
        (lay.zero_stage >= 1)
    assert ddp.use_megatron_fsdp == (lay.zero_stage >= 2)
    if lay.zero_stage >= 2:
        assert ddp.data_parallel_sharding_strategy == \
            ShardingStrategy(lay.zero_stage).name.lower()
    # hybrid sharding: dp / dp_shard distributed-optimizer instances
    assert ddp.num_distributed_optimizer_instances == lay.dp_replicate
    assert opt.optimizer_cpu_offload == (lay.offload == "optimizer")
    assert opt.lr == float(FILL["LR"]) and opt.clip_grad == export.CLIP_NORM


@needs_megatron
def test_megatron_core_refuses_a_layout_that_drops_layers():
    """The check the uneven export relies on: Megatron Core counts the layout's layers."""
    plan = _plan(gpus=16, model="llama2-70b", dp=2, tp=4, pp=2, layers_per_stage=(38, 42))
    args = export.megatron_args(plan, fill=FILL)
    i = args.index("--pipeline-model-parallel-layout")
    args[i + 1] = "Et*38|t*41L"
    with pytest.raises(AssertionError, match="must match num_layers"):
        megatron_core_configs(args)


_GPT_MODEL = """
import json, os, sys, torch
os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=sys.argv[1], RANK="0", WORLD_SIZE="1")
torch.distributed.init_process_group("gloo")
from megatron.core import parallel_state
parallel_state.initialize_model_parallel(1, 1)
from megatron.core.models.gpt import GPTModel
from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
sys.path.insert(0, sys.argv[2])
from test_export_consumers import megatron_core_configs
counts = []
for args in json.loads(sys.argv[3]):
    tc, _, _, model = megatron_core_configs(args)
    tc.use_cpu_initialization, tc.perform_initialization = True, False
    spec = get_gpt_layer_local_spec(normalization=tc.normalization)
    counts.append(sum(p.numel() for p in GPTModel(config=tc, transformer_layer_spec=spec,
                                                     **model).parameters()))
print(json.dumps(counts))
"""


def _tiny(arch: str, tied: bool) -> ModelSpec:
    return ModelSpec(name=f"tiny-{arch}", arch=arch, num_layers=2, hidden_size=64, num_heads=4,
                     num_kv_heads=2 if arch == "llama" else 4, ffn_hidden_size=96,
                     vocab_size=256, max_seq_len=128, tie_embeddings=tied,
                     linear_bias=arch == "gpt")


@needs_megatron
@pytest.mark.slow
def test_megatron_gpt_model_has_the_plans_parameter_count():
    """Megatron Core's GPTModel, built from the export, holds exactly the parameters the plan
    counts: an output layer of its own only where the spec's embeddings are untied."""
    from runtime_dist import free_port
    specs = [_tiny(arch, tied) for arch in ("llama", "gpt") for tied in (True, False)]
    plans = [_plan(gpus=1, model=s, dp=1, seq_len=128, micro_batch=1, num_microbatches=1)
             for s in specs]
    args = [export.megatron_args(p, fill=FILL) for p in plans]
    done = subprocess.run([sys.executable, "-c", textwrap.dedent(_GPT_MODEL), str(free_port()),
                           str(HERE), json.dumps(args)], capture_output=True, text=True,
                          cwd=ROOT, timeout=300, check=False)
    assert done.returncode == 0, done.stderr[-4000:]
    counts = json.loads(done.stdout.strip().splitlines()[-1])
    assert counts == [count_parameters(s) for s in specs]
    assert counts[1] - counts[0] == 256 * 64  # untied: one more vocab x hidden matrix


MOE_PLANS = [
    _plan(gpus=16, model="mixtral-8x7b", dp=16, ep=8, zero_stage=1, engine="megatron"),
    _plan(gpus=16, model="qwen3-30b-a3b", dp=8, tp=2, ep=8, etp=2, sequence_parallel=True,
          zero_stage=1, engine="megatron"),
    _plan(gpus=64, model="deepseek-v3", dp=4, tp=2, pp=8, ep=8, sequence_parallel=True,
          zero_stage=1, engine="megatron", num_microbatches=8),
]


@needs_megatron
@pytest.mark.parametrize("plan", MOE_PLANS, ids=[p.model.name for p in MOE_PLANS])
def test_megatron_core_accepts_the_moe_exports(plan):
    """Megatron Core's (MLA)TransformerConfig takes the MoE and MLA arguments and means by them
    what the plan does."""
    lay, spec = plan.layout, plan.model
    tc, _, _, _ = megatron_core_configs(export.megatron_args(plan, fill=FILL))
    moe = spec.moe
    assert (tc.num_moe_experts, tc.moe_router_topk, tc.moe_ffn_hidden_size) == \
        (moe.num_experts, moe.experts_per_token, moe.expert_ffn_hidden_size)
    assert (tc.expert_model_parallel_size, tc.expert_tensor_parallel_size) == (lay.ep, lay.etp)
    assert tc.moe_grouped_gemm and tc.moe_token_dispatcher_type == "alltoall"
    assert tc.moe_router_score_function == moe.router
    assert tc.moe_aux_loss_coeff == moe.aux_loss_coef
    assert [bool(x) for x in tc.moe_layer_freq] == \
        [moe.is_moe_layer(i) for i in range(spec.num_layers)]
    assert (tc.moe_shared_expert_intermediate_size or 0) == moe.shared_ffn_hidden_size
    assert (tc.kv_channels or spec.hidden_size // spec.num_heads) == spec.head_dim or spec.mla
    assert tc.qk_layernorm == spec.qk_norm
    if spec.mla:
        m = spec.mla
        assert (tc.q_lora_rank, tc.kv_lora_rank, tc.qk_head_dim, tc.qk_pos_emb_head_dim,
                tc.v_head_dim) == (m.q_lora_rank, m.kv_lora_rank, m.qk_nope_head_dim,
                                   m.qk_rope_head_dim, m.v_head_dim)


def test_exports_that_cannot_run_an_moe_plan_refuse():
    plan = MOE_PLANS[0]
    with pytest.raises(ValueError, match="DeepSpeed cannot express this plan: ep=8 etp=1"):
        export.deepspeed_config(plan)
    with pytest.raises(ValueError, match="torchrun cannot express this plan: it runs "
                                         "runtime.train .the torch engine., which refuses this "
                                         "megatron plan: ep=8 with ZeRO-1"):
        export.torchrun_lines(plan)  # the runtime builds Mixtral, not ep with ZeRO-1
    oss = _plan(gpus=8, model="gpt-oss-120b", dp=8, ep=8, zero_stage=1, engine="megatron")
    with pytest.raises(ValueError, match="attention_sinks"):
        export.megatron_args(oss, fill=FILL)
