"""planner export: every format is valid and says exactly what the plan says.

The consumers themselves (torchrun's parser, DeepSpeed, Megatron Core) read the exports in
tests/test_export_consumers.py."""

import dataclasses
import json
import os
import shlex
import shutil
import subprocess

import pytest

from planner import export
from planner.cli import main
from planner.hardware import load_cluster
from planner.job import Job
from planner.plan import Layout, Plan
from planner.presets import load_model


def _plan(nodes=2, precision="bf16", model="llama2-70b", attention="flash", seq_len=None,
          **layout) -> Plan:
    base = dict(dp=2, tp=4, pp=2, sequence_parallel=True, zero_stage=1, micro_batch=2,
                num_microbatches=16, schedule="interleaved_1f1b", virtual_stages=2,
                recompute="selective")
    base.update(layout)
    gb = base["dp"] * base["micro_batch"] * base["num_microbatches"]
    spec = load_model(model) if isinstance(model, str) else model
    seq_len = seq_len or min(4096, spec.max_seq_len)
    return Plan(model=spec, cluster=load_cluster("a100-80g", nodes),
                job=Job(global_batch=gb, seq_len=seq_len, precision=precision,
                        attention=attention),
                layout=Layout(**base))


def _dp_only(**change) -> Plan:
    """llama2-7b on one node, data parallel 8 unless changed."""
    base = dict(nodes=1, dp=8, tp=1, pp=1, sequence_parallel=False, zero_stage=0,
                micro_batch=2, num_microbatches=4, schedule="1f1b", virtual_stages=1,
                recompute="none", model="llama2-7b")
    base.update(change)
    return _plan(**base)


def _flags(args: list) -> dict:
    """--flag value pairs (value None for a switch)."""
    out, i = {}, 0
    while i < len(args):
        has_value = i + 1 < len(args) and not args[i + 1].startswith("--")
        out[args[i]] = args[i + 1] if has_value else None
        i += 2 if has_value else 1
    return out


FILL = {"LR": "3e-4", "TRAIN_ITERS": "1000", "DATA_PATH": "/data/corpus_text_document",
        "TOKENIZER_MODEL": "meta-llama/Llama-2-7b-hf"}


# ---- torchrun and Slurm ---------------------------------------------------------------------

def test_torchrun_single_node_is_standalone():
    plan = _plan(nodes=1, dp=1, zero_stage=0)
    (line,) = export.torchrun_lines(plan, steps=7)
    argv = shlex.split(line)
    assert argv[:4] == ["torchrun", "--standalone", "--nproc-per-node", "8"]
    assert argv[4:] == ["-m", "runtime.train", "--plan", "plan.json", "--steps", "7"]


def test_torchrun_multi_node_with_hostfile(tmp_path):
    hostfile = tmp_path / "hosts"
    hostfile.write_text("# cluster\nnode-a slots=8\nnode-b\n")
    plan = _plan(nodes=2)
    lines = export.torchrun_lines(plan, hosts=export.read_hostfile(str(hostfile)),
                                  master_port=29555)
    assert len(lines) == 2
    commands = set()
    for rank, text in enumerate(lines):
        comment, cmd = text.split("\n")
        assert comment == f"# on {['node-a', 'node-b'][rank]}"
        f = _flags(shlex.split(cmd)[1:])
        assert f["--nproc-per-node"] == "8" and f["--nnodes"] == "2"
        assert f["--rdzv-endpoint"] == "node-a:29555" and f["--rdzv-backend"] == "c10d"
        assert f["--rdzv-id"] == "llama2-70b-dp2tp4pp2" and f["--plan"] == "plan.json"
        assert "--node-rank" not in f  # c10d assigns the node ranks
        commands.add(cmd)
    assert len(commands) == 1  # every node runs the same command
    with pytest.raises(ValueError, match="needs 2 nodes"):
        export.torchrun_lines(plan, hosts=["only-one"])


def test_torchrun_rendezvous_id():
    (text, _) = export.torchrun_lines(_plan(nodes=2), rdzv_id="run.7")
    assert _flags(shlex.split(text.split("\n")[1])[1:])["--rdzv-id"] == "run.7"
    for bad in ("-x", "a b", "$(id)", "", "x" * 129):
        with pytest.raises(ValueError, match="rendezvous id"):
            export.torchrun_lines(_plan(nodes=2), rdzv_id=bad)


