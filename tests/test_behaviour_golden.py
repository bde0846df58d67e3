"""Every number of the recorded estimate / suggest / simulate cases is unchanged
(tests/behaviour_cases.py; a relative 1e-9 allows only floating-point summation order)."""

import json
import math

import pytest

from tests.behaviour_cases import GOLDEN, all_cases, argv_of, run_cli

RECORDED = json.loads(GOLDEN.read_text())
IGNORED_KEYS = {"plan", "schema_version"}  # how the plan copy is stored is not behaviour


def assert_same(got, want, path="$"):
    if isinstance(want, dict):
        assert isinstance(got, dict), path
        keys = set(want) - IGNORED_KEYS
        assert keys == set(got) - IGNORED_KEYS, f"{path}: keys {sorted(keys ^ set(got))}"
        for k in keys:
            assert_same(got[k], want[k], f"{path}.{k}")
    elif isinstance(want, list):
        assert isinstance(got, list) and len(got) == len(want), path
        for i, (g, w) in enumerate(zip(got, want)):
            assert_same(g, w, f"{path}[{i}]")
    elif isinstance(want, float) and not isinstance(want, bool):
        assert math.isclose(got, want, rel_tol=1e-9, abs_tol=1e-15), f"{path}: {got} != {want}"
    else:
        assert got == want, f"{path}: {got!r} != {want!r}"


def test_every_case_is_recorded():
    assert len(RECORDED) == len(all_cases()) >= 20


@pytest.mark.parametrize("command,args", all_cases(), ids=lambda x: x[:60])
def test_behaviour_unchanged(command, args):
    key = f"{command} {args}"
    assert_same(run_cli(argv_of(command, args)), RECORDED[key], key)
