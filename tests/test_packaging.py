"""A non-editable `pip install .` carries the hardware profiles as package data: they load from
any working directory (the install has no source tree next to it)."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_profiles_load_after_a_plain_install(tmp_path):
    venv = tmp_path / "venv"
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}  # only the install counts
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    python = venv / "bin" / "python"
    subprocess.run([str(python), "-m", "pip", "install", "-q", "--no-deps", str(ROOT)],
                   check=True, cwd=tmp_path)
    code = ("from planner.hardware import PROFILE_DIR, list_profiles, load_profile;"
            "print(PROFILE_DIR); print(' '.join(list_profiles()));"
            "print(load_profile('a100-80g').gpu.name)")
    out = subprocess.run([str(python), "-c", code], capture_output=True, text=True, check=True,
                         cwd=tmp_path, env=env).stdout.splitlines()
    assert str(venv) in out[0] and str(ROOT) not in out[0]
    assert set(out[1].split()) == {p.stem for p in (ROOT / "hardware_profiles").glob("*.json")}
    assert out[2] == "A100-SXM4-80GB"
