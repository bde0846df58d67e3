"""Lint and types: `ruff check .` and `mypy` (their configuration is in pyproject.toml) find
nothing.  Run them alone with `python -m ruff check .` and `python -m mypy`."""

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _run(tool: str, *args: str) -> None:
    if importlib.util.find_spec(tool) is None:
        pytest.skip(f"{tool} is not installed (pip install -e '.[test]')")
    proc = subprocess.run([sys.executable, "-m", tool, *args], cwd=ROOT, capture_output=True,
                          text=True)
    assert proc.returncode == 0, f"{tool} found problems:\n{proc.stdout}{proc.stderr}"


def test_ruff_finds_nothing():
    _run("ruff", "check", ".")


def test_mypy_finds_nothing():
    _run("mypy")  # files and options: [tool.mypy]; .mypy_cache keeps reruns incremental
