"""`planner simulate --trace`: the timeline in the Trace Event Format (chrome://tracing,
ui.perfetto.dev): valid JSON of that shape, a process per pipeline rank, a thread per stream,
durations equal to the simulator's events, no two events of one thread overlapping."""

import itertools
import json
from collections import defaultdict

import pytest

from planner.cli import main
from planner.hardware import load_cluster
from planner.job import Job
from planner.plan import Layout, Plan
from planner.presets import MODEL_PRESETS
from planner.sim.timeline import simulate
from planner.sim.trace import STREAM_THREADS, trace_events

COMPLETE_KEYS = {"name", "cat", "ph", "ts", "dur", "pid", "tid", "args"}
# ts and dur are microseconds computed from seconds: equal up to float rounding of the product
ROUNDING_US = 1e-6


def _plan(**layout) -> Plan:
    lay = Layout(**layout)
    job = Job(global_batch=lay.dp * lay.micro_batch * lay.num_microbatches, seq_len=4096)
    return Plan(model=MODEL_PRESETS["llama2-7b"], job=job, layout=lay,
                cluster=load_cluster("a100-80g", 1, num_gpus=lay.world_size))


PLANS = [{"pp": 4, "dp": 2, "num_microbatches": 8},
         {"pp": 2, "dp": 4, "zero_stage": 3, "num_microbatches": 4},
         {"pp": 4, "num_microbatches": 8, "schedule": "interleaved_1f1b", "virtual_stages": 2}]


@pytest.mark.parametrize("layout", PLANS)
def test_trace_is_the_simulated_timeline(layout):
    t = simulate(_plan(**layout))
    doc = json.loads(json.dumps(trace_events(t), allow_nan=False))
    assert doc["displayTimeUnit"] == "ms"
    meta = [e for e in doc["traceEvents"] if e["ph"] == "M"]
    spans = [e for e in doc["traceEvents"] if e["ph"] != "M"]
    assert {e["ph"] for e in spans} == {"X"} and all(set(e) == COMPLETE_KEYS for e in spans)
    names = {(e["pid"], e.get("tid"), e["name"]): e["args"] for e in meta}
    for rank in range(t.pp):
        assert names[rank, 0, "process_name"] == {"name": f"pipeline rank {rank}"}
        for tid, thread in STREAM_THREADS.values():
            assert names[rank, tid, "thread_name"] == {"name": thread}
    assert len(spans) == len(t.events)
    for event, span in zip(t.events, spans):
        assert span["pid"] == event.rank and span["tid"] == STREAM_THREADS[event.stream][0]
        assert span["ts"] == pytest.approx(event.start_s * 1e6, rel=1e-12)
        assert span["dur"] == pytest.approx((event.end_s - event.start_s) * 1e6, rel=1e-9,
                                            abs=ROUNDING_US)
        assert span["cat"] == event.kind and span["args"]["id"] == event.id
    threads = defaultdict(list)
    for span in spans:
        threads[span["pid"], span["tid"]].append((span["ts"], span["ts"] + span["dur"]))
    assert {tid for _, tid in threads} == {0, 1}  # compute and communication both carry work
    for intervals in threads.values():
        intervals.sort()
        for (_, end), (start, _) in itertools.pairwise(intervals):
            assert end <= start + ROUNDING_US


def test_cli_writes_the_trace_next_to_the_summary(tmp_path, capsys):
    plan, trace = tmp_path / "plan.json", tmp_path / "trace.json"
    _plan(pp=4, dp=2, num_microbatches=8).save(plan)
    assert main(["simulate", str(plan), "--trace", str(trace)]) == 0
    assert "pipeline bubble" in capsys.readouterr().out
    doc = json.loads(trace.read_text())
    assert doc["otherData"]["pp"] == 4 and len(doc["traceEvents"]) > 4 * 8 * 2
    assert main(["simulate", str(plan), "--trace", str(tmp_path / "no" / "t.json")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--trace" in err and "does not exist" in err
