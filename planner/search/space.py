"""The search space as numpy columns: every layout of N GPUs, and the structural checks of
planner.plan.layout_errors evaluated on whole columns at once.

One row is one layout.  Columns: world, dp, tp, pp, sp (0/1), zero, mb, m (micro-batches),
sched (index into SCHEDULES), v (virtual stages), rc (index into RECOMPUTE).

What is enumerated (and what is not, because it would duplicate another row):
  dp*tp*pp = N with tp <= max_tp; micro-batch sizes dividing the per-replica batch; sequence
  parallelism on/off only where tp > 1; ZeRO 1-3 only where dp > 1; recompute none/selective/
  full; with pp > 1 GPipe, 1F1B, and the interleaved schedules with every v >= 2 that splits
  the layers evenly over pp*v chunks (Megatron-LM's --num-layers-per-virtual-pipeline-stage
  needs that), ZBV with v = 2; with pp = 1 the schedule is moot and only '1f1b' is listed.
  Engine 'megatron' lists only what Megatron-LM runs (MEGATRON_SCHEDULES, MEGATRON_ZERO).

`structural_reasons` must agree with layout_errors (tests/test_search.py checks a sample)."""

import numpy as np

from planner.plan import INTERLEAVED, RECOMPUTE, SCHEDULES, ZERO_BUBBLE

COLUMNS = ("world", "dp", "tp", "pp", "sp", "zero", "mb", "m", "sched", "v", "rc")
SCHED = {name: i for i, name in enumerate(SCHEDULES)}
RC = {name: i for i, name in enumerate(RECOMPUTE)}


def divisors(n: int) -> list:
    return [d for d in range(1, n + 1) if n % d == 0]


# What Megatron-LM runs (engine 'megatron'): 1F1B with or without interleaving (no GPipe, no
# zero-bubble schedules) and ZeRO 0 or 1 (--use-distributed-optimizer shards optimizer states).
MEGATRON_SCHEDULES = ("1f1b", "interleaved_1f1b")
MEGATRON_ZERO = (0, 1)


