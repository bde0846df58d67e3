"""One training iteration as a DAG of compute and communication events, list-scheduled on one
compute and one communication stream per pipeline rank (data-parallel replicas are identical).

Events: forward F, backward B (or input-gradient I and weight-gradient W for zero-bubble
schedules) and recompute R of every micro-batch on every model chunk, in the per-rank order of
the schedule (planner/sim/schedules.py, PyTorch's order); point-to-point sends between stages; data
parallel gradient reduction in buckets and ZeRO parameter gathers with one-ahead prefetch; the
optimizer step.  TP/SP collectives live inside the layers: their exposed part is inside the
compute events (Event.tp_exposed_s).  An event starts when its dependencies are met
and its stream is free; the comm stream serves ready events in order of readiness (sends first).

Durations and overlap rules come from the cost model (planner/cost/time.py docstring): forward
TP collectives are exposed, the `megatron` engine hides backward TP behind the weight-gradient
GEMM; pipeline sends block the sender until done; the `torch` engine's gradient all-reduce starts
bucket by bucket during each chunk's last backward and FSDP (ZeRO-2/3) reduce-scatters every
micro-batch; the `megatron` engine reduces gradients after the last backward."""
import bisect
import contextlib
import gc
from dataclasses import dataclass, field

from planner.limits import MAX_SIM_PASSES
from planner.plan import Plan
from planner.sim.costs import SimCosts, plan_costs
from planner.sim.graph import build_graph, list_schedule

__all__ = ["CommStat", "Event", "SimCosts", "Timeline", "build_graph", "list_schedule",
           "plan_costs", "simulate", "simulate_costs"]

PIPELINE_KINDS = ("F", "B", "I", "W", "R")
COMM_KINDS = {"send": "pp", "grad_sync": "dp_grad", "gather": "dp_gather",
              "param_sync": "dp_gather"}


@dataclass(frozen=True, kw_only=True, slots=True)
class Event:
    id: int
    rank: int
    stream: str         # compute | comm
    kind: str           # F B I W R optimizer | send grad_sync gather param_sync
    stage: int          # model chunk (-1: whole rank)
    mb: int             # micro-batch (-1: whole step)
    start_s: float
    end_s: float
    critical: bool
    tp_exposed_s: float = 0.0

    def to_dict(self) -> dict:
        return {f: getattr(self, f) for f in self.__slots__}


@dataclass(frozen=True, kw_only=True)
class CommStat:
    """One kind of communication summed over the pipeline ranks of one replica."""
    total_s: float
    exposed_s: float       # while the rank's compute stream is idle (or inside compute for tp)
    overlapped_s: float    # hidden behind compute


@dataclass(frozen=True, kw_only=True)
class Timeline:
    schedule: str
    pp: int
    virtual_stages: int
    num_microbatches: int
    step_s: float                 # critical path: the last event's end
    pipeline_s: float             # first to last forward/backward event
    bubble_fraction: float        # (pipeline_s - busiest rank F/B/I/W/R time) / pipeline_s
    utilisation: tuple            # per rank: compute-stream busy time / step_s
    peak_inflight: tuple          # per rank: most chunk forwards awaiting their backward
    comm: dict                    # tp | pp | dp_grad | dp_gather -> CommStat
    critical_path_s: dict         # event kind -> seconds of it on the critical path
    events: tuple = field(repr=False)

    def to_dict(self, events: bool = True) -> dict:
        d = {k: getattr(self, k) for k in ("schedule", "pp", "virtual_stages",
                                          "num_microbatches", "step_s", "pipeline_s",
                                          "bubble_fraction", "critical_path_s")}
        d["utilisation"], d["peak_inflight"] = list(self.utilisation), list(self.peak_inflight)
        d["comm"] = {k: {"total_s": v.total_s, "exposed_s": v.exposed_s,
                         "overlapped_s": v.overlapped_s} for k, v in self.comm.items()}
        if events:
            d["events"] = [e.to_dict() for e in self.events]
        return d


def simulate(plan: Plan) -> Timeline:
    """Simulate one iteration of `plan` with durations from the cost model."""
    check_simulation_size(plan.layout)
    return simulate_costs(plan_costs(plan))


def check_simulation_size(layout) -> None:
    """Refuse an iteration too large to simulate (limits.MAX_SIM_PASSES micro-batch x chunk
    passes), with one line."""
    passes = layout.num_microbatches * layout.num_chunks
    if passes > MAX_SIM_PASSES:
        raise ValueError(f"{layout.num_microbatches} micro-batches x {layout.num_chunks} model "
                         f"chunk(s) = {passes:,} passes to simulate; at most "
                         f"{MAX_SIM_PASSES:,} are drawn (planner estimate gives the "
                         f"step time of larger iterations)")


