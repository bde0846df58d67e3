"""`planner run` shortcut: runtime.launch starts torchrun with the plan's world size and stays
torch-free at import."""

import subprocess
import sys

import pytest
from runtime_dist import Layout, make_plan


def test_launch_module_does_not_import_torch():
    code = "import sys, runtime.launch; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_torchrun_command_uses_the_plan_world_size(tmp_path):
    from runtime.launch import torchrun_command
    plan = tmp_path / "plan.json"
    make_plan(Layout(pp=2, dp=2, micro_batch=1, num_microbatches=4)).save(plan)
    cmd = torchrun_command(str(plan), 7, ["--data", "x.txt"])
    assert cmd[1:4] == ["-m", "torch.distributed.run", "--standalone"]
    assert "--nproc-per-node=4" in cmd
    assert cmd[-6:] == ["--plan", str(plan), "--steps", "7", "--data", "x.txt"]


def test_run_plan_refuses_a_bad_plan_before_starting(tmp_path):
    from runtime.launch import run_plan
    with pytest.raises(ValueError, match="plan file not found"):
        run_plan(tmp_path / "missing.json", 1)
