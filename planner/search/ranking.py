"""`planner suggest`'s engine: enumerate every layout -> prune structurally -> memory verdict
with headroom -> score -> rank by an objective, keeping every rejection under its reason.

The space is held as numpy columns (planner/search/space.py) and scored by
planner/search/scorer.py, which calls the cost model once per unique sub-key.  The top plans are
then re-scored with estimate() so that every number shown or written is exactly the estimate."""

import dataclasses
import time
from dataclasses import dataclass, field

import numpy as np

from planner import rules
from planner.cost.estimate import Estimate, estimate
from planner.hardware import Cluster
from planner.limits import MAX_GPU_COUNTS, MAX_SEARCH_LAYOUTS
from planner.plan import Plan
from planner.report import layout_summary, outside_summary
from planner.search.scorer import Scorer, layout_at
from planner.search.space import concat, enumerate_space, take

OBJECTIVES = ("throughput", "min-gpus", "time-to-train")
# Deterministic tie-break after the objective: less memory, fewer GPUs, then the simpler layout
# (lower pp, tp, ZeRO, recompute, schedule index) - the column order below.
TIE_COLUMNS = ("world", "pp", "tp", "cp", "cp_comm", "zero_stage", "dp_shard", "recompute",
               "recompute_every", "schedule", "virtual_stages", "sequence_parallel", "dp",
               "micro_batch")


@dataclass(frozen=True, kw_only=True)
class SearchOptions:
    objective: str = "throughput"
    top: int = 10
    max_tp: int = 0                 # 0 = GPUs per node
    headroom: float = 0.10          # keep total <= (1 - headroom) x GPU memory
    allow_fewer_gpus: bool = False
    target_tokens_per_s: float = 0.0
    token_budget: float = 0.0       # tokens to train, for time-to-train
    compile: bool = False           # every layout with Layout.compile (torch.compile per block)
    recompute: str | None = None    # a fixed recompute policy (None: search them)
    recompute_every: int | None = None  # a fixed recompute_every (None: search 1, 2, 4)
    dp_shard: int | None = None     # a fixed Layout.dp_shard (None: search the shard groups)
    offload: str | None = "none"    # a fixed Layout.offload (None: search the offloads)

    def __post_init__(self):
        if self.max_tp is None:
            object.__setattr__(self, "max_tp", 0)
        if self.objective not in OBJECTIVES:
            raise ValueError(f"objective must be one of {', '.join(OBJECTIVES)}, "
                             f"got {self.objective!r}")
        if not isinstance(self.top, int) or self.top < 1:
            raise ValueError(f"--top must be a positive integer, got {self.top!r}")
        if self.max_tp < 0:
            raise ValueError(f"--max-tp must be positive, got {self.max_tp}")
        if not 0 <= self.headroom < 1:
            raise ValueError(f"--headroom must be in [0, 1), got {self.headroom}")
        if self.target_tokens_per_s < 0:
            raise ValueError(f"--target-tokens-per-s must be >= 0, got "
                             f"{self.target_tokens_per_s}")
        if self.objective == "time-to-train" and self.token_budget <= 0:
            raise ValueError("objective time-to-train needs --token-budget (tokens to train), "
                             f"got {self.token_budget}")


@dataclass(frozen=True, kw_only=True)
class Candidate:
    """One ranked plan with its exact estimate."""
    plan: Plan
    estimate: Estimate

    @property
    def layout(self):
        return self.plan.layout

    @property
    def total_bytes(self) -> float:
        return self.estimate.memory.total_bytes

    @property
    def step_s(self) -> float:
        return self.estimate.step_s

    @property
    def tokens_per_s(self) -> float:
        return self.estimate.tokens_per_s

    @property
    def mfu(self) -> float:
        return self.estimate.mfu

    @property
    def num_gpus(self) -> int:
        return self.plan.cluster.world_size

    def saved(self) -> Plan:
        """The plan with its estimate attached, as written to plan.json."""
        return self.plan.with_estimate(self.estimate.to_dict())


@dataclass(frozen=True, kw_only=True)
class Rejection:
    key: str
    label: str
    count: int
    example: str     # one rejected layout's first reason, as layout_errors or the estimate says


@dataclass(frozen=True, kw_only=True)
class SearchResult:
    model: object
    cluster: Cluster
    job: object
    options: SearchOptions
    ranked: list            # Candidate, best first (at most options.top)
    rejections: list        # Rejection, most frequent first
    num_considered: int
    num_fit: int
    elapsed_s: float
    closest: Candidate | None = None   # when nothing fits: the layout needing the least memory
    fit_table: dict | None = field(default=None, repr=False)  # columns of every plan that fits

    @property
    def rejected(self) -> dict:
        return {r.label: r.count for r in self.rejections}

    @property
    def best(self) -> Candidate | None:
        return self.ranked[0] if self.ranked else None

    @property
    def feasible(self) -> list:
        """Every plan that fits, in rank order, as FitRow (fast-scorer numbers)."""
        table = self.fit_table or {}
        return [FitRow(layout=layout_at(table, i), **{
            k: float(table[k][i]) for k in ("total_bytes", "step_s", "tokens_per_s",
                                                      "mfu")}) for i in _rank_order(self)]


