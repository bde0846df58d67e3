"""Per-rank compute order of each pipeline schedule, as PyTorch's torch.distributed.pipelining
(2.13, schedules.py) executes it: the `pipeline_order` of ScheduleGPipe, Schedule1F1B,
ScheduleInterleaved1F1B, ScheduleInterleavedZeroBubble (ZB1P; with one stage per rank it is
ZB-H1, Qi et al. 2023, Sec. 3) and ScheduleZBVZeroBubble (Qi et al. 2023, Sec. 6), without the
idle (None) slots.  tests/test_simulate.py compares these lists with PyTorch's.

An action is (kind, stage, microbatch): kind F (forward), B (full backward), I (input-gradient
backward) or W (weight-gradient backward); stage is the global model chunk index."""

from collections import defaultdict

SPLIT_BACKWARD = ("interleaved_zb", "zbv")


def rank_actions(schedule: str, pp: int, virtual_stages: int, num_microbatches: int) -> list:
    """For each pipeline rank, its ordered list of (kind, stage, microbatch) actions."""
    p, v, m = pp, virtual_stages, num_microbatches
    if schedule == "gpipe":
        return [_gpipe(r, m) for r in range(p)]
    if schedule == "1f1b":
        return [_one_f_one_b(r, p, m) for r in range(p)]
    if schedule in ("interleaved_1f1b", "interleaved_zb"):
        return [_interleaved(r, p, v, m, schedule == "interleaved_zb") for r in range(p)]
    if schedule == "zbv":
        return [_zbv(r, p, m) for r in range(p)]
    raise ValueError(f"unknown schedule {schedule!r}")


def _gpipe(rank: int, m: int) -> list:
    return [("F", rank, i) for i in range(m)] + [("B", rank, i) for i in range(m)]


def _one_f_one_b(rank: int, p: int, m: int) -> list:
    """p-1-rank warm-up forwards, then one forward / one backward, then the remaining backwards
    (Narayanan et al. 2021, Fig. 4 top; PyTorch Schedule1F1B)."""
    warmup = min(m, p - 1 - rank)
    ops = [("F", rank, i) for i in range(warmup)]
    for i in range(warmup, m):
        ops += [("F", rank, i), ("B", rank, i - warmup)]
    return ops + [("B", rank, i) for i in range(m - warmup, m)]


def _interleaved(rank: int, p: int, v: int, m: int, zero_bubble: bool) -> list:
    """Depth-first interleaving in rounds of p micro-batches (Narayanan et al. 2021, Sec. 2.2;
    PyTorch _get_1f1b_rank_ops).  Zero-bubble ZB1P: backward split into I and W, the warm-up one
    forward per hop shorter, and W deferred by `rank` backwards to fill the drain."""
    rounds = max(1, m // p)
    if m % rounds:
        raise ValueError(f"interleaved schedules need micro-batches ({m}) divisible by "
                         f"the {rounds} rounds of {m // rounds}")
    per_round = m // rounds
    warmup = min((v - 1) * per_round + (1 if zero_bubble else 2) * (p - 1 - rank), v * m)
    total = v * m

    def fwd_stage(op):
        return (op // per_round) % v * p + rank

    def bwd_stage(op):
        return (v - 1 - (op - warmup) // per_round % v) * p + rank

    nxt: dict[str, defaultdict] = {"F": defaultdict(int), "B": defaultdict(int),
                                   "W": defaultdict(int)}
    ops, backwards = [], []  # backwards: stage of every I so far, in order

    def emit(kind, stage):
        key = "B" if kind == "I" else kind
        ops.append((kind, stage, nxt[key][stage]))
        nxt[key][stage] += 1
        if kind == "I":
            backwards.append(stage)

    weights = 0
    for op in range(total + warmup):
        if op < total:
            emit("F", fwd_stage(op))
        if op >= warmup:
            emit("I" if zero_bubble else "B", bwd_stage(op))
            if zero_bubble and op - warmup >= rank:  # W of the oldest waiting backward
                emit("W", backwards[weights])
                weights += 1
    for stage in backwards[weights:]:
        emit("W", stage)
    return ops


def _zbv(rank: int, p: int, m: int) -> list:
    """ZB-V: chunk 0 runs stage `rank`, chunk 1 stage 2p-1-rank (V placement); PyTorch builds it
    for max(2p-1, m) micro-batches and drops the ones beyond m."""
    n = max(2 * p - 1, m)
    s0, s1 = rank, 2 * p - 1 - rank
    cnt = {key: 0 for key in ("f0", "f1", "b0", "b1", "w0", "w1")}
    ops = []

    def emit(kind, chunk):
        key = {"F": "f", "I": "b", "W": "w"}[kind] + str(chunk)
        ops.append((kind, s0 if chunk == 0 else s1, cnt[key]))
        cnt[key] += 1

    for _ in range(2 * (p - rank) - 1):
        emit("F", 0)
    for _ in range(rank):
        emit("F", 1), emit("F", 0)
    for _ in range(p - rank):
        emit("F", 1), emit("I", 1), emit("W", 1)
    while cnt["f1"] < cnt["f0"] or cnt["f0"] < n:
        if cnt["f0"] < n:
            emit("F", 0)
        emit("I", 0), emit("W", 0), emit("F", 1), emit("I", 1), emit("W", 1)
    for _ in range(rank):
        emit("I", 0), emit("I", 1)
    for _ in range(p - rank):
        emit("I", 0), emit("W", 0)
    while cnt["w1"] < cnt["b1"]:
        emit("W", 1)
    while cnt["w0"] < cnt["b0"]:
        emit("W", 0)
    return [op for op in ops if op[2] < m]
