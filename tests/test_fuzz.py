"""Bad input to every loader gives a ValueError (one line), never a deep traceback."""

import json
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from planner.cli import main
from planner.hardware import HardwareProfile, load_profile
from planner.job import Job
from planner.plan import Layout, Plan
from planner.presets import MODEL_PRESETS
from planner.spec import ModelSpec, from_hf_config
from tests.fuzz_cases import (BASES, HANG_S, SLOTS, Files, generate, invoke, open_finding,
                              verdict)

JSON = st.recursive(st.none() | st.booleans() | st.integers(-10**6, 10**6) | st.floats()
                    | st.text(max_size=8),
                    lambda children: st.lists(children, max_size=4)
                    | st.dictionaries(st.text(max_size=8), children, max_size=4), max_leaves=12)


def _only_value_error(fn, *args):
    try:
        fn(*args)
    except ValueError as exc:
        assert "\n" not in str(exc)


def _mutations(base: dict):
    """Strategy: the valid dict with one key set to arbitrary JSON, or one key removed."""
    keys = sorted(base)
    setter = st.tuples(st.sampled_from(keys), JSON).map(lambda kv: {**base, kv[0]: kv[1]})
    dropper = st.sampled_from(keys).map(lambda k: {x: v for x, v in base.items() if x != k})
    return setter | dropper | JSON


@settings(max_examples=150, deadline=None)
@given(_mutations(MODEL_PRESETS["tiny"].to_dict()))
def test_model_spec_loader(data):
    _only_value_error(ModelSpec.from_dict, data)


@settings(max_examples=150, deadline=None)
@given(_mutations({"model_type": "llama", "hidden_size": 64, "num_attention_heads": 4,
                   "num_hidden_layers": 2, "intermediate_size": 128, "vocab_size": 100,
                   "max_position_embeddings": 64}))
def test_hf_config_loader(data):
    _only_value_error(from_hf_config, data)


@settings(max_examples=150, deadline=None)
@given(_mutations(load_profile("a100-80g").to_dict()))
def test_profile_loader(data):
    _only_value_error(HardwareProfile.from_dict, data)


@settings(max_examples=150, deadline=None)
@given(_mutations(Layout(dp=2, num_microbatches=2).to_dict()))
def test_layout_loader(data):
    _only_value_error(Layout.from_dict, data)


@settings(max_examples=100, deadline=None)
@given(_mutations(Job(global_batch=8, seq_len=128).to_dict()))
def test_job_loader(data):
    _only_value_error(Job.from_dict, data)


@settings(max_examples=100, deadline=None)
@given(st.text(max_size=200))
def test_plan_file_loader(tmp_path_factory, text):
    path = tmp_path_factory.mktemp("plans") / "plan.json"
    path.write_text(text)
    _only_value_error(Plan.load, path)


def test_plan_file_with_wrong_nested_types(tmp_path):
    base = Plan(model=MODEL_PRESETS["tiny"], cluster=__import__("planner.hardware").hardware
                .load_cluster("cpu", 1), job=Job(global_batch=8, seq_len=128, precision="fp32"),
                layout=Layout(dp=8)).to_dict()
    for key in ("model", "cluster", "job", "layout"):
        for bad in (None, [], "x", 3, {"unexpected": 1}):
            path = tmp_path / "p.json"
            path.write_text(json.dumps({**base, key: bad}))
            _only_value_error(Plan.load, path)


def _key_paths(data: dict, prefix=()):
    """Every key of a plan dict at every depth (not inside the free-form tables)."""
    for key, value in data.items():
        yield prefix + (key,)
        if isinstance(value, dict) and key not in ("sources", "peak_flops",
                                                   "host_layer_overhead_s"):
            yield from _key_paths(value, prefix + (key,))


def test_no_key_of_a_plan_file_can_be_dropped_silently():
    """A dropped key is an error at every depth (it used to become its default: dropping
    layout.zero_stage and job.precision turned a ZeRO-1 fp32 plan into ZeRO-0 bf16)."""
    from planner.hardware import load_cluster
    plan = Plan(model=MODEL_PRESETS["tiny"], cluster=load_cluster("v100-16g", 1),
                job=Job(global_batch=8, seq_len=128, precision="fp32"),
                layout=Layout(dp=8, zero_stage=1)).to_dict()
    accepted, tried = [], 0
    for path in _key_paths(plan):
        data = json.loads(json.dumps(plan))
        part = data
        for key in path[:-1]:
            part = part[key]
        del part[path[-1]]
        tried += 1
        try:
            Plan.from_dict(data)
            accepted.append(".".join(path))
        except ValueError as exc:
            assert f"missing key {path[-1]!r}" in str(exc)
    assert tried > 60 and not accepted


# --- every sub-command, in process (tests/fuzz_cases.py) ------------------------------------

FIXTURES = Path(__file__).parent / "fixtures"
# Cases per valid invocation that is broken: 5,840 in all, about 25 s on one core here.
PER_BASE = {"estimate": 1000, "estimate-plan": 700, "estimate-hf": 350, "estimate-mesh": 300,
            "suggest": 500, "simulate": 450, "simulate-flags": 300, "export": 450,
            "export-slurm": 250, "export-deepspeed": 150, "compare": 300, "calibrate": 300,
            "models": 120, "profiles": 120, "run": 350, "profile": 200}