def _srun(text: str) -> list:
    line = next(x for x in text.replace("\\\n", " ").splitlines() if x.startswith("srun "))
    return shlex.split(line)


def test_slurm_script():
    text = export.slurm(_plan(nodes=2), steps=5, partition="gpu")
    assert text.startswith("#!/bin/bash\n")
    for line in ("#SBATCH --nodes=2", "#SBATCH --gpus-per-node=8", "#SBATCH --partition=gpu",
                 "#SBATCH --ntasks-per-node=1", "MASTER_PORT=${MASTER_PORT:-29500}"):
        assert line in text.splitlines()
    srun = _srun(text)
    # srun gives a task one CPU unless told: each node's task gets the whole node
    assert srun[:4] == ["srun", "--kill-on-bad-exit=1", "--cpus-per-task=$SLURM_CPUS_ON_NODE",
                        "torchrun"]
    f = _flags(srun[4:])
    assert f["--nnodes"] == "2" and f["--steps"] == "5" and f["--plan"] == "plan.json"
    assert f["--rdzv-endpoint"] == "$MASTER_ADDR:$MASTER_PORT" and "-m runtime.train" in text
    assert f["--rdzv-id"] == "$SLURM_JOB_ID" and "--node-rank" not in f


def test_slurm_cpus_and_port():
    text = export.slurm(_plan(nodes=2), cpus_per_task=48, master_port=31000)
    assert "#SBATCH --cpus-per-task=48" in text.splitlines()
    assert _srun(text)[2] == "--cpus-per-task=48"
    assert "MASTER_PORT=${MASTER_PORT:-31000}" in text.splitlines()
    for bad in (0, -1, "8; id", True, 2.5):
        with pytest.raises(ValueError, match="cpus per task"):
            export.slurm(_plan(nodes=2), cpus_per_task=bad)


# ---- DeepSpeed ------------------------------------------------------------------------------

def test_deepspeed_config_matches_plan():
    plan = _dp_only(zero_stage=2, recompute="full", precision="fp16")
    cfg = json.loads(export.deepspeed(plan))
    assert cfg["train_batch_size"] == plan.job.global_batch == \
        cfg["train_micro_batch_size_per_gpu"] * cfg["gradient_accumulation_steps"] * 8
    assert cfg["zero_optimization"]["stage"] == 2
    assert cfg["fp16"] == {"enabled": True} and cfg["bf16"] == {"enabled": False}
    assert cfg["gradient_clipping"] == 1.0 and "activation_checkpointing" in cfg
    assert "pipeline" not in cfg and "tensor_parallel" not in cfg  # no pipeline, no TP
    assert "model code must checkpoint each block" in cfg["comment"]
    assert "fp16" in cfg["comment"] and "data_types" not in cfg


def test_deepspeed_optimizer_and_placeholder():
    cfg = export.deepspeed_config(_dp_only(zero_stage=2))
    assert cfg["optimizer"] == {"type": "AdamW", "params": {
        "lr": export.LR_PLACEHOLDER, "betas": [0.9, 0.95], "eps": 1e-8, "weight_decay": 0.1}}
    assert list(cfg["placeholders"]) == ["optimizer.params.lr"]
    assert "placeholder" in cfg["comment"]


@pytest.mark.parametrize("zero,pp,accum", [(0, 1, None), (1, 1, "fp32"), (2, 1, "fp32"),
                                           (3, 1, "fp32"), (0, 2, None), (1, 2, "fp32")])
