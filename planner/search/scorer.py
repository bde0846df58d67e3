"""Score many layouts at once with the cost model's own functions and combination step.

Every cost function a plan's estimate calls is called here too, once per unique combination of
the columns its signature names (planner/cost/fields.py: a layer's times read tp,
sequence_parallel and micro_batch only, so the whole space needs a few dozen calls), on plain
values; the results are scattered back to the rows, and the combination step
(planner.cost.memory.rank_memory_parts, planner.cost.time.rank_time_parts and step_of) runs on
the columns exactly as estimate() runs it on one plan.  tests/test_search.py checks the result
equals estimate(plan) on samples of every search space it runs.

Per plan only four pipeline ranks are evaluated: 0, 1, the first rank with one layer fewer
(uneven splits) and the last.  Every rank type (layers held, first chunk, last chunk) has its
smallest rank among them, and within a type memory and time do not grow with the rank (in-flight
micro-batches fall with the rank in every schedule), so maxima over ranks are maxima over these."""

import numpy as np

from planner.cost.fields import parameters, rank_facts_of
from planner.cost.flops import model_flops_per_step
from planner.cost.memory import host_states, rank_memory_parts
from planner.cost.moe import rank_moe_layers_of
from planner.cost.time import mean_rank_s, rank_time_parts, step_inputs, step_of
from planner.engines import CP_COMMS, OFFLOADS, RECOMPUTE, SCHEDULES
from planner.plan import AXES, Layout
from planner.search.space import take

_NAMES = {"schedule": np.array(SCHEDULES), "recompute": np.array(RECOMPUTE),
          "cp_comm": np.array(CP_COMMS), "offload": np.array(OFFLOADS)}
_FLAGS = ("sequence_parallel", "holds_embedding", "holds_head", "tied_copy", "compile")


def layout_at(cols: dict, i: int) -> Layout:
    return Layout(dp=int(cols["dp"][i]), tp=int(cols["tp"][i]), pp=int(cols["pp"][i]),
                  sequence_parallel=bool(cols["sequence_parallel"][i]),
                  zero_stage=int(cols["zero_stage"][i]), micro_batch=int(cols["micro_batch"][i]),
                  num_microbatches=int(cols["num_microbatches"][i]),
                  schedule=SCHEDULES[int(cols["schedule"][i])],
                  virtual_stages=int(cols["virtual_stages"][i]),
                  recompute=RECOMPUTE[int(cols["recompute"][i])],
                  recompute_every=int(cols["recompute_every"][i]),
                  dp_shard=int(cols["dp_shard"][i]) if "dp_shard" in cols else 0,
                  offload=OFFLOADS[int(cols["offload"][i])] if "offload" in cols else "none",
                  compile=bool(cols["compile"][i]) if "compile" in cols else False,
                  cp=int(cols["cp"][i]) if "cp" in cols else 1,
                  cp_comm=CP_COMMS[int(cols["cp_comm"][i])] if "cp_comm" in cols
                  else "allgather",
                  ep=int(cols["ep"][i]) if "ep" in cols else 1,
                  etp=int(cols["etp"][i]) if "etp" in cols else 1)


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


def _plain(name: str, value: int):
    """A column's integer as the cost functions take it (names, flags)."""
    if name in _NAMES:
        return str(_NAMES[name][value])
    return bool(value) if name in _FLAGS else value