@pytest.fixture
def files(tmp_path, monkeypatch):
    """The fuzz inputs; no subprocess may start (run, profile), calibrate's fit is a stub, and
    so is --trace-activations' tracer (transformers on the meta device: tests/test_traced.py)."""
    import planner.calibration.calibrate
    import planner.cli.profile
    import planner.cli.run
    import planner.traced
    from planner.cost.traced_bytes import TracedActivations
    monkeypatch.setattr(planner.traced, "trace", lambda cfg, *, seq_len, precision, attention:
                        TracedActivations(model_class="stub", seq_len=seq_len,
                                          precision=precision, attention=attention,
                                          layer_bytes=(2000, 3000), rest_bytes=(900, 1300)))
    monkeypatch.setattr(planner.cli.run, "launch", lambda cmd: 0)
    monkeypatch.setattr(planner.cli.profile.subprocess, "run",
                        lambda cmd, **kw: subprocess.CompletedProcess(cmd, 1))
    monkeypatch.setattr(planner.calibration.calibrate, "calibrate",
                        lambda runs, profile: (profile, {"efficiency": 1.0}, [0.0] * len(runs),
                                               [0.0] * len(runs)))
    monkeypatch.chdir(tmp_path)
    found = Files(tmp_path, FIXTURES / "measured_cpu_dp2.json")
    plan = tmp_path / "plan.json"
    assert main(BASES["estimate"].format(spec="tiny", profile="cpu", out=plan).split()) == 0
    found.add_plan(plan)
    return found


def test_every_valid_base_invocation_succeeds(files):
    """The fuzz breaks valid invocations: each must succeed unbroken."""
    for name, template in BASES.items():
        if any(f"{{{s}}}" in template and s not in files.valid for s in SLOTS):
            continue
        argv = [files.new_output() if t == "{out}" else files.valid.get(t[1:-1], t)
                if t.startswith("{") else t for t in template.split()]
        code, out, err, _ = invoke(argv)
        if name == "profile":  # the measurement subprocess is stubbed to fail
            assert code == 2 and "measurement failed" in err, err
            continue
        assert code == 0, f"{name}: {err}"
        assert verdict(argv, code, out, err) == ""


def test_every_subcommand_under_malformed_input(files, capsys):
    counts, commands, problems, slowest = Counter(), set(), [], (0.0, None)
    for name, argv in generate(files, PER_BASE):
        commands.add(argv[0])
        if open_finding(argv, None, files):
            counts["open: " + open_finding(argv, None, files)[0]] += 1
            continue
        code, out, err, seconds = invoke(argv)
        problem = verdict(argv, code, out, err)
        slowest = max(slowest, (seconds, name))
        if problem and open_finding(argv, err, files):
            counts["open: " + open_finding(argv, err, files)[0]] += 1
        elif problem:
            counts["problem"] += 1
            problems.append(f"{problem}: {' '.join(map(repr, argv))[:300]} -> {err[-300:]!r}")
        else:
            counts[code] += 1
    total = sum(counts.values())
    opened = ", ".join(f"{k} {v}" for k, v in counts.items() if str(k).startswith("open"))
    with capsys.disabled():
        print(f"\nfuzz: {total} cases over {len(commands)} sub-commands: {counts[0]} exit 0, "
              f"{counts[2]} exit 2 with one line, {counts['problem']} broke the contract"
              f"{'; ' + opened if opened else ''}; slowest {slowest[0]:.2f} s ({slowest[1]})")
    assert not problems, f"{len(problems)} cases broke the contract:\n" + "\n".join(problems[:25])
    assert total >= 5000 and slowest[0] < HANG_S


def test_a_handful_in_real_processes(tmp_path):
    """The same contract with the interpreter's own exit path (no in-process capture)."""
    deep = tmp_path / "deep.json"
    deep.write_text("[" * 100000 + "]" * 100000)
    nan = tmp_path / "nan.json"
    nan.write_text(json.dumps(load_profile("cpu").to_dict()).replace(", \"efficiency\": 1.0",
                                                                     ", \"efficiency\": NaN"))
    assert "NaN" in nan.read_text()
    plan, fifo = tmp_path / "plan.json", tmp_path / "fifo"
    os.mkfifo(fifo)
    assert main(BASES["estimate"].format(spec="tiny", profile="cpu", out=plan).split()) == 0
    cases = [["estimate", "--plan", "/dev/zero"], ["estimate", "--plan", str(deep)],
             ["suggest", "--model", "tiny", "--cluster", str(nan), "--global-batch", "8",
              "--seq-len", "64"],
             ["suggest", "--model", "tiny", "--cluster", "cpu", "--nodes", "1000000000",
              "--global-batch", "8", "--seq-len", "64"],
             ["simulate", str(plan), "--out", str(fifo)],
             ["estimate", "--plan", str(plan), "--out", "/dev/full"]]
    for argv in cases:
        out = subprocess.run([sys.executable, "-m", "planner.cli", *argv], capture_output=True,
                             text=True, timeout=60)
        assert out.returncode == 2, (argv, out.stderr)
        assert len(out.stderr.strip().splitlines()) == 1 and "Traceback" not in out.stderr
