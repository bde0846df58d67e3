"""One training iteration as a DAG of compute and communication events, list-scheduled on one
compute and one communication stream per pipeline rank (data-parallel replicas are identical).

Events: forward F, backward B (or input-gradient I and weight-gradient W for zero-bubble
schedules) and recompute R of every micro-batch on every model chunk, in the per-rank order of
the schedule (planner/schedules.py, PyTorch's order); point-to-point sends between stages; data
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
import heapq
from dataclasses import dataclass, field

import networkx as nx

from planner.cost.comm_plan import dp_collectives, pp_p2p_per_microbatch, tp_pass_seconds
from planner.cost.compute import LayerTimes, head_times, layer_times, selective_recompute_s
from planner.cost.memory import rank_memory
from planner.cost.time import exposed_tp_per_layer, optimizer_step_s
from planner.plan import SCHEDULES, Plan
from planner.schedules import SPLIT_BACKWARD, rank_actions

PIPELINE_KINDS = ("F", "B", "I", "W", "R")
COMM_KINDS = {"send": "pp", "grad_sync": "dp_grad", "gather": "dp_gather",
              "param_sync": "dp_gather"}
COMM_PRIORITY = {"send": 0, "gather": 1, "grad_sync": 2, "param_sync": 3}
MAX_BUCKETS_PER_CHUNK = 8   # DDP gradient buckets per chunk: one per layer, at most this many
_NO_HEAD = LayerTimes(0.0, 0.0, 0.0, 0.0, 0.0, 0.0)


def _tuple_of(values, name: str, n: int) -> tuple:
    values = tuple(float(x) for x in values)
    if len(values) != n:
        raise ValueError(f"{name} has {len(values)} entries; expected {n}")
    if any(x < 0 for x in values):
        raise ValueError(f"{name} must be >= 0, got {min(values)}")
    return values


@dataclass(frozen=True, kw_only=True)
class SimCosts:
    """Everything the simulator schedules, in seconds.  chunk_* are per model chunk in pipeline
    order and per micro-batch; rank_* per pipeline rank.  Build with `plan_costs(plan)` or by
    hand (tests use uniform stages without communication)."""
    schedule: str
    pp: int
    virtual_stages: int = 1
    num_microbatches: int
    chunk_fwd_s: tuple
    chunk_bwd_s: tuple                     # full backward, weight gradient included
    chunk_wgrad_s: tuple = ()
    chunk_recompute_s: tuple = ()
    chunk_tp_fwd_s: tuple = ()             # TP collectives of the forward (all exposed)
    chunk_tp_recompute_s: tuple = ()       # ... of a full recompute (all exposed)
    chunk_tp_bwd_s: tuple = ()             # ... of the backward
    chunk_tp_bwd_exposed_s: tuple = ()     # the part of chunk_tp_bwd_s not hidden by wgrad
    chunk_param_share: tuple = ()          # fraction of its rank's parameters in each chunk
    chunk_buckets: tuple = ()              # gradient buckets per chunk
    p2p_s: float = 0.0                     # one activation or gradient send between ranks
    dp_mode: str = "none"                  # none | all_reduce | sharded
    dp_overlap: bool = True
    rank_grad_sync_s: tuple = ()           # all_reduce: per step; sharded: per micro-batch
    rank_gather_s: tuple = ()              # sharded: one gather of the rank's parameters
    gathers_per_microbatch: int = 0        # ZeRO-2: 1 (before F), ZeRO-3: 2 (also before B)
    rank_after_step_s: tuple = ()          # ZeRO-1 parameter broadcast after the step
    rank_optimizer_s: tuple = ()
    blocking_p2p: bool = True

    def __post_init__(self):
        _check_schedule(self.schedule, self.pp, self.virtual_stages, self.num_microbatches)
        n, p = self.pp * self.virtual_stages, self.pp
        defaults = {"chunk_wgrad_s": n, "chunk_recompute_s": n, "chunk_tp_fwd_s": n,
                    "chunk_tp_recompute_s": n, "chunk_tp_bwd_s": n, "chunk_tp_bwd_exposed_s": n,
                    "rank_grad_sync_s": p, "rank_gather_s": p,
                    "rank_after_step_s": p, "rank_optimizer_s": p}
        for name in ("chunk_fwd_s", "chunk_bwd_s", *defaults):
            value = getattr(self, name) or (0.0,) * defaults.get(name, 0)
            object.__setattr__(self, name, _tuple_of(value, name, defaults.get(name, n)))
        share = self.chunk_param_share or [1.0 / self.virtual_stages] * n
        object.__setattr__(self, "chunk_param_share", _tuple_of(share, "chunk_param_share", n))
        buckets = tuple(self.chunk_buckets or (1,) * n)
        if len(buckets) != n or any(not isinstance(k, int) or k < 1 for k in buckets):
            raise ValueError(f"chunk_buckets must be {n} integers >= 1, got {list(buckets)}")
        object.__setattr__(self, "chunk_buckets", buckets)
        if self.dp_mode not in ("none", "all_reduce", "sharded"):
            raise ValueError(f"dp_mode must be none, all_reduce or sharded, got {self.dp_mode!r}")
        if any(w > b for w, b in zip(self.chunk_wgrad_s, self.chunk_bwd_s)):
            raise ValueError("chunk_wgrad_s must not exceed chunk_bwd_s")


def _check_schedule(schedule: str, pp: int, v: int, m: int) -> None:
    for name, value in (("pp", pp), ("virtual_stages", v), ("num_microbatches", m)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
    if schedule not in SCHEDULES:
        raise ValueError(f"schedule must be one of {', '.join(SCHEDULES)}; got {schedule!r}")
    if schedule in ("gpipe", "1f1b") and v != 1:
        raise ValueError(f"schedule {schedule} runs one stage per rank; virtual_stages is {v}")
    if schedule == "zbv" and v != 2:
        raise ValueError(f"schedule zbv runs exactly 2 virtual stages per rank, got {v}")


def plan_costs(plan: Plan) -> SimCosts:
    """Durations of every event of `plan`, from the cost model (planner/cost/*)."""
    spec, job, lay = plan.model, plan.job, plan.layout
    gpu = plan.cluster.profile.gpu
    lt, ht = layer_times(gpu, spec, job, lay), head_times(gpu, spec, job, lay)
    tp_pass, tp_bwd = tp_pass_seconds(plan)
    tp_exposed = exposed_tp_per_layer(plan, lt.wgrad_s)
    tp_rec = tp_pass if lay.recompute == "full" else 0.0
    rec = {"none": 0.0, "selective": selective_recompute_s(lt), "full": lt.fwd_s}[lay.recompute]
    layers = lay.stage_layers(spec.num_layers)
    head = [ht if c == len(layers) - 1 else _NO_HEAD for c in range(len(layers))]
    per_rank = [sum(lay.rank_chunk_layers(spec.num_layers)[r]) for r in range(lay.pp)]
    p2p = pp_p2p_per_microbatch(plan)
    return SimCosts(
        schedule=lay.schedule, pp=lay.pp, virtual_stages=lay.virtual_stages,
        num_microbatches=lay.num_microbatches,
        chunk_fwd_s=[n * (lt.fwd_s + tp_pass) + h.fwd_s for n, h in zip(layers, head)],
        chunk_bwd_s=[n * (lt.bwd_s + tp_exposed - tp_pass - tp_rec) + h.bwd_s
                     for n, h in zip(layers, head)],
        chunk_wgrad_s=[n * lt.wgrad_s + h.wgrad_s for n, h in zip(layers, head)],
        chunk_recompute_s=[n * (rec + tp_rec) for n in layers],
        chunk_tp_fwd_s=[n * tp_pass for n in layers],
        chunk_tp_recompute_s=[n * tp_rec for n in layers],
        chunk_tp_bwd_s=[n * tp_bwd for n in layers],
        chunk_tp_bwd_exposed_s=[n * (tp_exposed - tp_pass - tp_rec) for n in layers],
        chunk_param_share=[n / per_rank[lay.chunk_rank(c)] for c, n in enumerate(layers)],
        chunk_buckets=[max(1, min(n, MAX_BUCKETS_PER_CHUNK)) for n in layers],
        p2p_s=p2p[0].time_each_s if p2p else 0.0, **_dp_costs(plan))


def _dp_costs(plan: Plan) -> dict:
    lay = plan.layout
    colls = [dp_collectives(plan, r) for r in range(lay.pp)]
    opt = [optimizer_step_s(plan, rank_memory(plan, r)) for r in range(lay.pp)]
    common = {"rank_optimizer_s": opt, "dp_overlap": plan.job.engine != "megatron"}
    if lay.dp == 1:
        return common
    if lay.zero_stage <= 1:
        return {**common, "dp_mode": "all_reduce", "rank_grad_sync_s": [c[0].time_s for c in colls],
                "rank_after_step_s": [sum(x.time_s for x in c[1:]) for c in colls]}
    return {**common, "dp_mode": "sharded",
            "rank_grad_sync_s": [c[0].time_each_s for c in colls],
            "rank_gather_s": [c[1].time_each_s for c in colls],
            "gathers_per_microbatch": 2 if lay.zero_stage == 3 else 1}


class _Graph:
    """Builds the event DAG: nodes carry rank, stream, kind, stage, mb, dur; edges carry `frac`,
    the fraction of the predecessor that must have run (1 = done, 0 = started)."""

    def __init__(self):
        self.g = nx.DiGraph()
        self.nodes, self.edges = [], []

    def add(self, rank, stream, kind, stage, mb, dur) -> int:
        self.nodes.append((len(self.nodes), {"rank": rank, "stream": stream, "kind": kind,
                                             "stage": stage, "mb": mb, "dur": dur}))
        return len(self.nodes) - 1

    def dep(self, u: int, v: int, frac: float = 1.0) -> None:
        self.edges.append((u, v, {"frac": frac}))

    def finish(self) -> nx.DiGraph:
        self.g.add_nodes_from(self.nodes)
        self.g.add_edges_from(self.edges)
        return self.g


def _compute_events(gb: _Graph, c: SimCosts) -> tuple:
    """Compute events per rank in schedule order, chained on the compute stream."""
    actions = rank_actions(c.schedule, c.pp, c.virtual_stages, c.num_microbatches)
    ids, seq = {}, [[] for _ in range(c.pp)]
    for r, acts in enumerate(actions):
        for kind, s, mb in acts:
            if kind in "BI" and c.chunk_recompute_s[s] > 0:
                ids["R", s, mb] = gb.add(r, "compute", "R", s, mb, c.chunk_recompute_s[s])
                seq[r].append(ids["R", s, mb])
            dur = {"F": c.chunk_fwd_s[s], "B": c.chunk_bwd_s[s], "W": c.chunk_wgrad_s[s],
                   "I": c.chunk_bwd_s[s] - c.chunk_wgrad_s[s]}[kind]
            ids[kind, s, mb] = gb.add(r, "compute", kind, s, mb, dur)
            seq[r].append(ids[kind, s, mb])
        for u, v in zip(seq[r], seq[r][1:]):
            gb.dep(u, v)
    return ids, seq


def _pipeline_deps(gb: _Graph, c: SimCosts, ids: dict, seq: list) -> None:
    """Activations flow forward, gradients backward, through a send when the ranks differ."""
    pos = {e: (r, i) for r, events in enumerate(seq) for i, e in enumerate(events)}
    last, bwd = c.pp * c.virtual_stages - 1, "I" if c.schedule in SPLIT_BACKWARD else "B"
    for m in range(c.num_microbatches):
        for s in range(last + 1):
            entry = ids.get(("R", s, m), ids[bwd, s, m])
            if s < last:
                _link(gb, c, ids["F", s, m], ids["F", s + 1, m], pos, seq)
            if s > 0:
                upstream = ids.get(("R", s - 1, m), ids[bwd, s - 1, m])
                _link(gb, c, ids[bwd, s, m], upstream, pos, seq)
            if s == last:
                gb.dep(ids["F", s, m], entry)
            if bwd == "I":
                gb.dep(ids["I", s, m], ids["W", s, m])


def _link(gb: _Graph, c: SimCosts, u: int, v: int, pos: dict, seq: list) -> None:
    (ru, i), (rv, _) = pos[u], pos[v]
    if ru == rv:
        gb.dep(u, v)
        return
    node = gb.nodes[u][1]
    send = gb.add(ru, "comm", "send", node["stage"], node["mb"], c.p2p_s)
    gb.dep(u, send)
    gb.dep(send, v)
    if c.blocking_p2p and i + 1 < len(seq[ru]):
        gb.dep(send, seq[ru][i + 1])


def _buckets(gb: _Graph, c: SimCosts, r: int, kind: str, e: int, total_s: float) -> list:
    """Split one chunk's collective into its buckets (one per layer, FSDP2 / DDP style)."""
    node = gb.nodes[e][1]
    k = c.chunk_buckets[node["stage"]]
    return [gb.add(r, "comm", kind, node["stage"], node["mb"], total_s / k) for _ in range(k)]


def _grad_events(gb: _Graph, c: SimCosts, r: int, seq: list) -> list:
    """Gradient reduction of rank r in buckets released as the backward walks back through the
    layers: of each chunk's last backward (all_reduce) or of every backward (sharded)."""
    kinds = ("W",) if c.schedule in SPLIT_BACKWARD else ("B",)
    grads = [e for e in seq if gb.nodes[e][1]["kind"] in kinds]
    if c.dp_mode == "all_reduce":
        last = {gb.nodes[e][1]["stage"]: e for e in grads}
        grads = sorted(last.values())
    out = []
    for e in grads:
        s = gb.nodes[e][1]["stage"]
        pieces = _buckets(gb, c, r, "grad_sync", e, c.rank_grad_sync_s[r] * c.chunk_param_share[s])
        for b, piece in enumerate(pieces):
            if c.dp_overlap:
                gb.dep(e, piece, (b + 1) / len(pieces))
            else:
                gb.dep(seq[-1], piece)
        out += pieces
    return out


def _gather_events(gb: _Graph, c: SimCosts, r: int, seq: list) -> None:
    """ZeRO-2/3 parameter all-gathers before each forward (ZeRO-3: and each backward, counting
    its recompute), issued when the previous compute event starts (one-ahead prefetch).  The
    first layer's bucket gates the event, the rest must land before the next event starts."""
    prev_kind = None
    for i, e in enumerate(seq):
        node = gb.nodes[e][1]
        kind = node["kind"]
        backward = c.gathers_per_microbatch == 2 and (
            kind == "R" or kind in ("B", "I") and prev_kind != "R")
        prev_kind = kind
        if kind != "F" and not backward:
            continue
        pieces = _buckets(gb, c, r, "gather", e,
                          c.rank_gather_s[r] * c.chunk_param_share[node["stage"]])
        gb.dep(pieces[0], e)
        for piece in pieces:
            if i > 0:
                gb.dep(seq[i - 1], piece, 0.0)
            if piece is not pieces[0] and i + 1 < len(seq):
                gb.dep(piece, seq[i + 1])


def build_graph(costs: SimCosts) -> nx.DiGraph:
    """The iteration's event DAG (node attributes: rank, stream, kind, stage, mb, dur)."""
    gb = _Graph()
    ids, seq = _compute_events(gb, costs)
    _pipeline_deps(gb, costs, ids, seq)
    for r in range(costs.pp):
        if costs.dp_mode == "sharded" and costs.gathers_per_microbatch:
            _gather_events(gb, costs, r, seq[r])
        grads = _grad_events(gb, costs, r, seq[r]) if costs.dp_mode != "none" else []
        opt = gb.add(r, "compute", "optimizer", -1, -1, costs.rank_optimizer_s[r])
        for u in grads + seq[r][-1:]:
            gb.dep(u, opt)
        if costs.rank_after_step_s[r] > 0:
            gb.dep(opt, gb.add(r, "comm", "param_sync", -1, -1, costs.rank_after_step_s[r]))
    return gb.finish()


def list_schedule(g: nx.DiGraph) -> tuple:
    """(start times, binding predecessor) of every event: an event starts at the latest of its
    dependencies (predecessor start + frac x duration) and its stream's free time; among ready
    events of one stream the earliest-ready (then lowest priority number) goes first.  The
    binding predecessor is the dependency or stream occupant that set the start time."""
    attrs = [a for _, a in g.nodes(data=True)]
    assert all(a is attrs[i] for i, a in g.nodes(data=True)), "nodes must be 0..n-1 in order"
    succ = [[(v, d["frac"]) for v, d in nbrs.items()] for _, nbrs in g.adjacency()]
    n = len(attrs)
    dur = [a["dur"] for a in attrs]
    stream = [(a["rank"], a["stream"]) for a in attrs]
    prio = [COMM_PRIORITY.get(a["kind"], 0) for a in attrs]
    waiting = [0] * n
    for out in succ:
        for v, _ in out:
            waiting[v] += 1
    ready, bind, start = [0.0] * n, [-1] * n, [None] * n
    free, occupant = {}, {}
    heap = [(0.0, prio[i], i) for i in range(n) if waiting[i] == 0]
    heapq.heapify(heap)
    while heap:
        t, pr, i = heapq.heappop(heap)
        st = stream[i]
        if t < free.get(st, 0.0):
            heapq.heappush(heap, (free[st], pr, i))
            continue
        if t > ready[i]:
            bind[i] = occupant[st]
        start[i], free[st], occupant[st] = t, t + dur[i], i
        for v, frac in succ[i]:
            r = t + frac * dur[i]
            if r >= ready[v]:
                ready[v], bind[v] = r, i
            waiting[v] -= 1
            if waiting[v] == 0:
                heapq.heappush(heap, (ready[v], prio[v], v))
    if any(s is None for s in start):
        raise AssertionError("schedule deadlocked: the action order is infeasible")
    return start, bind


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
    return simulate_costs(plan_costs(plan))


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
    by_rank = [[] for _ in range(costs.pp)]
    for e in events:
        by_rank[e.rank].append(e)
    pipe = [e for e in events if e.kind in PIPELINE_KINDS]
    t0, t1 = min(e.start_s for e in pipe), max(e.end_s for e in pipe)
    step = max(e.end_s for e in events)
    busy = [sum(e.end_s - e.start_s for e in evs if e.kind in PIPELINE_KINDS) for evs in by_rank]
    critical = {}
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
    totals = {}
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