class Scorer:
    """Step time and most-loaded-rank memory of every row of a (structurally valid) space."""

    def __init__(self, model, cluster_for_world, job):
        self.model, self.job = model, job
        profile = cluster_for_world(1).profile  # one profile, whatever the GPU count
        self.fixed = {"spec": model, "job": job, "profile": profile, "gpu": profile.gpu,
                      "mesh_order": AXES, "layers_per_stage": ()}
        self._memo = {}  # function -> {column values: result}, shared by every call

    def unique(self, fn, cols: dict) -> np.ndarray:
        """fn on each unique combination of the columns it names, scattered back to every row:
        shape (rows,) for a number, (rows, outputs) for a tuple."""
        names = [k for k, _ in parameters(fn) if k in cols]
        fixed = {k: self.fixed[k] for k, _ in parameters(fn) if k in self.fixed}
        rows = cols["dp"].size
        if not names:
            return np.broadcast_to(np.asarray(fn(**fixed), dtype=float), (rows,))
        stacked = np.stack([cols[k] for k in names], axis=1).astype(np.int64)
        _, first, inverse = np.unique(_row_codes(stacked), return_index=True, return_inverse=True)
        memo = self._memo.setdefault(fn, {})
        values = []
        for key in map(tuple, stacked[first].tolist()):
            if key not in memo:
                memo[key] = fn(**fixed, **{k: _plain(k, v) for k, v in zip(names, key)})
            values.append(memo[key])
        return np.array(values, dtype=float)[inverse.ravel()]

    def _rank_cols(self, cols: dict, rank: np.ndarray) -> dict:
        """The columns plus pipeline rank `rank`'s facts (planner.cost.fields.with_rank)."""
        with_rank = {**cols, "rank": rank}
        layers, chunks, first, last = self.unique(rank_facts_of, with_rank).T
        moe = self.unique(rank_moe_layers_of, with_rank)
        return {**with_rank, "rank_layers": layers.astype(np.int64),
                "rank_moe_layers": moe.astype(np.int64),
                "rank_chunks": chunks.astype(np.int64), "holds_embedding": first.astype(np.int64),
                "holds_head": last.astype(np.int64),
                "tied_copy": (cols["pp"] * cols["virtual_stages"] > 1).astype(np.int64)}

    def _evaluate(self, cols: dict):
        return lambda fn: self.unique(fn, cols)

    def memory(self, cols: dict, limit: float | None = None) -> np.ndarray:
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
            sub = self._rank_cols(take(cols, idx), r[idx])
            mem[idx] = np.maximum(mem[idx], rank_memory_parts(self._evaluate(sub))["total"])
            if limit is not None:
                alive[idx] = mem[idx] <= limit
        return mem

    def host_fits(self, cols: dict, profile) -> np.ndarray:
        """Whether every row's CPU offload fits the node's host memory (MemoryBreakdown
        host_fits: the node's ranks times the most loaded rank's host bytes)."""
        ok = np.ones(cols["dp"].size, dtype=bool)
        if "offload" not in cols or not (cols["offload"] > 0).any():
            return ok
        per_node = np.minimum(cols["world"], profile.gpus_per_node)
        for r in self._slot_ranks(cols):
            host = self.unique(host_states, self._rank_cols(cols, r))
            ok &= (host == 0) | (host * per_node <= profile.host.memory_bytes_per_node)
        return ok

    def step_time(self, cols: dict) -> np.ndarray:
        """Seconds per training step of every row (TimeBreakdown.step_s)."""
        if cols["dp"].size == 0:
            return np.zeros(0)
        ranks = []
        for r in self._slot_ranks(cols):
            evaluate = self._evaluate(self._rank_cols(cols, r))
            states = rank_memory_parts(evaluate)
            ranks.append(rank_time_parts(evaluate, states["optimizer"], states["gradients"]))
        named = {**self.fixed, **cols, **{k: _NAMES[k][cols[k]] for k in _NAMES}}
        step = step_inputs(**{k: named[k] for k, _ in parameters(step_inputs)})
        mean = mean_rank_s(evaluate, self.model.num_layers, cols["pp"])
        return step_of(ranks, step, mean).step_s

    def throughput(self, cols: dict, step_s: np.ndarray) -> tuple:
        """(tokens/s, MFU) as Estimate computes them."""
        flops = model_flops_per_step(self.model, self.job.global_batch, self.job.seq_len,
                                     self.job)
        peak = self.fixed["gpu"].peak_flops.get(self.job.dtype, 1.0) if step_s.size else 1.0
        return (self.job.tokens_per_step / step_s,
                flops / step_s / cols["world"].astype(float) / peak)

    def _slot_ranks(self, cols: dict) -> list:
        """Ranks 0, 1, first short rank, last (and, for an MoE model with dense first layers,
        the ranks where its MoE layers begin); sorted per row (ties keep the lowest rank)."""
        pp, chunks = cols["pp"], cols["pp"] * cols["virtual_stages"]
        extra = self.model.num_layers % chunks
        slots = [np.zeros_like(pp), np.minimum(1, pp - 1), np.minimum(extra, pp - 1), pp - 1]
        if self.model.moe is not None and self.model.moe.first_dense_layers:
            # the rank with the first MoE layer and the next (its first rank of MoE layers only):
            # the dense first layers make the ranks before them lighter
            d = self.model.moe.first_dense_layers
            base = self.model.num_layers // chunks
            long_layers = extra * (base + 1)
            chunk = np.where(d < long_layers, d // (base + 1),
                             extra + (d - long_layers) // np.maximum(base, 1))
            slots += [np.minimum(chunk % pp, pp - 1), np.minimum(chunk % pp + 1, pp - 1)]
        cand = np.stack(slots, axis=1)
        cand.sort(axis=1)
        return [cand[:, j] for j in range(cand.shape[1])]
