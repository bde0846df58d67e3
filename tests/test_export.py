"""planner export: every format is valid and says exactly what the plan says."""

import json
import shlex

import pytest

from planner import export
from planner.cli import main
from planner.hardware import load_cluster
from planner.job import Job
from planner.plan import Layout, Plan
from planner.presets import load_model


def _plan(nodes=2, precision="bf16", model="llama2-70b", **layout) -> Plan:
    base = dict(dp=2, tp=4, pp=2, sequence_parallel=True, zero_stage=1, micro_batch=2,
                num_microbatches=16, schedule="interleaved_1f1b", virtual_stages=2,
                recompute="selective")
    base.update(layout)
    gb = base["dp"] * base["micro_batch"] * base["num_microbatches"]
    return Plan(model=load_model(model), cluster=load_cluster("a100-80g", nodes),
                job=Job(global_batch=gb, seq_len=4096, precision=precision),
                layout=Layout(**base))


def _flags(args: list) -> dict:
    """--flag value pairs (value None for a switch)."""
    out, i = {}, 0
    while i < len(args):
        has_value = i + 1 < len(args) and not args[i + 1].startswith("--")
        out[args[i]] = args[i + 1] if has_value else None
        i += 2 if has_value else 1
    return out


def test_torchrun_single_node():
    plan = _plan(nodes=1, dp=1, zero_stage=0)
    (line,) = export.torchrun_lines(plan, steps=7)
    argv = shlex.split(line)
    assert argv[:3] == ["torchrun", "--nproc-per-node", "8"]
    assert argv[3:] == ["-m", "runtime.train", "--plan", "plan.json", "--steps", "7"]


def test_torchrun_multi_node_with_hostfile(tmp_path):
    hostfile = tmp_path / "hosts"
    hostfile.write_text("# cluster\nnode-a slots=8\nnode-b\n")
    plan = _plan(nodes=2)
    lines = export.torchrun_lines(plan, hosts=export.read_hostfile(str(hostfile)))
    assert len(lines) == 2
    for rank, text in enumerate(lines):
        comment, cmd = text.split("\n")
        assert comment == f"# on {['node-a', 'node-b'][rank]}"
        f = _flags(shlex.split(cmd)[1:])
        assert f["--nproc-per-node"] == "8" and f["--nnodes"] == "2"
        assert f["--node-rank"] == str(rank) and f["--rdzv-endpoint"] == "node-a:29500"
        assert f["--rdzv-backend"] == "c10d" and f["--plan"] == "plan.json"
    with pytest.raises(ValueError, match="needs 2 nodes"):
        export.torchrun_lines(plan, hosts=["only-one"])


def test_slurm_script():
    text = export.slurm(_plan(nodes=2), steps=5, partition="gpu")
    assert text.startswith("#!/bin/bash\n")
    for line in ("#SBATCH --nodes=2", "#SBATCH --gpus-per-node=8", "#SBATCH --partition=gpu",
                 "#SBATCH --ntasks-per-node=1"):
        assert line in text.splitlines()
    srun = next(x for x in text.replace("\\\n", " ").splitlines() if x.startswith("srun "))
    f = _flags(shlex.split(srun)[6:])
    assert f["--nnodes"] == "2" and f["--steps"] == "5" and f["--plan"] == "plan.json"
    assert f["--rdzv-endpoint"] == "$MASTER_ADDR:$MASTER_PORT" and "-m runtime.train" in srun


def test_deepspeed_config_matches_plan():
    plan = _plan(nodes=1, dp=8, tp=1, pp=1, sequence_parallel=False, zero_stage=2,
                 micro_batch=2, num_microbatches=4, schedule="1f1b", virtual_stages=1,
                 recompute="full", precision="fp16", model="llama2-7b")
    cfg = json.loads(export.deepspeed(plan))
    assert cfg["train_batch_size"] == plan.job.global_batch == \
        cfg["train_micro_batch_size_per_gpu"] * cfg["gradient_accumulation_steps"] * 8
    assert cfg["zero_optimization"]["stage"] == 2
    assert cfg["fp16"] == {"enabled": True} and cfg["bf16"] == {"enabled": False}
    assert cfg["gradient_clipping"] == 1.0 and "activation_checkpointing" in cfg


def test_deepspeed_notes_and_refusals():
    plan = _plan(schedule="1f1b", virtual_stages=1)
    cfg = export.deepspeed_config(plan)
    assert "tensor parallel 4" in cfg["comment"] and "pipeline parallel 2" in cfg["comment"]
    with pytest.raises(ValueError, match="schedule zbv"):
        export.deepspeed_config(_plan(schedule="zbv", zero_stage=2))
    with pytest.raises(ValueError, match="ZeRO-2 with pp=2"):
        export.deepspeed_config(_plan(schedule="1f1b", virtual_stages=1, zero_stage=2))


def test_megatron_args_match_plan():
    plan = _plan()
    f = _flags(export.megatron_args(plan))
    assert f["--tensor-model-parallel-size"] == "4"
    assert f["--pipeline-model-parallel-size"] == "2"
    assert f["--num-layers-per-virtual-pipeline-stage"] == str(80 // (2 * 2))
    assert "--sequence-parallel" in f and "--use-distributed-optimizer" in f
    assert f["--recompute-granularity"] == "selective"
    assert f["--micro-batch-size"] == "2" and f["--global-batch-size"] == "64"
    assert f["--seq-length"] == "4096" and f["--num-layers"] == "80"
    assert f["--num-query-groups"] == "8" and "--bf16" in f and "--swiglu" in f
    text = export.megatron(plan)
    assert shlex.split(text.replace("\\\n", " ")) == export.megatron_args(plan)


def test_megatron_full_recompute_and_plain_layout():
    f = _flags(export.megatron_args(_plan(schedule="1f1b", virtual_stages=1, recompute="full",
                                          zero_stage=0, sequence_parallel=False)))
    assert f["--recompute-granularity"] == "full" and f["--recompute-method"] == "uniform"
    assert "--use-distributed-optimizer" not in f and "--sequence-parallel" not in f
    assert "--num-layers-per-virtual-pipeline-stage" not in f


@pytest.mark.parametrize("change,match", [({"schedule": "zbv", "zero_stage": 2}, "schedule zbv"),
                                          ({"schedule": "gpipe", "virtual_stages": 1},
                                           "schedule gpipe"),
                                          ({"zero_stage": 3}, "ZeRO-3")])
def test_megatron_refuses_what_it_lacks(change, match):
    with pytest.raises(ValueError, match=match):
        export.megatron_args(_plan(**change))


def test_export_all_and_cli(tmp_path, capsys):
    plan = _plan(schedule="1f1b", virtual_stages=1)
    path = tmp_path / "plan.json"
    plan.save(path)
    files = export.export_all(plan)
    assert set(files) == set(export.FILE_NAMES.values())
    json.loads(files["ds_config.json"])
    assert main(["export", str(path), "--to", "megatron"]) == 0
    assert "--tensor-model-parallel-size 4" in capsys.readouterr().out
    out = tmp_path / "ds.json"
    assert main(["export", str(path), "--to", "deepspeed", "--out", str(out)]) == 0
    assert json.loads(out.read_text())["gradient_accumulation_steps"] == 16
    assert main(["export", str(path), "--to", "torchrun", "--master-addr", "h0"]) == 0
    assert "--rdzv-endpoint h0:29500" in capsys.readouterr().out
    zbv = tmp_path / "zbv.json"
    _plan(schedule="zbv", zero_stage=2).save(zbv)
    assert main(["export", str(zbv), "--to", "megatron"]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "Megatron-LM cannot express this plan" in err
