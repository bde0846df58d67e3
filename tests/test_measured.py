"""planner.measured.Measured: the typed measured.json that compare, calibrate and the app read.

tests/fixtures/measured_cpu_dp2.json is a file the runtime really wrote on CPU (peak_allocated_bytes
is null there): the plan of `Plan(model=tiny, cluster=load_cluster("cpu", 1, num_gpus=2),
job=Job(global_batch=8, seq_len=64, precision="fp32"), layout=Layout(dp=2, micro_batch=4,
num_microbatches=1))` saved with its estimate as p.json, then
`torchrun --nproc-per-node 2 --standalone -m runtime.train --plan p.json --steps 2 --out m.json`.
Regenerate it that way when the plan's schema changes."""

import copy
import dataclasses
import json
import math
from pathlib import Path

import pytest

from planner.calibration.calibrate import calibrate
from planner.calibration.compare import compare
from planner.cli import main
from planner.hardware import load_cluster
from planner.measured import Measured, json_depth

FIXTURE = Path(__file__).parent / "fixtures" / "measured_cpu_dp2.json"


def _raw() -> dict:
    return json.loads(FIXTURE.read_text())


def _set(data: dict, path: tuple, value) -> dict:
    out = copy.deepcopy(data)
    node = out
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = value
    return out


def test_the_runtimes_cpu_measured_json_loads_and_round_trips():
    m = Measured.load(FIXTURE)
    assert [r.peak_allocated_bytes for r in m.ranks] == [None, None]  # CPU: no allocator figure
    assert m.step_time_s > 0 and len(m.steps) == 2 and m.plan.layout.dp == 2
    assert Measured.from_dict(m.to_dict()) == m
    raw = _raw()
    assert {k: v for k, v in m.to_dict().items() if k != "plan"} == \
        {k: v for k, v in raw.items() if k != "plan"}
    table = compare(m.plan, m)
    assert "peak memory" not in set(table.component)  # nothing to compare on CPU
    states = table[table.component.isin(["weights", "gradients", "optimizer"])]
    assert (states.error_pct.abs() < 1e-9).all()


GARBAGE = [None, True, False, -1, -0.5, math.inf, -math.inf, math.nan, "1.0", [1], {}]
NUMBER_KEYS = [("step_time_s",), ("tokens_per_s",), ("val_loss",),
               ("ranks", 0, "weights_bytes"), ("ranks", 1, "gradients_bytes"),
               ("ranks", 0, "optimizer_bytes"), ("ranks", 0, "activation_bytes_per_microbatch"),
               ("ranks", 0, "activation_peak_bytes"), ("ranks", 0, "max_rss_bytes"),
               ("steps", 0, "loss"), ("steps", 1, "step_time_s"), ("steps", 0, "lr")]


@pytest.mark.parametrize("path", NUMBER_KEYS, ids=lambda p: ".".join(map(str, p)))
@pytest.mark.parametrize("value", GARBAGE, ids=repr)
def test_garbage_numbers_are_refused_naming_key_and_value(path, value):
    with pytest.raises(ValueError) as err:
        Measured.from_dict(_set(_raw(), path, value))
    msg = str(err.value)
    assert path[-1] in msg and "\n" not in msg
    if value is not None and not isinstance(value, (list, dict)):
        assert repr(value) in msg or str(value) in msg


@pytest.mark.parametrize("value", [True, -1, math.nan, math.inf, "0"], ids=repr)
def test_peak_allocated_bytes_is_null_or_a_number(value):
    with pytest.raises(ValueError, match="peak_allocated_bytes"):
        Measured.from_dict(_set(_raw(), ("ranks", 0, "peak_allocated_bytes"), value))
    cuda = Measured.from_dict(_set(_raw(), ("ranks", 0, "peak_allocated_bytes"), 123456))
    assert cuda.ranks[0].peak_allocated_bytes == 123456


@pytest.mark.parametrize("path,value,phrase", [
    (("ranks", 0, "rank"), 1, "rank 1 appears twice"),
    (("ranks", 1, "rank"), 2, "outside the plan's 2 ranks"),
    (("ranks", 1, "rank"), True, "rank must be an integer"),
    (("ranks", 1, "coords", "dp"), 2, "outside the plan's pp=1 dp=2 tp=1"),
    (("ranks", 1, "coords", "tp"), -1, "tp must be >= 0"),
    (("ranks",), [], "non-empty"),
    (("ranks",), {"0": {}}, "ranks must be a list"),
    (("steps",), None, "steps must be a list"),
    (("steps", 0, "step"), 0.5, "step must be an integer"),
    (("schema_version",), 2, "schema_version must be 1"),
    (("schema_version",), True, "schema_version must be 1"),
    (("plan", "layout", "dp"), 3, "plan:"),
    (("plan",), None, "plan:"),
])
def test_structure_is_checked(path, value, phrase):
    with pytest.raises(ValueError, match=phrase):
        Measured.from_dict(_set(_raw(), path, value))


