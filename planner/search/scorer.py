"""Score many layouts at once without a second copy of the cost model.

Every cost function of planner/cost is called as is, once per unique sub-key of the fields it
reads (layer times depend on tp, sp and micro-batch only; model states on dp, tp, zero and the
rank's layers), on a representative row; numpy then combines those pieces the way
planner.cost.memory.rank_memory and planner.cost.time.time_breakdown do.  Only that combining
glue (a few sums and maxima) is restated here, and tests/test_search.py checks the result equals
estimate(plan) on samples of every search space it runs.

Per plan only four pipeline ranks are evaluated: 0, 1, the first rank with one layer fewer
(uneven splits) and the last.  Every rank type (layers held, first chunk, last chunk) has its
smallest rank among them, and within a type memory and time do not grow with the rank (in-flight
micro-batches fall with the rank in every schedule), so maxima over ranks are maxima over these."""

from dataclasses import dataclass

import numpy as np

from planner.cost import activations as act
from planner.cost import memory as cost_memory
from planner.cost import time as cost_time
from planner.cost.comm_plan import dp_collectives, pp_p2p_per_microbatch
from planner.cost.compute import head_times, layer_times, selective_recompute_s
from planner.cost.flops import model_flops_per_step
from planner.cost.pipeline import head_inflight, inflight_chunks
from planner.plan import RECOMPUTE, SCHEDULES, ZERO_BUBBLE, Layout
from planner.search.space import SCHED, take


@dataclass(frozen=True, kw_only=True)
class _View:
    """Plan-shaped object (model, cluster, job, layout) the cost functions read; unvalidated."""
    model: object
    cluster: object
    job: object
    layout: Layout


def layout_at(cols: dict, i: int) -> Layout:
    return Layout(dp=int(cols["dp"][i]), tp=int(cols["tp"][i]), pp=int(cols["pp"][i]),
                  sequence_parallel=bool(cols["sp"][i]), zero_stage=int(cols["zero"][i]),
                  micro_batch=int(cols["mb"][i]), num_microbatches=int(cols["m"][i]),
                  schedule=SCHEDULES[int(cols["sched"][i])], virtual_stages=int(cols["v"][i]),
                  recompute=RECOMPUTE[int(cols["rc"][i])])


def _row_codes(rows: np.ndarray) -> np.ndarray:
    """One int64 per row, equal iff the rows are equal (mixed radix over non-negative ints;
    much faster than np.unique(axis=0))."""
    low = rows.min(axis=0)
    radix = rows.max(axis=0) - low + 1
    if np.prod(radix.astype(float)) >= 2.0 ** 62:
        return np.unique(rows, axis=0, return_inverse=True)[1].ravel()
    code = np.zeros(rows.shape[0], dtype=np.int64)
    for j in range(rows.shape[1]):
        code = code * radix[j] + (rows[:, j] - low[j])
    return code


def per_unique(keys: list, fn, memo: dict = None) -> np.ndarray:
    """fn(i) for one representative row i of each unique combination of the key columns,
    scattered back to every row: shape (rows, outputs).  `memo` keeps results across calls."""
    stacked = np.stack(keys, axis=1).astype(np.int64)
    code = _row_codes(stacked)
    _, first, inverse = np.unique(code, return_index=True, return_inverse=True)
    uniq = stacked[first]
    memo = {} if memo is None else memo
    values = []
    for key, i in zip(map(tuple, uniq.tolist()), first):
        if key not in memo:
            memo[key] = fn(int(i))
        values.append(memo[key])
    return np.array(values, dtype=float).reshape(len(first), -1)[inverse.ravel()]