def _schedule_options(num_layers: int, pp: int, engine: str) -> list:
    """(schedule index, virtual stages) pairs for a pipeline of pp stages."""
    if pp == 1:
        return [(SCHED["1f1b"], 1)]
    opts = [(SCHED["gpipe"], 1), (SCHED["1f1b"], 1)]
    vs = [v for v in range(2, num_layers // pp + 1) if num_layers % (pp * v) == 0]
    for name in ("interleaved_1f1b", "interleaved_zb"):
        opts += [(SCHED[name], v) for v in vs]
    if num_layers % (2 * pp) == 0:
        opts.append((SCHED["zbv"], 2))
    if engine == "megatron":
        opts = [(s, v) for s, v in opts if SCHEDULES[s] in MEGATRON_SCHEDULES]
    return opts


def _shape_rows(model, job, world: int, dp: int, tp: int, pp: int) -> np.ndarray:
    """Every layout of one (dp, tp, pp) shape, as an int array with len(COLUMNS) columns."""
    per_replica = job.global_batch // dp
    mbs = divisors(per_replica)
    scheds = _schedule_options(model.num_layers, pp, job.engine)
    sps = [0, 1] if tp > 1 else [0]
    zeros = [0, 1, 2, 3] if dp > 1 else [0]
    if job.engine == "megatron":
        zeros = [z for z in zeros if z in MEGATRON_ZERO]
    grid = np.array(np.meshgrid(np.arange(len(mbs)), np.arange(len(scheds)), sps, zeros,
                                np.arange(len(RECOMPUTE)), indexing="ij")).reshape(5, -1)
    mb = np.array(mbs)[grid[0]]
    sched = np.array([s for s, _ in scheds])[grid[1]]
    v = np.array([v for _, v in scheds])[grid[1]]
    n = mb.size
    const = lambda x: np.full(n, x)  # noqa: E731
    return np.stack([const(world), const(dp), const(tp), const(pp), grid[2], grid[3], mb,
                     per_replica // mb, sched, v, grid[4]], axis=1)


def enumerate_space(model, job, world: int, max_tp: int) -> tuple:
    """(columns dict, shape rejections) for `world` GPUs.  A shape whose dp does not divide the
    global batch has no micro-batch split at all; it is reported once, as a shape."""
    blocks, shape_rejects = [], []
    for tp in [t for t in divisors(world) if t <= max_tp]:
        for pp in divisors(world // tp):
            dp = world // (tp * pp)
            if job.global_batch % dp:
                shape_rejects.append((dp, tp, pp))
                continue
            blocks.append(_shape_rows(model, job, world, dp, tp, pp))
    rows = np.concatenate(blocks) if blocks else np.zeros((0, len(COLUMNS)), dtype=np.int64)
    return {name: rows[:, i].astype(np.int64) for i, name in enumerate(COLUMNS)}, shape_rejects


def concat(spaces: list) -> dict:
    return {k: np.concatenate([s[k] for s in spaces]) for k in COLUMNS}


def take(cols: dict, idx) -> dict:
    return {k: v[idx] for k, v in cols.items()}


def _in(values: np.ndarray, names) -> np.ndarray:
    return np.isin(values, [SCHED[n] for n in names])


def _everywhere(c: dict, flag: bool) -> np.ndarray:
    return np.full(c["tp"].size, flag)


def _zero_bubble_ddp(c: dict) -> np.ndarray:
    """Zero-bubble schedules with DDP (ZeRO 0/1 over dp > 1) or with ZeRO-3 (runtime notes)."""
    zb = _in(c["sched"], ZERO_BUBBLE) & (c["pp"] > 1)
    return zb & (((c["dp"] > 1) & (c["zero"] <= 1)) | (c["zero"] == 3))


def _ddp_microbatches(c: dict) -> np.ndarray:
    return (c["pp"] > 1) & (c["dp"] > 1) & (c["zero"] <= 1) & (c["m"] <= c["pp"])


def _ddp_proper(c: dict) -> np.ndarray:
    """DDP itself (ZeRO 0/1, no TP) under pipelining: planner.plan._ddp_pipeline_errors."""
    return (c["pp"] > 1) & (c["dp"] > 1) & (c["zero"] <= 1) & (c["tp"] == 1)


def structural_checks(model, cluster, job) -> list:
    """(key, phrase found in layout_errors' message, mask function), in layout_errors' order,
    so the first failing check of a row is the first message layout_errors gives for it."""
    gpn, seq = cluster.profile.gpus_per_node, job.seq_len
    torch_engine = job.engine == "torch"
    long_seq = model.learned_positions and seq > model.max_seq_len
    return [
        ("tp_heads", "must divide num_heads",
         lambda c: (model.num_heads % c["tp"] != 0) | (model.num_kv_heads % c["tp"] != 0)),
        ("tp_ffn", "must divide ffn_hidden_size",
         lambda c: model.ffn_hidden_size % c["tp"] != 0),
        ("tp_node", "GPUs per node", lambda c: c["tp"] > gpn),
        ("sp_seq", "sequence parallel: tp=", lambda c: (c["sp"] == 1) & (seq % c["tp"] != 0)),
        ("precision", "is not supported by profile",
         lambda c: _everywhere(c, not cluster.profile.supports(job.precision))),
        ("positions", "learned positions", lambda c: _everywhere(c, long_seq)),
        ("interleave_m", "divisible by pp",
         lambda c: _in(c["sched"], INTERLEAVED) & (c["pp"] > 1) & (c["m"] % c["pp"] != 0)),
        ("chunks", "model chunks exceed", lambda c: c["pp"] * c["v"] > model.num_layers),
        ("zb_ddp", "gives wrong gradients in PyTorch",
         lambda c: torch_engine & _zero_bubble_ddp(c)),
        ("ddp_microbatches", "DDP under pipelining",
         lambda c: torch_engine & _ddp_microbatches(c)),
        ("ddp_gpipe", "schedule gpipe with DDP",
         lambda c: torch_engine & _ddp_proper(c) & _in(c["sched"], ("gpipe",))),
        ("ddp_chunks", "DDP under an interleaved schedule",
         lambda c: torch_engine & _ddp_proper(c) & (c["v"] > 1) & (c["m"] <= c["pp"] * c["v"])),
        ("1f1b_microbatches", "1F1B schedule needs at least as many micro-batches",
         lambda c: torch_engine & _in(c["sched"], ("1f1b",)) & (c["pp"] > 1)
         & (c["m"] < c["pp"])),
    ]


def structural_reasons(model, cluster, job, cols: dict) -> np.ndarray:
    """Index into structural_checks() of each row's first failing check; -1 = valid."""
    reason = np.full(cols["tp"].size, -1, dtype=np.int64)
    for i, (_, _, mask_fn) in enumerate(structural_checks(model, cluster, job)):
        hit = mask_fn(cols) & (reason < 0)
        reason[hit] = i
    return reason