def simulate_costs(costs: SimCosts) -> Timeline:
    with _gc_paused():  # ~10^5 small dicts: generational GC passes would double the run time
        return _simulate(costs)


@contextlib.contextmanager
def _gc_paused():
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


def _simulate(costs: SimCosts) -> Timeline:
    g = build_graph(costs)
    start, bind = list_schedule(g)
    attrs = [a for _, a in g.nodes(data=True)]
    end = [t + a["dur"] for t, a in zip(start, attrs)]
    last = max(range(len(end)), key=end.__getitem__)
    critical = set()
    while last >= 0:
        critical.add(last)
        last = bind[last]
    events = tuple(Event(id=i, rank=a["rank"], stream=a["stream"], kind=a["kind"],
                         stage=a["stage"], mb=a["mb"], start_s=start[i], end_s=end[i],
                         critical=i in critical,
                         tp_exposed_s=_tp_share(costs, a["kind"], a["stage"])[1])
                   for i, a in enumerate(attrs))
    return _summarise(costs, events)


def _tp_share(costs: SimCosts, kind: str, s: int) -> tuple:
    """(total, exposed) seconds of TP collectives inside one compute event."""
    if kind == "F":
        return costs.chunk_tp_fwd_s[s], costs.chunk_tp_fwd_s[s]
    if kind == "R":
        return costs.chunk_tp_recompute_s[s], costs.chunk_tp_recompute_s[s]
    if kind in ("B", "I"):
        return costs.chunk_tp_bwd_s[s], costs.chunk_tp_bwd_exposed_s[s]
    return 0.0, 0.0


def _summarise(costs: SimCosts, events: tuple) -> Timeline:
    by_rank: list[list] = [[] for _ in range(costs.pp)]
    for e in events:
        by_rank[e.rank].append(e)
    pipe = [e for e in events if e.kind in PIPELINE_KINDS]
    t0, t1 = min(e.start_s for e in pipe), max(e.end_s for e in pipe)
    step = max(e.end_s for e in events)
    busy = [sum(e.end_s - e.start_s for e in evs if e.kind in PIPELINE_KINDS) for evs in by_rank]
    critical: dict = {}
    for e in events:
        if e.critical:
            critical[e.kind] = critical.get(e.kind, 0.0) + e.end_s - e.start_s
    return Timeline(
        schedule=costs.schedule, pp=costs.pp, virtual_stages=costs.virtual_stages,
        num_microbatches=costs.num_microbatches, step_s=step, pipeline_s=t1 - t0,
        bubble_fraction=(t1 - t0 - max(busy)) / (t1 - t0) if t1 > t0 else 0.0,
        utilisation=tuple(b / step if step else 0.0 for b in busy),
        peak_inflight=tuple(_peak_inflight(evs) for evs in by_rank),
        comm=_comm_stats(costs, by_rank), critical_path_s=critical, events=events)


def _peak_inflight(rank_events: list) -> int:
    """Most forwards whose backward (B, or I for split backwards) has not finished: the
    activations a rank holds (planner/cost/pipeline.inflight_chunks counts the same)."""
    held = peak = 0
    for e in sorted((e for e in rank_events if e.stream == "compute"), key=lambda e: e.start_s):
        held += 1 if e.kind == "F" else -1 if e.kind in ("B", "I") else 0
        peak = max(peak, held)
    return peak


def _comm_stats(costs: SimCosts, by_rank: list) -> dict:
    """Exposed vs overlapped seconds per kind: a comm event is overlapped while its rank's
    compute stream is busy; TP collectives are exposed as far as they sit inside compute."""
    totals: dict = {}
    for evs in by_rank:
        busy = sorted((e.start_s, e.end_s) for e in evs if e.stream == "compute")
        for e in evs:
            if e.stream == "compute":
                tp_total, tp_exposed = _tp_share(costs, e.kind, e.stage)
                if tp_total:
                    _add(totals, "tp", tp_total, tp_total - tp_exposed)
            else:
                _add(totals, COMM_KINDS[e.kind], e.end_s - e.start_s,
                     _overlap(busy, e.start_s, e.end_s))
    return {k: CommStat(total_s=t, exposed_s=t - o, overlapped_s=o) for k, (t, o) in totals.items()}


def _add(totals: dict, kind: str, total: float, overlapped: float) -> None:
    t, o = totals.get(kind, (0.0, 0.0))
    totals[kind] = (t + total, o + overlapped)


def _overlap(intervals: list, a: float, b: float) -> float:
    """Length of [a, b] covered by the sorted, disjoint `intervals`."""
    i = bisect.bisect_right(intervals, (a, float("inf"))) - 1
    covered = 0.0
    for s, e in intervals[max(i, 0):]:
        if s >= b:
            break
        covered += max(0.0, min(e, b) - max(s, a))
    return covered
