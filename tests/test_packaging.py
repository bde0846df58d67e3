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


def _project() -> dict:
    import tomllib
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]


def test_the_planner_alone_is_light_and_test_installs_every_extra():
    """`pip install parallel-planner` brings neither torch nor streamlit; `[test]` (what CI
    installs) holds every other extra's requirements, so the whole suite runs from it."""
    project = _project()
    names = {req.split(">")[0].split("=")[0].strip() for req in project["dependencies"]}
    assert not {"torch", "streamlit"} & names
    extras = project["optional-dependencies"]
    assert extras["runtime"] == ["torch>=2.13"] and extras["ui"] == ["streamlit>=1.30"]
    for name, requirements in extras.items():
        assert set(requirements) <= set(extras["test"]), name


def test_license_file_and_typed_markers_ship():
    project = _project()
    assert project["license"] == "MIT" and project["license-files"] == ["LICENSE"]
    assert (ROOT / "LICENSE").read_text().startswith("MIT License")
    assert "Typing :: Typed" in project["classifiers"]
    assert (ROOT / "planner" / "py.typed").is_file() and (ROOT / "runtime" / "py.typed").is_file()
    assert "urls" not in project  # no project address is known: none is made up


def test_the_declared_torch_floor_is_the_tested_torch():
    """The runtime uses private PyTorch modules; the floor is the version the suite runs on."""
    import torch
    tested = tuple(int(x) for x in torch.__version__.split("+")[0].split(".")[:2])
    assert tested >= (2, 13)
    assert "pip install torch==2.13.0" in (ROOT / ".ci" / "run").read_text()