@dataclass(frozen=True, kw_only=True)
class FitRow:
    layout: object
    total_bytes: float
    step_s: float
    tokens_per_s: float
    mfu: float


def gpu_counts(cluster: Cluster, allow_fewer: bool) -> list:
    """GPU counts to search: all of them, or also every whole-node count below (and every
    count up to one node when the cluster is a single node)."""
    world, gpn = cluster.world_size, cluster.profile.gpus_per_node
    if not allow_fewer:
        return [world]
    nodes = world // gpn
    if nodes > MAX_GPU_COUNTS:
        raise ValueError(f"--allow-fewer-gpus would search {nodes:,} GPU counts (every node count "
                         f"up to {nodes:,}); at most {MAX_GPU_COUNTS}: search fewer --nodes, or "
                         f"each node count on its own")
    counts = {n * gpn for n in range(1, nodes + 1)} | {world}
    if world <= gpn:
        counts |= set(range(1, world + 1))
    return sorted(counts)


def cluster_for(cluster: Cluster, world: int) -> Cluster:
    gpn = cluster.profile.gpus_per_node
    nodes = -(-world // gpn)
    return Cluster(profile=cluster.profile, num_nodes=nodes,
                   num_gpus=0 if world == nodes * gpn else world)


class _Search:
    def __init__(self, model, cluster, job, options):
        self.model, self.cluster, self.job, self.opt = model, cluster, job, options
        self.max_tp = options.max_tp or cluster.profile.gpus_per_node
        self._clusters = {}
        self.scorer = Scorer(model, self.cluster_for_world, job)
        self.rejects = {}   # key -> [count, example row cols or message]

    def cluster_for_world(self, world: int) -> Cluster:
        if world not in self._clusters:
            self._clusters[world] = cluster_for(self.cluster, world) \
                if world != self.cluster.world_size else self.cluster
        return self._clusters[world]

    def reject(self, key: str, count: int, example) -> None:
        if count <= 0:
            return
        entry = self.rejects.setdefault(key, [0, example])
        entry[0] += count

    def space(self) -> dict:
        spaces = []
        for world in gpu_counts(self.cluster, self.opt.allow_fewer_gpus):
            cols, bad_shapes = enumerate_space(self.model, self.job, world, self.max_tp,
                                               self.opt.recompute, self.opt.recompute_every,
                                               self.opt.dp_shard, self.opt.offload)
            if bad_shapes:
                dp, tp, pp = bad_shapes[0]
                self.reject("batch", len(bad_shapes),
                            f"dp={dp} (tp={tp}, pp={pp} on {world} GPUs) does not divide "
                            f"global batch {self.job.global_batch}")
            spaces.append(cols)
            self._check_size(sum(c["dp"].size for c in spaces))
        out = concat(spaces)
        out["compile"] = np.full(out["dp"].size, int(self.opt.compile), dtype=np.int64)
        self.considered = int(out["dp"].size) + self.rejects.get("batch", [0])[0]
        return out

    def _check_size(self, layouts: int) -> None:
        if layouts > MAX_SEARCH_LAYOUTS:
            raise ValueError(f"the search would enumerate more than {layouts:,} layouts (at most "
                             f"{MAX_SEARCH_LAYOUTS:,}): use fewer GPUs or a smaller --max-tp, or "
                             f"estimate a chosen layout with planner estimate")

    def structural(self, cols: dict) -> dict:
        """The layouts no rule breaks; the others counted under their first broken rule, with
        that rule's message for the first of them as the example."""
        ctx = rules.Context(model=self.model, profile=self.cluster.profile, job=self.job)
        reason = rules.first_broken(ctx, cols)
        for i, rule in enumerate(rules.RULES):
            rows = np.flatnonzero(reason == i)
            if rows.size:
                self.reject(rule.key, rows.size, rule.message(ctx, rules.row_at(cols, rows[0])))
        return take(cols, reason < 0)

    def plan_at(self, cols: dict, i: int) -> Plan:
        return Plan(model=self.model, cluster=self.cluster_for_world(int(cols["world"][i])),
                    job=self.job, layout=layout_at(cols, i))


def _limit(cluster: Cluster, headroom: float) -> float:
    return (1 - headroom) * cluster.profile.gpu.memory_bytes


def _order(cols: dict, primary: list) -> np.ndarray:
    """Row order: the primary keys (most important first), then the fixed tie-break."""
    keys = [cols[c] for c in reversed(TIE_COLUMNS)] + list(reversed(primary))
    return np.lexsort(keys)


def _primary(opt: SearchOptions, t: dict) -> list:
    speed = -np.round(t["tokens_per_s"], 3)  # round away float noise so equal plans tie
    memory = np.round(t["total_bytes"] / 2**20, 3)
    if opt.objective == "min-gpus":
        return [t["world"], speed, memory]
    return [speed, memory]  # time-to-train orders as throughput: budget / tokens_per_s


def _options(options: SearchOptions | None, kwargs: dict) -> SearchOptions:
    opt = options or SearchOptions(**kwargs)
    if opt.objective == "min-gpus" and not opt.allow_fewer_gpus:
        opt = dataclasses.replace(opt, allow_fewer_gpus=True)
    return opt


def search(model, cluster: Cluster, job, options: SearchOptions | None = None,
           **kwargs) -> SearchResult:
    """Every layout of the cluster (or fewer GPUs), ranked best first by the objective."""
    opt = _options(options, kwargs)
    t0 = time.perf_counter()
    s = _Search(model, cluster, job, opt)
    valid = s.structural(s.space())
    fit, mem, closest = _memory_stage(s, valid)
    table = _time_stage(s, take(valid, fit), mem[fit])
    order = _order(table, _primary(opt, table))
    ranked = _rescore(s, table, order[:opt.top], opt)
    table["order"] = np.argsort(order)
    return SearchResult(model=model, cluster=cluster, job=job, options=opt, ranked=ranked,
                        rejections=_rejections(s), num_considered=s.considered,
                        num_fit=int(table["dp"].size), elapsed_s=time.perf_counter() - t0,
                        closest=closest, fit_table=table)


def _memory_stage(s: "_Search", valid: dict) -> tuple:
    """(fits mask, bytes, closest candidate when nothing fits); counts memory rejections."""
    limit = _limit(s.cluster, s.opt.headroom)
    mem = s.scorer.memory(valid, limit)
    host = s.scorer.host_fits(valid, s.cluster.profile)
    if not host.all():
        bad = np.flatnonzero(~host)
        ex = _candidate(s, valid, int(bad[0]))
        s.reject("host_memory", bad.size,
                 f"e.g. {layout_summary(ex.layout)} offloads "
                 f"{_gib(ex.estimate.memory.host_bytes_per_node)} GiB per node > "
                 f"{_gib(ex.estimate.memory.host_capacity_bytes)} GiB of host memory")
    fit = (mem <= limit) & host
    if not fit.all():
        bad = np.flatnonzero(~fit)
        ex = _candidate(s, valid, int(bad[np.argmin(mem[bad])]))
        capacity = s.cluster.profile.gpu.memory_bytes
        s.reject("memory", bad.size, f"e.g. {layout_summary(ex.layout)} needs "
                 f"{_gib(ex.total_bytes)} GiB per GPU > {_gib(limit)} GiB "
                 f"({100 * (1 - s.opt.headroom):.0f}% of {_gib(capacity)}); outside tensors: "
                 f"{outside_summary(ex.estimate.memory)}")
    closest = None
    if valid["dp"].size and not fit.any():
        closest = _candidate(s, valid, int(np.argmin(s.scorer.memory(valid))))
    return fit, mem, closest


def _time_stage(s: "_Search", cols: dict, mem: np.ndarray) -> dict:
    """Columns of the plans that fit and reach the target, with their scores."""
    step = s.scorer.step_time(cols)
    tps, mfu = s.scorer.throughput(cols, step)
    keep = tps >= s.opt.target_tokens_per_s
    if not keep.all():
        miss = np.flatnonzero(~keep)
        best = int(miss[np.argmax(tps[miss])])
        s.reject("target", miss.size, f"the fastest of them reaches {tps[best]:,.0f} tokens/s "
                 f"< {s.opt.target_tokens_per_s:,.0f}: {layout_summary(layout_at(cols, best))}")
    scores = {"total_bytes": mem, "step_s": step, "tokens_per_s": tps, "mfu": mfu}
    return take({**cols, **scores}, keep)


def _candidate(s: _Search, cols: dict, i: int) -> Candidate:
    plan = s.plan_at(cols, i)
    return Candidate(plan=plan, estimate=estimate(plan))


def _rescore(s: _Search, cols: dict, rows, opt: SearchOptions) -> list:
    """Exact estimates of the top rows, re-sorted by them (a stable sort keeps the order of
    rows the estimate scores equal)."""
    cands = [_candidate(s, cols, int(i)) for i in rows]
    gpus = opt.objective == "min-gpus"
    return sorted(cands, key=lambda c: (c.num_gpus if gpus else 0, -round(c.tokens_per_s, 3),
                                        round(c.total_bytes / 2**20, 3)))


def _rejections(s: _Search) -> list:
    out = [Rejection(key=k, label=rules.label(k), count=n, example=ex)
           for k, (n, ex) in s.rejects.items()]
    return sorted(out, key=lambda r: (-r.count, r.key))


def _gib(n: float) -> str:
    return f"{n / 2**30:.2f}"


def _rank_order(result: SearchResult) -> np.ndarray:
    t = result.fit_table
    return np.argsort(t["order"]) if t and t["dp"].size else np.zeros(0, dtype=np.int64)

