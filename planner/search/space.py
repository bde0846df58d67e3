"""The search space as numpy columns: every layout of N GPUs.

One row is one layout, with the columns of planner.rules (world, dp, tp, pp, sp, zero, mb, m,
sched, v, rc, recompute_every; lps_n = lps_sum = 0: the search splits layers evenly).

What is enumerated (and what is not, because it would duplicate another row):
  dp*tp*pp*cp = N with tp <= max_tp, cp as cp_options allows (each engine flavour);
  micro-batch sizes dividing the per-replica batch; sequence
  parallelism on/off only where tp > 1; ZeRO 1-3 only where dp > 1; the engine's recompute
  policies (torch: none/selective/op/full), each policy on every block and on every 2nd and 4th
  (recompute_every; none only on every block); with pp > 1 GPipe, 1F1B, and the interleaved
  schedules with every v >= 2 that splits
  the layers evenly over pp*v chunks (Megatron-LM's --num-layers-per-virtual-pipeline-stage
  needs that), ZBV with v = 2; with pp = 1 the schedule is moot and only '1f1b' is listed.
  Only the schedules and ZeRO stages the engine runs are listed (planner.engines).  For an MoE
  model every (ep, etp) of expert_options; a dense model has ep = etp = 1.
  Each layout at a ZeRO stage the engine hybrid-shards is also listed with every shard group
  1 < dp_shard < dp dividing dp (hybrid sharding; dp_shard 0 is the whole dp group).  CPU
  offload is listed only when asked for: `offload=None` adds a copy of each row per offload
  its engine runs at that ZeRO stage (the nothing-fits advice does that).

The structural rules themselves are planner/rules.py, evaluated here on whole columns."""

import numpy as np

from planner.engines import CP_COMMS, OFFLOADS, RECOMPUTE, RECOMPUTE_EVERY_CHOICES, engine
from planner.rules import COLUMNS, SCHED

# The search tries context parallelism only while every rank keeps at least this many tokens
# of a sequence (a bound on the space, not a cost): the published long-context runs keep 8,192
# (Llama 3 405B: 131,072 tokens over cp = 16, Dubey et al. 2024 Sec. 3.3.2), and shorter shards
# only add K/V traffic per token while the attention they split is already small.  Sequences
# of up to 2 x this (the 1T GPT's 2048, Llama 3's 8192 pre-training) enumerate no cp > 1 and
# the search costs what it did.
CP_MIN_LOCAL_TOKENS = 4096


def divisors(n: int) -> list:
    """Every divisor of n, ascending, from its prime factorisation (trial division up to
    sqrt(n), so 10^9 takes milliseconds rather than a billion trials)."""
    return _divisors_of_factors(_factorise(n))


def _factorise(n: int) -> dict:
    """{prime: exponent} of n >= 1."""
    factors: dict[int, int] = {}
    p = 2
    while p * p <= n:
        while n % p == 0:
            factors[p] = factors.get(p, 0) + 1
            n //= p
        p += 1 if p == 2 else 2
    if n > 1:
        factors[n] = factors.get(n, 0) + 1
    return factors


def _divisors_of_factors(factors: dict) -> list:
    out = [1]
    for prime, exp in factors.items():
        out = [d * prime**k for d in out for k in range(exp + 1)]
    return sorted(out)