def test_deepspeed_bf16_gradients_in_fp32(zero, pp, accum):
    plan = _dp_only(zero_stage=zero, pp=pp, dp=8 // pp)
    cfg = export.deepspeed_config(plan)
    assert cfg["communication_data_type"] == "fp32"
    assert cfg.get("data_types", {}).get("grad_accum_dtype") == accum
    # DeepSpeed refuses fp32 accumulation without ZeRO: the note says what runs instead
    assert ("accumulates gradients in bf16" in cfg["comment"]) == (zero == 0)
    assert ("BF16_Optimizer" in cfg["comment"]) == (pp > 1)


def test_deepspeed_fp32_sets_no_data_types():
    cfg = export.deepspeed_config(_dp_only(precision="fp32"))
    assert "data_types" not in cfg and "communication_data_type" not in cfg
    assert not cfg["bf16"]["enabled"] and not cfg["fp16"]["enabled"]


def test_deepspeed_tensor_parallel_runs_as_autotp():
    cfg = export.deepspeed_config(_dp_only(dp=4, tp=2))
    assert cfg["tensor_parallel"] == {"autotp_size": 2}
    assert "AutoTP" in cfg["comment"] and "mpu=deepspeed.utils.groups" in cfg["comment"]
    # sequence parallelism or a pipeline: Megatron-DeepSpeed, not AutoTP
    for plan in (_dp_only(dp=4, tp=2, sequence_parallel=True),
                 _dp_only(dp=2, tp=2, pp=2, zero_stage=1)):
        cfg = export.deepspeed_config(plan)
        assert "tensor_parallel" not in cfg
        assert "Megatron-DeepSpeed" in cfg["comment"] and "mpu" in cfg["comment"]


def test_deepspeed_pipeline_checkpoints_every_layer():
    cfg = export.deepspeed_config(_dp_only(dp=4, pp=2, zero_stage=1, recompute="full"))
    assert cfg["pipeline"] == {"activation_checkpoint_interval": 1}
    assert "PipelineModule(num_stages=2)" in cfg["comment"]
    assert "like ZeRO-1, as planned" in cfg["comment"]
    cfg = export.deepspeed_config(_dp_only(dp=4, pp=2, zero_stage=0))
    assert "pipeline" not in cfg  # no recompute
    assert "which the plan does not count" in cfg["comment"]


def test_deepspeed_notes_and_refusals():
    plan = _plan(schedule="1f1b", virtual_stages=1)
    cfg = export.deepspeed_config(plan)
    assert "tensor parallel 4" in cfg["comment"] and "pipeline parallel 2" in cfg["comment"]
    assert "PipeModelDataParallelTopology(num_pp=2, num_mp=4, num_dp=2)" in cfg["comment"]
    with pytest.raises(ValueError, match="schedule zbv"):
        export.deepspeed_config(_plan(schedule="zbv", zero_stage=2))
    with pytest.raises(ValueError, match="ZeRO-2 with pp=2"):
        export.deepspeed_config(_plan(schedule="1f1b", virtual_stages=1, zero_stage=2))


# ---- Megatron-LM ----------------------------------------------------------------------------

def test_megatron_args_match_plan():
    plan = _plan()
    f = _flags(export.megatron_args(plan, fill=FILL))
    assert f["--tensor-model-parallel-size"] == "4"
    assert f["--pipeline-model-parallel-size"] == "2"
    assert f["--num-layers-per-virtual-pipeline-stage"] == str(80 // (2 * 2))
    assert "--sequence-parallel" in f and "--use-distributed-optimizer" in f
    assert f["--recompute-granularity"] == "selective"
    assert f["--micro-batch-size"] == "2" and f["--global-batch-size"] == "64"
    assert f["--seq-length"] == "4096" and f["--num-layers"] == "80"
    assert f["--num-query-groups"] == "8" and "--bf16" in f and "--swiglu" in f
    assert f["--attention-backend"] == "flash" and "--use-flash-attn" not in f
    assert "--untie-embeddings-and-output-weights" in f  # Llama 2 has its own output layer
    assert "--use-megatron-fsdp" not in f
    for flag, (name, _) in export.MEGATRON_PLACEHOLDERS.items():
        assert f[flag] == FILL[name]


def _spec(model="llama2-7b", **change):
    return dataclasses.replace(load_model(model), **change)


@pytest.mark.parametrize("model,tied", [("llama2-7b", False), ("gpt2-124m", True)])
@pytest.mark.parametrize("flip", [False, True])
def test_megatron_unties_only_untied_embeddings(model, tied, flip):
    spec = _spec(model, tie_embeddings=tied != flip)  # e.g. a tied Llama-3.2-1B
    args = export.megatron_args(_plan(model=spec, schedule="1f1b", virtual_stages=1))
    assert ("--untie-embeddings-and-output-weights" in args) == (not spec.tie_embeddings)


def test_megatron_env_only_with_tensor_parallelism():
    plan = _plan()
    assert export.megatron_env(plan) == {"CUDA_DEVICE_MAX_CONNECTIONS": "1"}
    assert "export CUDA_DEVICE_MAX_CONNECTIONS=1" in export.megatron(plan).splitlines()
    plan = _dp_only()
    assert export.megatron_env(plan) == {}
    assert "CUDA_DEVICE_MAX_CONNECTIONS" not in export.megatron(plan)


@pytest.mark.parametrize("zero,flags", [
    (0, []), (1, ["--use-distributed-optimizer"]),
    (2, ["--use-distributed-optimizer", "--use-megatron-fsdp",
         "--data-parallel-sharding-strategy", "optim_grads"]),
    (3, ["--use-distributed-optimizer", "--use-megatron-fsdp",
         "--data-parallel-sharding-strategy", "optim_grads_params"])])
def test_megatron_zero_stages(zero, flags):
    args = export.megatron_args(_dp_only(zero_stage=zero))
    got = [a for i, a in enumerate(args) if a in ("--use-distributed-optimizer",
                                                   "--use-megatron-fsdp")
           or (i and args[i - 1] == "--data-parallel-sharding-strategy")
           or a == "--data-parallel-sharding-strategy"]
    assert got == flags


@pytest.mark.parametrize("zero", [1, 2, 3])
def test_megatron_hybrid_sharding_is_distributed_optimizer_instances(zero):
    plan = _dp_only(zero_stage=zero, dp_shard=2 if zero > 1 else 0)
    if zero == 1:  # the torch engine does not hybrid-shard ZeRO-1; Megatron-LM does
        plan = dataclasses.replace(
            plan, job=dataclasses.replace(plan.job, engine="megatron"),
            layout=dataclasses.replace(plan.layout, dp_shard=2))
    args = export.megatron_args(plan)
    i = args.index("--num-distributed-optimizer-instances")
    assert args[i + 1] == "4"  # dp 8 = 4 replicas x shard groups of 2
    assert "--num-distributed-optimizer-instances" not in export.megatron_args(
        _dp_only(zero_stage=zero))


def test_deepspeed_refuses_hybrid_sharding_with_the_reason():
    with pytest.raises(ValueError, match=r"hybrid sharding \(dp_shard=2 of dp=8\).*MiCS"):
        export.deepspeed_config(_dp_only(zero_stage=3, dp_shard=2))


@pytest.mark.parametrize("attention,backend,fusion", [("flash", "flash", True),
                                                      ("fused", "unfused", True),
                                                      ("eager", "unfused", False)])
def test_megatron_attention_backend(attention, backend, fusion):
    f = _flags(export.megatron_args(_dp_only(attention=attention)))
    assert f["--attention-backend"] == backend
    assert ("--no-masked-softmax-fusion" not in f) == fusion


@pytest.mark.parametrize("layout,expect", [
    (dict(dp=4, pp=2, layers_per_stage=(15, 17)), "Et*15|t*17L"),
    (dict(dp=2, pp=4, layers_per_stage=(7, 9, 9, 7)), "Et*7|t*9|t*9|t*7L"),
    (dict(dp=4, pp=2, virtual_stages=2, schedule="interleaved_1f1b",
          layers_per_stage=(7, 8, 8, 9)), "Et*7|t*8|t*8|t*9L"),
    # 32 layers do not divide by 3: the plan's own split
    (dict(nodes=3, dp=8, pp=3), "Et*11|t*11|t*10L")])
def test_megatron_uneven_pipeline_split_is_a_layout(layout, expect):
    plan = _dp_only(num_microbatches=8, **layout)
    f = _flags(export.megatron_args(plan))
    assert f["--pipeline-model-parallel-layout"] == expect
    assert "--num-layers-per-virtual-pipeline-stage" not in f


def test_megatron_even_split_needs_no_layout():
    f = _flags(export.megatron_args(_dp_only(dp=4, pp=2, layers_per_stage=(16, 16))))
    assert "--pipeline-model-parallel-layout" not in f
    assert "--num-layers-per-virtual-pipeline-stage" not in f


def test_megatron_full_recompute_and_plain_layout():
    f = _flags(export.megatron_args(_plan(schedule="1f1b", virtual_stages=1, recompute="full",
                                          zero_stage=0, sequence_parallel=False)))
    assert f["--recompute-granularity"] == "full" and f["--recompute-method"] == "uniform"
    assert "--use-distributed-optimizer" not in f and "--sequence-parallel" not in f
    assert "--num-layers-per-virtual-pipeline-stage" not in f


def test_megatron_rotary_base_is_an_integer():
    f = _flags(export.megatron_args(_plan(model=_spec(rope_theta=1e6))))
    assert f["--rotary-base"] == "1000000"
    with pytest.raises(ValueError, match="rope_theta 10000.5"):
        export.megatron_args(_plan(model=_spec(rope_theta=10000.5)))


@pytest.mark.parametrize("change,match", [({"schedule": "zbv", "zero_stage": 2}, "schedule zbv"),
                                          ({"schedule": "gpipe", "virtual_stages": 1},
                                           "schedule gpipe"),
                                          ({"model": "bert-base"}, "arch bert")])
def test_megatron_refuses_what_it_lacks(change, match):
    with pytest.raises(ValueError, match=match) as info:
        export.megatron_args(_plan(**change))
    assert "planner suggest ... --engine megatron" in str(info.value)  # what to do instead


def _bash_megatron_args(script: str, env: dict, tmp_path) -> subprocess.CompletedProcess:
    path = tmp_path / "megatron_args.sh"
    path.write_text(script)
    code = 'source "$1"; printf "%s\\0" "${MEGATRON_ARGS[@]}"; ' \
           'printf "%s" "${CUDA_DEVICE_MAX_CONNECTIONS-unset}" >&2'
    return subprocess.run(["bash", "-c", code, "bash", str(path)], capture_output=True,
                          env={"PATH": os.environ["PATH"], **env}, check=False)


@pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")
def test_megatron_script_gives_the_arguments(tmp_path):
    plan = _plan()
    done = _bash_megatron_args(export.megatron(plan), FILL, tmp_path)
    assert done.returncode == 0, done.stderr.decode()
    assert done.stdout.decode().split("\0")[:-1] == export.megatron_args(plan, fill=FILL)
    assert done.stderr.decode() == "1"


@pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")
@pytest.mark.parametrize("missing", sorted(FILL))
def test_megatron_script_stops_on_an_unset_placeholder(missing, tmp_path):
    env = {k: v for k, v in FILL.items() if k != missing}
    done = _bash_megatron_args(export.megatron(_plan()), env, tmp_path)
    assert done.returncode != 0 and not done.stdout
    assert f"{missing}: set {missing} to" in done.stderr.decode()


@pytest.mark.skipif(shutil.which("shellcheck") is None, reason="shellcheck not installed")
def test_megatron_script_passes_shellcheck():
    for plan in (_plan(), _dp_only(zero_stage=3, attention="eager")):
        done = subprocess.run(["shellcheck", "-s", "bash", "-"], capture_output=True,
                              input=export.megatron(plan).encode(), check=False)
        assert done.returncode == 0, done.stdout.decode()


# ---- everything together --------------------------------------------------------------------

def test_export_all_and_cli(tmp_path, capsys):
    plan = _plan(schedule="1f1b", virtual_stages=1)
    path = tmp_path / "plan.json"
    plan.save(path)
    files = export.export_all(plan)
    assert set(files) == set(export.FILE_NAMES.values())
    json.loads(files["ds_config.json"])
    assert main(["export", str(path), "--to", "megatron"]) == 0
    out, err = capsys.readouterr()
    assert "    --tensor-model-parallel-size 4" in out.splitlines()
    assert "export CUDA_DEVICE_MAX_CONNECTIONS=1" in out.splitlines()
    assert "LR, TRAIN_ITERS, DATA_PATH, TOKENIZER_MODEL" in err
    out = tmp_path / "ds.json"
    assert main(["export", str(path), "--to", "deepspeed", "--out", str(out)]) == 0
    assert json.loads(out.read_text())["gradient_accumulation_steps"] == 16
    assert main(["export", str(path), "--to", "torchrun", "--master-addr", "h0",
                 "--rdzv-id", "job7"]) == 0
    out = capsys.readouterr().out
    assert "--rdzv-endpoint h0:29500" in out and "--rdzv-id job7" in out
    assert main(["export", str(path), "--to", "slurm", "--cpus-per-task", "32"]) == 0
    assert "#SBATCH --cpus-per-task=32" in capsys.readouterr().out.splitlines()
    zbv = tmp_path / "zbv.json"
    _plan(schedule="zbv", zero_stage=2).save(zbv)
    assert main(["export", str(zbv), "--to", "megatron"]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "Megatron-LM cannot express this plan" in err