def test_unknown_and_missing_keys_are_refused():
    with pytest.raises(ValueError, match="unknown key 'extra'"):
        Measured.from_dict({**_raw(), "extra": 1})
    for key in ("steps", "ranks", "val_loss"):
        raw = _raw()
        del raw[key]
        with pytest.raises(ValueError, match=f"missing key '{key}'"):
            Measured.from_dict(raw)
    raw = _raw()
    del raw["ranks"][1]["peak_allocated_bytes"]  # null is allowed; absent is not
    with pytest.raises(ValueError, match=r"ranks\[1\]: missing key 'peak_allocated_bytes'"):
        Measured.from_dict(raw)
    with pytest.raises(ValueError, match=r"ranks\[0\].coords: unknown key 'sp'"):
        Measured.from_dict(_set(_raw(), ("ranks", 0, "coords", "sp"), 0))
    with pytest.raises(ValueError, match="expected a JSON object"):
        Measured.from_dict([_raw()])


def test_a_run_without_steps_is_named():
    raw = {**_raw(), "steps": [], "step_time_s": None, "tokens_per_s": None}
    with pytest.raises(ValueError, match="measured no step"):
        Measured.from_dict(raw)


def _other_plans(plan):
    lay = dataclasses.replace(plan.layout, micro_batch=2, num_microbatches=2)
    job = dataclasses.replace(plan.job, seq_len=32)
    cluster = load_cluster("a100-80g", 1, num_gpus=2)
    return [(dataclasses.replace(plan, layout=lay), "layout.micro_batch is 4 there and 2"),
            (dataclasses.replace(plan, job=job), "job.seq_len is 64 there and 32"),
            (dataclasses.replace(plan, cluster=cluster), "cluster.profile"),
            (dataclasses.replace(plan, model=dataclasses.replace(plan.model, name="other")),
             "model.name is 'tiny' there and 'other'")]


def test_compare_refuses_a_measured_json_of_another_plan(tmp_path, capsys):
    m = Measured.load(FIXTURE)
    compare(dataclasses.replace(m.plan, estimate=None), m)  # the estimate does not count
    for i, (plan, phrase) in enumerate(_other_plans(m.plan)):
        with pytest.raises(ValueError, match="measured under another plan") as err:
            compare(plan, m)
        assert phrase in str(err.value)
        plan.save(tmp_path / f"other{i}.json")
        assert main(["compare", str(tmp_path / f"other{i}.json"), str(FIXTURE)]) == 2
        err = capsys.readouterr().err
        assert phrase in err and err.count("\n") == 1


BAD_FILES = {
    "null step time": lambda raw: _set(raw, ("step_time_s",), None),
    "bool bytes": lambda raw: _set(raw, ("ranks", 0, "weights_bytes"), True),
    "negative bytes": lambda raw: _set(raw, ("ranks", 1, "optimizer_bytes"), -5),
    "inf": lambda raw: _set(raw, ("tokens_per_s",), math.inf),
    "nan": lambda raw: _set(raw, ("ranks", 0, "activation_bytes_per_microbatch"), math.nan),
    "string": lambda raw: _set(raw, ("val_loss",), "low"),
    "not an object": lambda raw: [raw],
}


def _write_bad(tmp_path, name) -> Path:
    path = tmp_path / f"{name.replace(' ', '_')}.json"
    path.write_text(json.dumps(BAD_FILES[name](_raw())))  # NaN/Infinity as json.dumps writes
    return path


@pytest.mark.parametrize("name", BAD_FILES)
def test_compare_and_calibrate_refuse_garbage_with_one_line(tmp_path, capsys, name):
    path = _write_bad(tmp_path, name)
    plan = tmp_path / "plan.json"
    Measured.load(FIXTURE).plan.save(plan)
    for argv in (["compare", str(plan), str(path)],
                 ["calibrate", str(FIXTURE), str(path), "--profile", "cpu",
                  "--out", str(tmp_path / "cal.json")]):
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"planner {argv[0]}: error:") and err.count("\n") == 1, err
    assert not (tmp_path / "cal.json").exists()


def test_deeply_nested_or_missing_files_are_one_line_errors(tmp_path, capsys):
    deep = tmp_path / "deep.json"
    deep.write_text("[" * 100_000 + "]" * 100_000)
    plan = tmp_path / "plan.json"
    Measured.load(FIXTURE).plan.save(plan)
    for target in (deep, tmp_path / "absent.json"):
        assert main(["compare", str(plan), str(target)]) == 2
        assert capsys.readouterr().err.count("\n") == 1


def test_calibrate_takes_measured_runs():
    m = Measured.load(FIXTURE)
    profile = m.plan.cluster.profile
    _, factors, before, after = calibrate([m], profile)
    assert set(factors) == {"efficiency", "overhead", "latency"}
    assert abs(after[0]) <= abs(before[0])
    with pytest.raises(ValueError, match="at least one"):
        calibrate([], profile)
    with pytest.raises(ValueError, match="Measured runs"):
        calibrate([(m.plan, m.to_dict())], profile)


def test_json_depth_ignores_brackets_in_strings_and_is_linear():
    assert json_depth('{"a": [1, {"b": "[[[{{{"}], "c": "\\"]"}') == 3
    assert json_depth("") == 0 and json_depth("[" * 100_000) == 100_000
    assert json_depth('"\\' * 300_000) == 0  # unterminated escapes: no backtracking
