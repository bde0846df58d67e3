"""A simulated iteration in the Trace Event Format (the JSON chrome://tracing and
ui.perfetto.dev open): one process per pipeline rank, one thread per stream the simulator
schedules on (planner/sim/timeline.py: a compute and a communication stream per rank; the
data-parallel replicas are identical, so one stands for all), one complete ("X") event per
simulated event.

Format: https://docs.google.com/document/d/1CvAClvFfyA5R-PhYUmn5OOQtYMH4h6I0nSsKchNAySU
(timestamps and durations in microseconds; "M" metadata events name processes and threads)."""

from planner.sim.timeline import Timeline

US_PER_S = 1e6  # the format's unit is the microsecond
STREAM_THREADS = {"compute": (0, "compute"), "comm": (1, "communication")}
KIND_NAMES = {"F": "forward", "B": "backward", "I": "backward (input grad)",
              "W": "backward (weight grad)", "R": "recompute", "optimizer": "optimizer step",
              "send": "pipeline send", "grad_sync": "DP gradient sync",
              "gather": "ZeRO parameter gather", "param_sync": "ZeRO parameter sync"}


def trace_events(t: Timeline, process_name: str = "pipeline rank") -> dict:
    """The Trace Event Format object of `t` (events in simulation order)."""
    ranks = sorted({e.rank for e in t.events})
    meta = []
    for rank in ranks:
        meta.append(_meta("process_name", rank, 0, f"{process_name} {rank}"))
        meta.append(_meta("process_sort_index", rank, 0, rank, key="sort_index"))
        for tid, name in STREAM_THREADS.values():
            meta.append(_meta("thread_name", rank, tid, name))
    return {"traceEvents": meta + [_event(e) for e in t.events], "displayTimeUnit": "ms",
            "otherData": {"schedule": t.schedule, "pp": t.pp,
                          "virtual_stages": t.virtual_stages,
                          "num_microbatches": t.num_microbatches, "step_s": t.step_s,
                          "bubble_fraction": t.bubble_fraction}}


def _meta(name: str, pid: int, tid: int, value, key: str = "name") -> dict:
    return {"name": name, "ph": "M", "pid": pid, "tid": tid, "args": {key: value}}


def _event(e) -> dict:
    start, end = e.start_s * US_PER_S, e.end_s * US_PER_S
    label = KIND_NAMES.get(e.kind, e.kind)
    if e.mb >= 0:
        label += f" mb {e.mb}"
    if e.stage >= 0:
        label += f" chunk {e.stage}"
    return {"name": label, "cat": e.kind, "ph": "X", "ts": start, "dur": end - start,
            "pid": e.rank, "tid": STREAM_THREADS[e.stream][0],
            "args": {"id": e.id, "kind": e.kind, "micro_batch": e.mb, "chunk": e.stage,
                     "critical": e.critical, "tp_exposed_us": e.tp_exposed_s * US_PER_S}}
