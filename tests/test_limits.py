"""planner/limits.py bounds, the strict JSON reader and strict keys (planner/schema.py)."""

import dataclasses
import json
import os
import threading

import pytest

from planner import limits
from planner.hardware import Cluster, load_profile
from planner.job import Job
from planner.limits import check_int, check_range
from planner.schema import check_keys, load_json_file, parse_json


def test_check_range_names_key_value_and_range():
    assert check_range(0.5, "eff", 0, 1, lo_open=True) == 0.5
    for value in (0, 1.5, float("inf"), float("nan"), True, "1", None):
        with pytest.raises(ValueError, match=r"^eff must be .*\(0, 1\], got "):
            check_range(value, "eff", 0, 1, lo_open=True)
    with pytest.raises(ValueError, match=r"num_layers must be in \[1, 10000\], got about 10\^400"):
        check_range(10**400, "num_layers", 1, limits.MAX_LAYERS)
    with pytest.raises(ValueError, match="must be an integer in"):
        check_int(2.0, "n", 1, 3)


@dataclasses.dataclass(frozen=True, kw_only=True)
class _Thing:
    a: int
    b: int = 2


def test_check_keys_requires_defaulted_keys_unless_named_optional():
    with pytest.raises(ValueError, match="thing: missing key 'b'"):
        check_keys({"a": 1}, _Thing, "thing")
    assert check_keys({"a": 1}, _Thing, "thing", optional=("b",)) == {"a": 1}
    with pytest.raises(ValueError, match="thing: unknown key 'c'"):
        check_keys({"a": 1, "b": 2, "c": 3}, _Thing, "thing")


def test_job_keys_are_all_required():
    full = Job(global_batch=8, seq_len=128, precision="fp32").to_dict()
    for key in full:
        with pytest.raises(ValueError, match=f"job: missing key '{key}'"):
            Job.from_dict({k: v for k, v in full.items() if k != key})
    assert Job.from_dict(full).precision == "fp32"
    with pytest.raises(ValueError, match=r"seq len must be in \[1, 16777216\]"):
        Job.from_dict({**full, "seq_len": 2**40})


def test_cluster_is_bounded_and_strict():
    profile = load_profile("a100-80g")
    with pytest.raises(ValueError, match="at most 1,048,576 are planned for"):
        Cluster(profile=profile, num_nodes=2**18)  # x 8 GPUs = 2^21
    with pytest.raises(ValueError, match=r"nodes must be in \[1, 1048576\]"):
        Cluster(profile=profile, num_nodes=10**9)
    data = Cluster(profile=profile, num_nodes=2).to_dict()
    del data["num_gpus"]
    with pytest.raises(ValueError, match="cluster: missing key 'num_gpus'"):
        Cluster.from_dict(data)


@pytest.mark.parametrize("text, message", [
    ('{"a": NaN}', "NaN is not a JSON number"),
    ('{"a": Infinity}', "Infinity is not a JSON number"),
    ('[-Infinity]', "-Infinity is not a JSON number"),
    ('{"a": 1e999}', "out of range"),
    ("[" * 100 + "]" * 100, "nested deeper than 64 levels"),
    ("[" * 100000 + "]" * 100000, "nested deeper than 64 levels"),
    ("1" * 5000, "digits"),
])
def test_parse_json_refuses_non_finite_overflow_and_depth(text, message):
    with pytest.raises(ValueError, match=message):
        parse_json(text)


def test_parse_json_keeps_ordinary_documents():
    assert parse_json('{"a": [1, 2.5e10, -3e-300, null, true], "b": {"c": "x"}}') == \
        {"a": [1, 2.5e10, -3e-300, None, True], "b": {"c": "x"}}


def test_input_files_are_bounded_regular_files(tmp_path):
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    big = tmp_path / "big.json"
    with open(big, "wb") as f:
        f.truncate(limits.MAX_JSON_BYTES + 1)
    cases = {str(fifo): "is not a regular file", "/dev/zero": "is not a regular file",
             str(tmp_path): "is a directory", str(big): "bytes; at most",
             str(tmp_path / "none.json"): "file not found", "x" * 5000: "File name too long",
             "a\x00b": "cannot open", "/proc/self/mem": "cannot read"}
    done = threading.Event()

    def read_all():
        for path, message in cases.items():
            with pytest.raises(ValueError, match=message) as err:
                load_json_file(path, "model")
            assert "\n" not in str(err.value) and len(str(err.value)) < 400
        done.set()

    worker = threading.Thread(target=read_all, daemon=True)
    worker.start()
    worker.join(timeout=20)  # a FIFO opened for reading would block here
    assert done.is_set(), "reading the special files blocked"


def test_a_bom_or_bad_utf8_is_a_one_line_error(tmp_path):
    for raw in (b"\xef\xbb\xbf{}", b"\xff\xfe{}", b"", b"{"):
        path = tmp_path / "x.json"
        path.write_bytes(raw)
        with pytest.raises(ValueError, match="is not valid JSON") as err:
            load_json_file(path, "plan")
        assert "\n" not in str(err.value)


def test_limits_cover_every_preset_and_profile():
    from planner.hardware import list_profiles
    from planner.presets import MODEL_PRESETS
    assert all(s.num_layers <= limits.MAX_LAYERS for s in MODEL_PRESETS.values())
    for name in list_profiles():
        assert load_profile(name).gpu.memory_bytes <= limits.MAX_MEMORY_BYTES
    assert json.loads(json.dumps(limits.MAX_BANDWIDTH)) == limits.MAX_BANDWIDTH