def _schedule_options(num_layers: int, pp: int, engine_name: str) -> list:
    """(schedule index, virtual stages) pairs for a pipeline of pp stages."""
    if pp == 1:
        return [(SCHED["1f1b"], 1)]
    opts = [(SCHED["gpipe"], 1), (SCHED["1f1b"], 1)]
    # every v >= 2 with pp * v dividing the layers
    vs = [v for v in divisors(num_layers // pp) if v >= 2] if num_layers % pp == 0 else []
    for name in ("interleaved_1f1b", "interleaved_zb"):
        opts += [(SCHED[name], v) for v in vs]
    if num_layers % (2 * pp) == 0:
        opts.append((SCHED["zbv"], 2))
    runs = {SCHED[name] for name in engine(engine_name).schedules}
    return [(s, v) for s, v in opts if s in runs]


def recompute_options(model, engine_name: str, recompute: str | None = None,
                      recompute_every: int | None = None) -> list:
    """(RECOMPUTE index, recompute_every) pairs: the engine's policies, each on every block
    and, for a policy under an engine with recompute_every, on every 2nd and 4th block
    (RECOMPUTE_EVERY_CHOICES within the layers); a value the user fixed is the only one tried
    (a combination the rules refuse stays, so its refusal is reported)."""
    policies = [recompute] if recompute else list(engine(engine_name).recompute_policies)
    pairs = []
    for policy in policies:
        if recompute_every:
            everies = [recompute_every]
        elif policy == "none" or engine(engine_name).recompute_every_block_only:
            everies = [1]
        else:
            everies = [k for k in RECOMPUTE_EVERY_CHOICES if k == 1 or k <= model.num_layers]
        pairs += [(RECOMPUTE.index(policy), k) for k in everies]
    return pairs


def cp_options(job, room: int) -> list:
    """(cp, cp_comm index) pairs to try with `room` GPUs left after tp: cp = 1, and every cp
    dividing the room that splits the sequence into 2cp equal chunks of at least
    CP_MIN_LOCAL_TOKENS / 2 tokens, with each flavour the engine runs."""
    pairs = [(1, 0)]
    flavours = [CP_COMMS.index(f) for f in engine(job.engine).cp_comms]
    for cp in divisors(room)[1:] if flavours else []:
        if job.seq_len % (2 * cp) or job.seq_len // cp < CP_MIN_LOCAL_TOKENS:
            continue
        pairs += [(cp, f) for f in flavours]
    return pairs


def expert_options(model, job, dp: int, tp: int) -> list:
    """(ep, etp) pairs for one (dp, tp) shape: (1, 1) for a dense model; for an MoE model every
    ep dividing the experts with ep x etp dividing tp x dp (the torch engine: ep dividing dp),
    and etp 1 or tp where the engine splits experts (Megatron-Core's usual choices: experts
    whole, or split like the dense part)."""
    eng = engine(job.engine)
    if model.moe is None or not eng.expert_parallel:
        return [(1, 1)]
    etps = [1] + ([tp] if tp > 1 and eng.expert_tensor_parallel
                  and model.moe.expert_ffn_hidden_size % tp == 0 else [])
    group = dp if eng.ep_within_dp else tp * dp
    return [(ep, etp) for etp in etps for ep in divisors(model.moe.num_experts)
            if (group // (etp if not eng.ep_within_dp else 1)) % ep == 0
            and group % (ep * (1 if eng.ep_within_dp else etp)) == 0]


def _shape_rows(model, job, world: int, dp: int, tp: int, pp: int,
                recomputes: list, cp: int = 1, cp_comm: int = 0) -> np.ndarray:
    """Every layout of one (dp, tp, pp, cp) shape, as an int array with len(COLUMNS) columns
    (with cp > 1 no expert split: rule cp_moe)."""
    experts = expert_options(model, job, dp, tp) if cp == 1 else [(1, 1)]
    blocks = [_expert_rows(model, job, world, dp, tp, pp, recomputes, ep, etp, cp, cp_comm)
              for ep, etp in experts]
    return np.concatenate(blocks)


def _expert_rows(model, job, world: int, dp: int, tp: int, pp: int, recomputes: list,
                 ep: int, etp: int, cp: int, cp_comm: int) -> np.ndarray:
    per_replica = job.global_batch // dp
    mbs = divisors(per_replica)
    scheds = _schedule_options(model.num_layers, pp, job.engine)
    sps = [0, 1] if tp > 1 else [0]
    zeros = [z for z in engine(job.engine).zero_stages if dp > 1 or z == 0]
    grid = np.array(np.meshgrid(np.arange(len(mbs)), np.arange(len(scheds)), sps, zeros,
                                np.arange(len(recomputes)), indexing="ij")).reshape(5, -1)
    mb = np.array(mbs)[grid[0]]
    sched = np.array([s for s, _ in scheds])[grid[1]]
    v = np.array([v for _, v in scheds])[grid[1]]
    rc = np.array([r for r, _ in recomputes])[grid[4]]
    every = np.array([k for _, k in recomputes])[grid[4]]
    n = mb.size
    const = lambda x: np.full(n, x)  # noqa: E731
    # ep = etp = 1: dense models; dp_shard 0 (see _shards); offload none (index 0)
    return np.stack([const(world), const(dp), const(tp), const(pp), grid[2], grid[3], mb,
                     per_replica // mb, sched, v, rc, const(0), const(0), every, const(ep),
                     const(etp), const(0), const(0), const(cp), const(cp_comm)], axis=1)


SHARD = COLUMNS.index("dp_shard")


def shard_options(dp: int, engine_name: str, zero_stage: int) -> list:
    """Hybrid-sharding shard groups to try besides the whole dp group (dp_shard 0): every
    proper divisor 1 < S < dp, at the ZeRO stages the engine hybrid-shards."""
    if zero_stage not in engine(engine_name).hsdp_stages:
        return []
    return [d for d in divisors(dp) if 1 < d < dp]


def _shards(rows: np.ndarray, dp: int, engine_name: str, dp_shard) -> np.ndarray:
    """The rows, plus a copy per hybrid shard group (shard_options) of each row whose ZeRO stage
    hybrid-shards; a fixed `dp_shard` is the only value (the rules refuse rows it cannot take,
    and the refusal is reported)."""
    if dp_shard is not None:
        out = rows.copy()
        out[:, SHARD] = dp_shard
        return out
    blocks = [rows]
    zero = COLUMNS.index("zero_stage")
    for z in np.unique(rows[:, zero]):
        for shard in shard_options(dp, engine_name, int(z)):
            extra = rows[rows[:, zero] == z].copy()
            extra[:, SHARD] = shard
            blocks.append(extra)
    return np.concatenate(blocks)


OFFLOAD = COLUMNS.index("offload")


def _offloads(rows: np.ndarray, engine_name: str, offload) -> np.ndarray:
    """The rows, plus a copy per CPU offload the engine runs at each row's ZeRO stage
    (engines.offload_stages); a fixed `offload` is the only value (refusals reported)."""
    if offload is not None:
        out = rows.copy()
        out[:, OFFLOAD] = OFFLOADS.index(offload)
        return out
    blocks, zero = [rows], COLUMNS.index("zero_stage")
    for kind, stages in enumerate(engine(engine_name).offload_stages, start=1):
        extra = rows[np.isin(rows[:, zero], stages)].copy()
        extra[:, OFFLOAD] = kind
        blocks.append(extra)
    return np.concatenate(blocks)


def enumerate_space(model, job, world: int, max_tp: int, recompute: str | None = None,
                    recompute_every: int | None = None, dp_shard: int | None = None,
                    offload: str | None = "none") -> tuple:
    """(columns dict, shape rejections) for `world` GPUs.  A shape whose dp does not divide the
    global batch has no micro-batch split at all; it is reported once, as a shape.  A fixed
    `recompute` / `recompute_every` is the only value tried (recompute_options)."""
    recomputes = recompute_options(model, job.engine, recompute, recompute_every)
    blocks, shape_rejects = [], []
    for tp in [t for t in divisors(world) if t <= max_tp]:
        for cp, flavour in cp_options(job, world // tp):
            for pp in divisors(world // (tp * cp)):
                dp = world // (tp * pp * cp)
                if job.global_batch % dp:
                    if flavour == 0:
                        shape_rejects.append((dp, tp, pp))
                    continue
                rows = _shape_rows(model, job, world, dp, tp, pp, recomputes, cp, flavour)
                if cp == 1 or dp_shard is not None:  # cp > 1: no hybrid sharding (cp_hsdp)
                    rows = _shards(rows, dp, job.engine, dp_shard)
                blocks.append(_offloads(rows, job.engine, offload))
    rows = np.concatenate(blocks) if blocks else np.zeros((0, len(COLUMNS)), dtype=np.int64)
    return {name: rows[:, i].astype(np.int64) for i, name in enumerate(COLUMNS)}, shape_rejects


def concat(spaces: list) -> dict:
    return {k: np.concatenate([s[k] for s in spaces]) for k in COLUMNS}


def take(cols: dict, idx) -> dict:
    return {k: v[idx] for k, v in cols.items()}
