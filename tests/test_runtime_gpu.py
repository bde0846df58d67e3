"""On a CUDA GPU: measured memory against the planner (skipped without CUDA)."""

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from runtime_dist import SPEC, Layout

from planner.cost.memory import rank_memory, rank_model_state
from planner.hardware import load_cluster
from planner.job import Job
from planner.plan import Plan

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]
ROOT = Path(__file__).resolve().parent.parent
GPU_SPEC = dataclasses.replace(SPEC, name="gpu-llama", num_layers=4, hidden_size=1024,
                               num_heads=16, num_kv_heads=4, ffn_hidden_size=2816,
                               vocab_size=32000, max_seq_len=1024)


@pytest.mark.parametrize("recompute", ["none", "full"])
def test_single_gpu_memory_matches_planner(tmp_path, recompute):
    layout = Layout(micro_batch=4, recompute=recompute)
    plan = Plan(model=GPU_SPEC, cluster=load_cluster("h100-80g", 1, num_gpus=1),
                job=Job(global_batch=4, seq_len=1024, precision="bf16"), layout=layout)
    plan.save(tmp_path / "plan.json")
    subprocess.run([sys.executable, "-m", "runtime.train", "--plan", str(tmp_path / "plan.json"),
                    "--steps", "3", "--out", str(tmp_path / "m.json")], cwd=ROOT, check=True)
    rank = json.loads((tmp_path / "m.json").read_text())["ranks"][0]
    states = rank_model_state(plan, 0)
    for key in ("weights_bytes", "gradients_bytes", "optimizer_bytes"):
        assert rank[key] == getattr(states, key)
    mem = rank_memory(plan, 0)
    act = mem.activation_bytes_per_microbatch
    assert abs(rank["activation_bytes_per_microbatch"] - act) <= 0.1 * act
    predicted = mem.total_bytes - mem.framework_bytes
    assert abs(rank["peak_allocated_bytes"] - predicted) <= 0.1 * predicted


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="FSDP2 offload needs dp >= 2 GPUs")
def test_cpu_offload_keeps_the_states_on_the_host(tmp_path):
    """FSDP2 CPUOffloadPolicy (Layout.offload "params"): the rank's states, counted wherever
    they live, are the planner's host bytes; the GPU peak stays within the planner's GPU bytes
    (which no longer hold them) plus 10%."""
    from planner.cost.fields import call, plan_fields, with_rank
    from planner.cost.memory import host_states
    layout = Layout(dp=2, micro_batch=2, zero_stage=3, offload="params")
    plan = Plan(model=GPU_SPEC, cluster=load_cluster("h100-80g", 1, num_gpus=2),
                job=Job(global_batch=4, seq_len=1024, precision="bf16"), layout=layout)
    plan.save(tmp_path / "plan.json")
    subprocess.run(["torchrun", "--standalone", "--nproc-per-node", "2", "-m", "runtime.train",
                    "--plan", str(tmp_path / "plan.json"), "--steps", "3",
                    "--out", str(tmp_path / "m.json")], cwd=ROOT, check=True)
    rank = json.loads((tmp_path / "m.json").read_text())["ranks"][0]
    host = call(host_states, with_rank(plan_fields(plan), 0))
    assert rank["weights_bytes"] + rank["gradients_bytes"] + rank["optimizer_bytes"] == host
    mem = rank_memory(plan, 0)
    assert mem.weights_bytes == mem.gradients_bytes == mem.optimizer_bytes == 0
    predicted = mem.total_bytes - mem.framework_bytes
    assert rank["peak_allocated_bytes"] <= 1.1 * predicted