class Scorer:
    """Step time and most-loaded-rank memory of every row of a (structurally valid) space."""

    def __init__(self, model, cluster_for_world, job):
        self.model, self.job = model, job
        self.cluster_for_world = cluster_for_world  # world size -> Cluster
        self._memo = {}  # function name -> {key: result}, shared by every call

    def _unique(self, name: str, keys: list, fn) -> np.ndarray:
        return per_unique(keys, fn, self._memo.setdefault(name, {}))

    def _states(self, cols: dict, r: np.ndarray, facts: np.ndarray) -> np.ndarray:
        """Model states, gathered copies, framework bytes and optimizer time of rank r: they
        depend on dp, tp, ZeRO and what the rank holds (planner.cost.memory.rank_memory)."""
        layers, _, first, last = facts.T
        # not the world size or pp: only what the rank holds and how dp/tp/ZeRO shard it
        key = [cols["dp"], cols["tp"], cols["zero"], layers, first, last]

        def states(i):
            v = self.view(cols, i)
            mem = cost_memory.rank_memory(v, int(r[i]))
            return (mem.weights_bytes, mem.gradients_bytes, mem.optimizer_bytes,
                    mem.gathered_params_bytes, mem.framework_bytes,
                    cost_time.optimizer_step_s(v, mem))

        return self._unique("states", key, states)

    def view(self, cols: dict, i: int) -> _View:
        cluster = self.cluster_for_world(int(cols["world"][i]))
        return _View(model=self.model, cluster=cluster, job=self.job, layout=layout_at(cols, i))

    def memory(self, cols: dict, limit: float = None) -> np.ndarray:
        """Bytes on the most loaded rank of every row (MemoryBreakdown.total_bytes).

        With a `limit`, a row stops being evaluated at the first rank found over it (its value
        is then that rank's bytes, a lower bound above the limit): the verdict is the same and
        the costly model-state calls are only made for rows still in the running."""
        mem = np.zeros(cols["dp"].size)
        alive = np.ones(mem.size, dtype=bool)
        for r in self._slot_ranks(cols):
            idx = np.flatnonzero(alive)
            if idx.size == 0:
                break
            sub = take(cols, idx)
            mem[idx] = np.maximum(mem[idx], self._rank_memory(sub, r[idx],
                                                              self._memory_pieces(sub)))
            if limit is not None:
                alive[idx] = mem[idx] <= limit
        return mem

    def step_time(self, cols: dict) -> np.ndarray:
        """Seconds per training step of every row (TimeBreakdown.step_s)."""
        if cols["dp"].size == 0:
            return np.zeros(0)
        layer = self._time_pieces(cols)
        ranks = [self._rank_time(cols, r, layer) for r in self._slot_ranks(cols)]
        return self._step(cols, ranks, layer)

    def throughput(self, cols: dict, step_s: np.ndarray) -> tuple:
        """(tokens/s, MFU) as Estimate computes them."""
        flops = model_flops_per_step(self.model, self.job.global_batch, self.job.seq_len)
        gpu = self.cluster_for_world(int(cols["world"][0])).profile.gpu if step_s.size else None
        peak = gpu.peak_flops[self.job.precision] if gpu else 1.0
        return (self.job.tokens_per_step / step_s,
                flops / step_s / cols["world"].astype(float) / peak)

    def _slot_ranks(self, cols: dict) -> list:
        """Ranks 0, 1, first short rank, last; sorted per row (ties keep the lowest rank)."""
        pp, chunks = cols["pp"], cols["pp"] * cols["v"]
        extra = self.model.num_layers % chunks
        cand = np.stack([np.zeros_like(pp), np.minimum(1, pp - 1), np.minimum(extra, pp - 1),
                         pp - 1], axis=1)
        cand.sort(axis=1)
        return [cand[:, j] for j in range(cand.shape[1])]

    def _memory_pieces(self, cols: dict) -> dict:
        """Per-layer activation bytes and buffers that do not depend on the pipeline rank."""
        spec, job, c = self.model, self.job, cols

        def acts(i):
            lay = layout_at(cols, i)
            return (act.layer_bytes(spec, job, lay), act.embedding_bytes(spec, job, lay),
                    act.head_bytes(spec, job, lay))

        def comm_buffers(i):
            return cost_memory.comm_buffers(self.view(cols, i))

        return {"act": self._unique("acts", [c["tp"], c["sp"], c["mb"], c["rc"]], acts),
                "comm": self._unique("comm", [c["tp"], c["mb"], c["zero"]], comm_buffers)[:, 0]}

    def _time_pieces(self, cols: dict) -> dict:
        """Per-layer and output-layer times that do not depend on the pipeline rank."""
        spec, job = self.model, self.job

        def layer(i):
            v = self.view(cols, i)
            lt = layer_times(v.cluster.profile.gpu, spec, job, v.layout)
            return lt.fwd_s, lt.bwd_s, lt.wgrad_s, selective_recompute_s(lt)

        def head(i):
            v = self.view(cols, i)
            ht = head_times(v.cluster.profile.gpu, spec, job, v.layout)
            return ht.fwd_s, ht.bwd_s, ht.wgrad_s

        def tp_exposed(i):
            return cost_time.exposed_tp_per_layer(self.view(cols, i), lt[i, 2])

        def pp_comm(i):
            return sum(c.time_s for c in pp_p2p_per_microbatch(self.view(cols, i)))

        c = cols
        shape = [c["world"], c["dp"], c["tp"], c["pp"]]
        lt = self._unique("layer", [c["tp"], c["sp"], c["mb"]], layer)
        rc = c["rc"]
        recompute = np.where(rc == 0, 0.0, np.where(rc == 1, lt[:, 3], lt[:, 0]))
        full = (rc == RECOMPUTE.index("full")).astype(np.int64)  # the only rc that changes TP
        return {"lt": lt, "recompute": recompute,
                "ht": self._unique("head", [c["tp"], c["mb"]], head),
                "tpx": self._unique("tpx", shape + [c["sp"], c["mb"], full], tp_exposed)[:, 0],
                "ppc": self._unique("ppc", shape + [c["sp"], c["mb"], c["v"]], pp_comm)[:, 0]}

    def _rank_facts(self, cols: dict, r: np.ndarray) -> np.ndarray:
        """(layers, chunks, holds first chunk, holds last chunk) of rank r, from Layout."""
        L = self.model.num_layers

        def facts(i):
            lay = layout_at(cols, i)
            rank = int(r[i])
            chunks = lay.rank_chunk_layers(L)[rank]
            return (sum(chunks), len(chunks), lay.chunk_rank(0) == rank,
                    lay.chunk_rank(lay.num_chunks - 1) == rank)

        placement = np.isin(cols["sched"], [SCHED["zbv"]]).astype(np.int64)
        return self._unique("facts", [cols["pp"], cols["v"], placement, r], facts)

    def _rank_memory(self, cols: dict, r: np.ndarray, pieces: dict) -> np.ndarray:
        """planner.cost.memory.rank_memory(...).total_bytes of rank r of every row."""
        facts = self._rank_facts(cols, r)
        layers, nchunks, first, last = facts.T
        c = cols

        def inflight(i):
            lay = layout_at(cols, i)
            return inflight_chunks(lay, int(r[i])), head_inflight(lay)

        st = self._states(cols, r, facts)
        infl = self._unique("inflight", [c["pp"], c["m"], c["v"], c["sched"], r], inflight)
        a = pieces["act"]
        # planner.cost.memory._rank_activations
        peak = infl[:, 0] * (layers / nchunks) * a[:, 0]
        peak = peak + np.where(first == 1, infl[:, 0] / nchunks * a[:, 1], 0.0)
        peak = peak + np.where(last == 1, infl[:, 1] * a[:, 2], 0.0)
        return st[:, 0] + st[:, 1] + st[:, 2] + peak + st[:, 3] + pieces["comm"] + st[:, 4]

    def _rank_time(self, cols: dict, r: np.ndarray, layer: dict) -> dict:
        """Micro-batch times, data-parallel communication and optimizer time of rank r."""
        facts = self._rank_facts(cols, r)
        layers, _, first, last = facts.T
        c = cols

        def dp_comm(i):
            v = self.view(cols, i)
            colls = dp_collectives(v, int(r[i]))
            return (sum(x.time_s for x in colls), colls[0].time_s if colls else 0.0,
                    v.layout.num_microbatches)

        key = [c["world"], c["dp"], c["tp"], c["pp"], c["zero"], layers, first, last]
        t = self._unique("dp_comm", key, dp_comm)
        # ZeRO-2/3 collectives run once per micro-batch (comm_plan.dp_collectives)
        scale = np.where(c["zero"] >= 2, c["m"] / t[:, 2], 1.0)
        opt = self._states(cols, r, facts)[:, 5]
        return {"optimizer_s": opt, "dp_total": t[:, 0] * scale, "dp_first": t[:, 1],
                **self._rank_microbatch(layers, last, layer)}

    @staticmethod
    def _rank_microbatch(layers, last, layer) -> dict:
        """planner.cost.time.rank_microbatch from the per-layer pieces."""
        lt, ht = layer["lt"], layer["ht"]
        is_last = last == 1
        fwd = layers * lt[:, 0] + np.where(is_last, ht[:, 0], 0.0)
        bwd = layers * lt[:, 1] + np.where(is_last, ht[:, 1], 0.0)
        wgrad = layers * lt[:, 2] + np.where(is_last, ht[:, 2], 0.0)
        rec = layer["recompute"] * layers
        tp = layers * layer["tpx"]
        return {"fwd": fwd, "bwd": bwd, "wgrad": wgrad, "rec": rec, "tp": tp,
                "total": fwd + bwd + rec + tp + layer["ppc"]}

    def _step(self, cols: dict, ranks: list, layer: dict) -> np.ndarray:
        """planner.cost.time.time_breakdown + pipeline.pipeline_time, vectorized."""
        c, n = cols, cols["dp"].size
        totals = np.stack([rk["total"] for rk in ranks], axis=1)
        slow = np.argmax(totals, axis=1)  # first maximum = lowest rank, as max() picks
        pick = lambda key: np.stack([rk[key] for rk in ranks], axis=1)[np.arange(n), slow]  # noqa
        fwd, bwd, rec, wgrad, tp = (pick(k) for k in ("fwd", "bwd", "rec", "wgrad", "tp"))
        L, lt, ht = self.model.num_layers, layer["lt"], layer["ht"]
        pp, m = c["pp"], c["m"]
        ppc = layer["ppc"]
        rank_sum = (L * lt[:, 0] + ht[:, 0] + L * lt[:, 1] + ht[:, 1] + L * layer["recompute"]
                    + L * layer["tpx"] + pp * ppc)
        mean = rank_sum / pp
        bubble = self._bubble_chunks(c, fwd, bwd + rec, wgrad) * mean
        dp_exposed, opt = self._dp_tail(c, ranks)
        busy = m * (fwd + bwd) + m * rec + m * tp + m * ppc
        bubble = self._shared_core_bubble(c, busy + bubble + dp_exposed + opt, bubble)
        return busy + bubble + dp_exposed + opt

    def _shared_core_bubble(self, c: dict, step: np.ndarray, bubble: np.ndarray) -> np.ndarray:
        """planner.cost.time.shared_core_bubble."""
        if not c["world"].size:
            return bubble
        profile = self.cluster_for_world(int(c["world"][0])).profile  # one profile, any world
        cores = profile.gpu.shared_cores
        ranks = np.minimum(c["world"], profile.gpus_per_node)
        if not cores:
            return bubble
        shrunk = np.maximum(0.0, np.minimum(bubble, step * cores / ranks - (step - bubble)))
        return np.where(ranks > cores, shrunk, bubble)

    @staticmethod
    def _bubble_chunks(c, fwd, bwd, wgrad) -> np.ndarray:
        """planner.cost.pipeline.bubble_chunks."""
        p, v = c["pp"].astype(float), c["v"]
        zb = np.isin(c["sched"], [SCHED[s] for s in ZERO_BUBBLE])
        fill = np.maximum(0.0, fwd + bwd - 2 * wgrad) / (fwd + bwd)
        out = np.where(zb, (p - 1) * fill / v, (p - 1) / v)
        return np.where(c["pp"] == 1, 0.0, out)

    def _dp_tail(self, c, ranks: list) -> tuple:
        """planner.cost.time._dp_exposed on every slot; the rank with the largest
        exposed + optimizer time sets the tail."""
        sums, exposed_all, opts = [], [], []
        megatron = self.job.engine == "megatron"
        m = c["m"].astype(float)
        for rk in ranks:
            total = rk["dp_total"]
            per_mb = total / m
            first_gather = per_mb / np.maximum(1, self.model.num_layers // c["pp"])
            sharded = np.maximum(0.0, per_mb - rk["total"]) * m + first_gather
            after = total - rk["dp_first"]
            ddp = np.maximum(0.0, rk["dp_first"] - rk["bwd"] - rk["rec"]) + after
            exposed = np.where(c["zero"] >= 2, sharded, ddp)
            exposed = np.where((c["dp"] == 1) | megatron, total, exposed)
            sums.append(exposed + rk["optimizer_s"])
            exposed_all.append(exposed)
            opts.append(rk["optimizer_s"])
        k = np.argmax(np.stack(sums, axis=1), axis=1)
        rows = np.arange(k.size)
        return np.stack(exposed_all, axis=1)[rows, k], np.stack(opts, axis=1)[rows, k]
