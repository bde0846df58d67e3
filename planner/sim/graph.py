"""The event DAG of one iteration (compute events in each rank's schedule order, sends,
gradient buckets, ZeRO gathers, the optimizer step) and its list scheduling on one compute and one
communication stream per rank."""

import heapq

import networkx as nx

from planner.sim.costs import SimCosts
from planner.sim.schedules import SPLIT_BACKWARD, rank_actions

COMM_PRIORITY = {"send": 0, "gather": 1, "grad_sync": 2, "param_sync": 3}


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
    ids: dict = {}
    seq: list[list] = [[] for _ in range(c.pp)]
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
    if c.dp_mode in ("all_reduce", "deferred"):
        last = {gb.nodes[e][1]["stage"]: e for e in grads}
        grads = sorted(last.values())
    out = []
    for e in grads:
        s = gb.nodes[e][1]["stage"]
        pieces = _buckets(gb, c, r, "grad_sync", e, c.rank_grad_sync_s[r] * c.chunk_param_share[s])
        for b, piece in enumerate(pieces):
            if c.dp_mode == "deferred":  # perform_reduce_grad: after the chunk's last backward
                gb.dep(e, piece, 1.0)
            elif c.dp_overlap:
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
    resharded: dict = {}
    for i, e in enumerate(seq):
        node = gb.nodes[e][1]
        kind = node["kind"]
        if c.dp_mode == "deferred":
            needed = _deferred_gather(c, kind, resharded, node["stage"])
        else:
            backward = c.gathers_per_microbatch == 2 and (
                kind == "R" or kind in ("B", "I") and prev_kind != "R")
            needed = kind == "F" or backward
        prev_kind = kind
        if not needed:
            continue
        pieces = _buckets(gb, c, r, "gather", e,
                          c.rank_gather_s[r] * c.chunk_param_share[node["stage"]])
        gb.dep(pieces[0], e)
        for piece in pieces:
            if i > 0:
                gb.dep(seq[i - 1], piece, 0.0)
            if piece is not pieces[0] and i + 1 < len(seq):
                gb.dep(piece, seq[i + 1])


def _deferred_gather(c: SimCosts, kind: str, resharded: dict, stage: int) -> bool:
    """Whether a compute event of a chunk gathers its parameters under pipelined FSDP2 (no
    reshard after backward; ZeRO-3 reshards after each forward); updates `resharded`."""
    if kind == "W":
        return False
    needed = resharded.get(stage, True)
    resharded[stage] = kind == "F" and c.gathers_per_microbatch == 2
    return needed


def build_graph(costs: SimCosts) -> nx.DiGraph:
    """The iteration's event DAG (node attributes: rank, stream, kind, stage, mb, dur)."""
    gb = _Graph()
    ids, seq = _compute_events(gb, costs)
    _pipeline_deps(gb, costs, ids, seq)
    for r in range(costs.pp):
        if costs.dp_mode in ("sharded", "deferred") and costs.gathers_per_microbatch:
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
    ready, bind = [0.0] * n, [-1] * n
    start: list[float | None] = [None] * n
    free: dict = {}
    occupant: dict = {}
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

