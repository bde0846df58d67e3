"""Every structural rule of a layout, once: what makes a layout impossible for a model, cluster
and job, with the short label the rejected-plans summary shows and the message that names the
numbers.  Plan validation (planner.plan.layout_errors), the search's pruning (whole numpy columns
at once), the rejected-plans table, the UI and the nothing-fits advice all read this table.

A rule's `broken(ctx, c)` takes columns `c` - numpy arrays, one entry per layout, or arrays of
one entry for a single Layout (layout_columns) - and returns a boolean mask; `message(ctx, r)`
takes one row `r` (plain ints) and says why it is broken.  Columns are named as the Layout
fields they hold (sequence_parallel 0/1; schedule and recompute as indices into SCHEDULES and
RECOMPUTE), plus world (GPUs) and lps_n / lps_sum (entries and sum of layers_per_stage; 0 when
the split is even) and compile (0/1, Layout.compile; absent = 0).  Rules are listed in the
order their messages are given."""

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from planner.engines import (
    CP_COMMS,
    DDP_STAGES,
    INTERLEAVED,
    OFFLOADS,
    RECOMPUTE,
    SCHEDULES,
    ZERO_BUBBLE,
    Engine,
    engine,
)
from planner.job import Job

COLUMNS = ("world", "dp", "tp", "pp", "sequence_parallel", "zero_stage", "micro_batch",
           "num_microbatches", "schedule", "virtual_stages", "recompute", "lps_n", "lps_sum",
           "recompute_every", "ep", "etp", "dp_shard", "offload", "cp", "cp_comm")
# cp_comm holds an index into CP_COMMS
SCHED = {name: i for i, name in enumerate(SCHEDULES)}


@dataclass(frozen=True)
class Context:
    """What the rules read besides the layout."""
    model: object
    profile: object
    job: Job

    @property
    def engine(self) -> Engine:
        return engine(self.job.engine)


@dataclass(frozen=True)
class Rule:
    key: str
    label: str
    broken: Callable       # (Context, columns) -> bool mask
    message: Callable      # (Context, row) -> str


def layout_columns(layout, world: int) -> dict:
    """One-entry columns of a Layout on `world` GPUs."""
    values = {"world": world, "dp": layout.dp, "tp": layout.tp, "pp": layout.pp,
              "sequence_parallel": int(layout.sequence_parallel),
              "zero_stage": layout.zero_stage, "micro_batch": layout.micro_batch,
              "num_microbatches": layout.num_microbatches,
              "schedule": SCHED[layout.schedule], "virtual_stages": layout.virtual_stages,
              "recompute": RECOMPUTE.index(layout.recompute),
              "lps_n": len(layout.layers_per_stage), "lps_sum": sum(layout.layers_per_stage),
              "recompute_every": layout.recompute_every, "compile": int(layout.compile),
              "ep": layout.ep, "etp": layout.etp, "dp_shard": layout.dp_shard,
              "offload": OFFLOADS.index(layout.offload), "cp": layout.cp,
              "cp_comm": CP_COMMS.index(layout.cp_comm)}
    return {k: np.array([v], dtype=np.int64) for k, v in values.items()}


def row_at(cols: dict, i: int) -> dict:
    return {k: int(cols[k][i]) for k in COLUMNS if k in cols}


def _chunks(c):
    return c["pp"] * c["virtual_stages"]


def _samples(c):
    return c["micro_batch"] * c["num_microbatches"] * c["dp"]


def _in(sched, names) -> np.ndarray:
    return np.isin(sched, [SCHED[n] for n in names])


def _name(r: dict) -> str:
    return SCHEDULES[r["schedule"]]


def _pipelining(ctx: Context, c: dict) -> np.ndarray:
    """PyTorch's pipelining restrictions apply (torch engine, pp > 1)."""
    return np.asarray(ctx.engine.pytorch_pipelining_limits) & (c["pp"] > 1)


def _ddp(c: dict) -> np.ndarray:
    return (c["dp"] > 1) & np.isin(c["zero_stage"], DDP_STAGES)


def _ddp_proper(c: dict) -> np.ndarray:
    """DDP itself (ZeRO 0/1 without TP; with TP the runtime uses FSDP2's replicate)."""
    return _ddp(c) & (c["tp"] == 1)


def _zb_broken(ctx, c):
    zb = _pipelining(ctx, c) & _in(c["schedule"], ZERO_BUBBLE)
    return zb & (_ddp(c) | (c["zero_stage"] == 3))


def _zb_message(ctx, r):
    if r["zero_stage"] == 3:
        return f"schedule {_name(r)} with ZeRO-3 gives wrong gradients in PyTorch; use ZeRO-2"
    return (f"schedule {_name(r)} with DDP (ZeRO-{r['zero_stage']}, dp={r['dp']}) gives wrong "
            f"gradients in PyTorch; use ZeRO-2")


def _precision_message(ctx, r):
    p = ctx.profile
    if ctx.job.fp8:  # fp8 tensor cores: Hopper (sm90) and Ada (sm89) onwards
        return (f"precision fp8: profile {p.name}'s {p.gpu.name} has no FP8 tensor cores (its "
                f"peak_flops lists {', '.join(sorted(p.gpu.peak_flops))}; FP8 GEMMs need "
                f"Hopper/Ada or later); use bf16")
    return (f"precision {ctx.job.precision} is not supported by profile {p.name} "
            f"({p.gpu.name} supports {', '.join(sorted(p.gpu.peak_flops))})")


def _fp8_engine_broken(ctx) -> bool:
    return ctx.job.fp8 and ctx.job.fp8_recipe not in ctx.engine.fp8_recipes


def _fp8_engine_message(ctx, r):
    eng = ctx.engine
    if not eng.fp8_recipes:
        return f"precision fp8 with the {eng.name} engine: {eng.fp8_refusal}"
    return (f"fp8_recipe {ctx.job.fp8_recipe} is not a {eng.name} engine recipe (it runs "
            f"{', '.join(eng.fp8_recipes)})")


def _compiled(c: dict) -> np.ndarray:
    """Layout.compile on (a space without the column compiles nothing)."""
    return c["compile"] == 1 if "compile" in c else np.zeros(c["tp"].shape, dtype=bool)


def _everywhere(c: dict, flag: bool) -> np.ndarray:
    return np.full(c["tp"].shape, bool(flag))


def _expert_split(c: dict) -> np.ndarray:
    """ep or etp above 1 (a space without the columns splits no experts)."""
    if "ep" not in c:
        return np.zeros(c["tp"].shape, dtype=bool)
    return (c["ep"] > 1) | (c["etp"] > 1)


def _cp(c: dict) -> np.ndarray:
    """The cp column (a space without it splits no sequence)."""
    return c["cp"] if "cp" in c else np.ones(c["tp"].shape, dtype=np.int64)


def _cp_comm(c: dict) -> np.ndarray:
    return c["cp_comm"] if "cp_comm" in c else np.zeros(c["tp"].shape, dtype=np.int64)


def _flavour(r: dict) -> str:
    return CP_COMMS[r.get("cp_comm", 0)]


def _world(c):
    return c["dp"] * c["tp"] * c["pp"] * _cp(c)


def _world_message(ctx, r) -> str:
    cp = r.get("cp", 1)
    names, sizes = ("dp*tp*pp", [r["dp"], r["tp"], r["pp"]]) if cp == 1 else \
        ("dp*tp*pp*cp", [r["dp"], r["tp"], r["pp"], cp])
    total = 1
    for n in sizes:
        total *= n
    return (f"{names} = {'*'.join(map(str, sizes))} = {total} does not equal the cluster's "
            f"{r['world']} GPUs")


def _cp_rules() -> list:
    """Context parallelism (planner/cost/context.py): load-balanced causal chunks, the flavour,
    the engine."""
    a2a = CP_COMMS.index("a2a")
    cp_on = lambda c: _cp(c) > 1  # noqa: E731
    return [
        Rule("cp_seq", "cp: the sequence does not split into 2*cp chunks",
             lambda ctx, c: cp_on(c) & (ctx.job.seq_len % (2 * _cp(c)) != 0),
             lambda ctx, r: f"cp={r['cp']}: seq len {ctx.job.seq_len} must divide into "
                            f"2*cp = {2 * r['cp']} equal chunks (load-balanced causal "
                            f"attention: rank i holds chunks i and {2 * r['cp']}-1-i)"),
        Rule("cp_comm_off", "cp_comm set without context parallelism",
             lambda ctx, c: ~cp_on(c) & (_cp_comm(c) != 0),
             lambda ctx, r: f"cp_comm {_flavour(r)} is only meaningful with cp > 1 "
                            f"(cp = {r.get('cp', 1)})"),
        Rule("cp_a2a_heads", "Ulysses (a2a): tp*cp does not divide the heads",
             lambda ctx, c: cp_on(c) & (_cp_comm(c) == a2a)
             & ((ctx.model.num_heads % (c["tp"] * _cp(c)) != 0)
                | (ctx.model.num_kv_heads % (c["tp"] * _cp(c)) != 0)),
             lambda ctx, r: f"cp_comm a2a splits heads over tp*cp = {r['tp'] * r['cp']}, "
                            f"which must divide num_heads {ctx.model.num_heads} and "
                            f"num_kv_heads {ctx.model.num_kv_heads}"),
        Rule("cp_engine", "context parallelism the engine does not run",
             lambda ctx, c: cp_on(c) & _everywhere(c, not ctx.engine.cp_comms),
             lambda ctx, r: f"cp={r['cp']}: the {ctx.engine.name} engine runs no context "
                            f"parallelism: {ctx.engine.cp_refusal}"),
        Rule("cp_flavour", "context-parallel flavour the engine does not run",
             lambda ctx, c: cp_on(c) & _everywhere(c, bool(ctx.engine.cp_comms))
             & ~np.isin(_cp_comm(c), [CP_COMMS.index(f) for f in ctx.engine.cp_comms]),
             lambda ctx, r: f"cp_comm {_flavour(r)}: the {ctx.engine.name} engine runs "
                            f"{', '.join(ctx.engine.cp_comms)} only "
                            f"({ctx.engine.cp_flavour_note})"),
        Rule("cp_moe", "context parallelism with expert parallelism",
             lambda ctx, c: cp_on(c) & _expert_split(c),
             lambda ctx, r: f"cp={r['cp']} with ep={r['ep']} etp={r['etp']}: the cost model "
                            f"and runtime do not combine context and expert parallelism"),
        Rule("cp_hsdp", "context parallelism with hybrid sharding",
             lambda ctx, c: cp_on(c) & _hybrid(c),
             lambda ctx, r: f"cp={r['cp']} with dp_shard={r['dp_shard']} < dp={r['dp']}: ZeRO "
                            f"shards over dp x cp, and hybrid shard groups of dp x cp are not "
                            f"modelled or run; use dp_shard 0"),
    ]


def _ep(c: dict) -> tuple:
    """(ep, etp) columns (ones where the space has none)."""
    if "ep" not in c:
        one = np.ones(c["tp"].shape, dtype=np.int64)
        return one, one
    return c["ep"], c["etp"]


def _experts(ctx) -> int:
    return ctx.model.moe.num_experts if ctx.model.moe is not None else 1


def _expert_ffn(ctx) -> int:
    return ctx.model.moe.expert_ffn_hidden_size if ctx.model.moe is not None else 1


def _runtime_gaps(ctx) -> list:
    from planner.runtime_support import runtime_gaps
    return runtime_gaps(ctx.model) if ctx.engine.runs_runtime_model else []


def _dp_shard(c: dict) -> np.ndarray:
    """Layout.dp_shard (a space without the column: 0, the whole dp group shards)."""
    return c["dp_shard"] if "dp_shard" in c else np.zeros(c["tp"].shape, dtype=np.int64)


def _hybrid(c: dict) -> np.ndarray:
    """Hybrid sharding: a shard group smaller than dp."""
    s = _dp_shard(c)
    return (s > 0) & (s < c["dp"])


def _hsdp_rules() -> list:
    """Hybrid sharding (Layout.dp_shard): shard groups of dp_shard consecutive dp ranks, the
    model states replicated across the dp / dp_shard groups (planner/engines.py hsdp_stages)."""
    s = _dp_shard
    return [
        Rule("dp_shard_divides", "dp_shard does not divide dp",
             lambda ctx, c: (s(c) > 0) & (c["dp"] % np.maximum(s(c), 1) != 0),
             lambda ctx, r: f"dp_shard={r['dp_shard']} must divide dp={r['dp']} (dp = "
                            f"dp_replicate x dp_shard)"),
        Rule("dp_shard_one", "dp_shard of one shards nothing",
             lambda ctx, c: (s(c) == 1) & (c["dp"] > 1),
             lambda ctx, r: "dp_shard=1 shards over one rank (every rank holds everything); "
                            "use zero_stage 0 to replicate, or dp_shard > 1"),
        Rule("dp_shard_zero", "dp_shard without ZeRO",
             lambda ctx, c: (s(c) > 0) & (c["zero_stage"] == 0),
             lambda ctx, r: f"dp_shard={r['dp_shard']} picks the ZeRO shard group, but "
                            f"ZeRO-0 shards nothing; use zero_stage >= 1 (or dp_shard 0)"),
        Rule("dp_shard_engine", "hybrid sharding at a ZeRO stage the engine does not run",
             lambda ctx, c: _hybrid(c) & (c["zero_stage"] > 0)
             & ~np.isin(c["zero_stage"], ctx.engine.hsdp_stages),
             lambda ctx, r: f"dp_shard={r['dp_shard']} < dp={r['dp']} with ZeRO-"
                            f"{r['zero_stage']}: {ctx.engine.hsdp_note}"),
    ]


def _offload(c: dict) -> np.ndarray:
    """Layout.offload as an index into OFFLOADS (a space without the column: none)."""
    return c["offload"] if "offload" in c else np.zeros(c["tp"].shape, dtype=np.int64)


def _offload_refused(ctx, c) -> np.ndarray:
    kind = _offload(c)
    out = np.zeros(kind.shape, dtype=bool)
    for i, stages in enumerate(ctx.engine.offload_stages, start=1):
        out |= (kind == i) & ~np.isin(c["zero_stage"], stages)
    return out


def _offload_rules() -> list:
    """CPU offload (Layout.offload; planner/cost/offload.py)."""
    name = lambda r: OFFLOADS[r["offload"]]  # noqa: E731
    return [
        Rule("offload_engine", "offload at a ZeRO stage the engine does not offload",
             _offload_refused,
             lambda ctx, r: f"offload {name(r)} with ZeRO-{r['zero_stage']}: "
                            f"{ctx.engine.offload_note}"),
        Rule("offload_host", "offload on a profile without host figures",
             lambda ctx, c: (_offload(c) > 0) & _everywhere(c, not ctx.profile.host.known),
             lambda ctx, r: f"offload {name(r)}: profile {ctx.profile.name} has no host "
                            f"memory / host-link / CPU Adam figures (a schema 1-3 profile; "
                            f"measure them with planner profile)"),
    ]


def _long_sequence(ctx) -> bool:
    return ctx.model.learned_positions and ctx.job.seq_len > ctx.model.max_seq_len


def _shape_rules() -> list:
    return [
        Rule("world", "dp x tp x pp x cp differs from the GPU count",
             lambda ctx, c: _world(c) != c["world"],
             _world_message),
        Rule("ep_dense", "expert parallelism on a dense model",
             lambda ctx, c: _everywhere(c, ctx.model.moe is None) & _expert_split(c),
             lambda ctx, r: f"ep={r['ep']} etp={r['etp']}: model {ctx.model.name} has no "
                            f"experts (ep and etp need an MoE model)"),
        Rule("runtime_model", "the engine's runtime model cannot build this model",
             lambda ctx, c: _everywhere(c, bool(_runtime_gaps(ctx))),
             lambda ctx, r: f"the {ctx.job.engine} engine trains runtime/model.py, which cannot "
                            f"build {ctx.model.name}: {'; '.join(_runtime_gaps(ctx))} (plan it "
                            f"with --engine megatron)"),
        *_expert_rules(),
        Rule("tp_heads", "tp does not divide the attention heads",
             lambda ctx, c: (ctx.model.num_heads % c["tp"] != 0)
             | (ctx.model.num_kv_heads % c["tp"] != 0),
             lambda ctx, r: f"tp={r['tp']} must divide num_heads {ctx.model.num_heads} and "
                            f"num_kv_heads {ctx.model.num_kv_heads}"),
        Rule("tp_ffn", "tp does not divide the MLP width",
             lambda ctx, c: ctx.model.ffn_hidden_size % c["tp"] != 0,
             lambda ctx, r: f"tp={r['tp']} must divide ffn_hidden_size "
                            f"{ctx.model.ffn_hidden_size}"),
        Rule("tp_node", "tp larger than a node",
             lambda ctx, c: c["tp"] > ctx.profile.gpus_per_node,
             lambda ctx, r: f"TP={r['tp']} needs {r['tp']} GPUs per node; a node has "
                            f"{ctx.profile.gpus_per_node}"),
        Rule("sp_tp", "sequence parallel without tp",
             lambda ctx, c: (c["sequence_parallel"] == 1) & (c["tp"] == 1),
             lambda ctx, r: "sequence_parallel needs tp > 1"),
        Rule("sp_seq", "sequence parallel: tp does not divide the sequence",
             lambda ctx, c: (c["sequence_parallel"] == 1)
             & (ctx.job.seq_len % (c["tp"] * _cp(c)) != 0),
             lambda ctx, r: f"sequence parallel: tp={r['tp']} must divide seq len "
                            f"{ctx.job.seq_len}" + (f" / cp {r['cp']}" if r.get("cp", 1) > 1
                                                    else "")),
        Rule("zero_dp", "ZeRO without data parallelism",
             lambda ctx, c: (c["zero_stage"] > 0) & (c["dp"] * _cp(c) == 1),
             lambda ctx, r: f"ZeRO-{r['zero_stage']} shards over data parallel ranks; it needs "
                            f"dp > 1 (dp = {r['dp']})" if r.get("cp", 1) == 1 else
                            f"ZeRO-{r['zero_stage']} shards over data x context parallel "
                            f"ranks; it needs dp*cp > 1 (dp = {r['dp']}, cp = {r['cp']})"),
        Rule("global_batch", "micro-batches x dp differ from the global batch",
             lambda ctx, c: _samples(c) != ctx.job.global_batch,
             lambda ctx, r: f"global batch {ctx.job.global_batch} != micro batch "
                            f"{r['micro_batch']} x {r['num_microbatches']} micro-batches x dp "
                            f"{r['dp']} = {_samples(r)}"),
        Rule("precision", "precision not supported by the GPU",
             lambda ctx, c: _everywhere(c, not ctx.profile.supports(ctx.job.precision)),
             _precision_message),
        Rule("fp8_engine", "FP8 recipe the engine does not run",
             lambda ctx, c: _everywhere(c, _fp8_engine_broken(ctx)), _fp8_engine_message),
        Rule("fp8_tp", "FP8 with tensor parallelism under an engine without it",
             lambda ctx, c: _everywhere(c, ctx.job.fp8 and not ctx.engine.fp8_with_tp)
             & (c["tp"] > 1),
             lambda ctx, r: f"precision fp8 with tp={r['tp']}: the {ctx.engine.name} "
                            f"engine's FP8 (torchao float8 linears) runs without tensor "
                            f"parallelism; use tp=1 or --engine megatron"),
        Rule("compile_engine", "torch.compile on an engine that does not compile blocks",
             lambda ctx, c: _compiled(c) & _everywhere(c, not ctx.engine.compiles_blocks),
             lambda ctx, r: f"compile (torch.compile of each block) runs on the torch engine "
                            f"only, not {ctx.job.engine}"),
        Rule("positions", "sequence longer than the learned positions",
             lambda ctx, c: _everywhere(c, _long_sequence(ctx)),
             lambda ctx, r: f"seq len {ctx.job.seq_len} exceeds {ctx.model.name}'s "
                            f"{ctx.model.max_seq_len} learned positions"),
    ]


def _expert_rules() -> list:
    """Expert parallelism folded over the dense part's GPUs (Megatron-Core's MoE layout:
    attention on tp x dp, experts on etp x ep x expert-dp of the same tp x dp ranks)."""
    return [
        Rule("ep_experts", "ep does not divide the experts",
             lambda ctx, c: _experts(ctx) % _ep(c)[0] != 0,
             lambda ctx, r: f"ep={r['ep']} must divide the {_experts(ctx)} routed experts of "
                            f"{ctx.model.name}"),
        Rule("etp_ffn", "etp does not divide the expert FFN width",
             lambda ctx, c: _expert_ffn(ctx) % _ep(c)[1] != 0,
             lambda ctx, r: f"etp={r['etp']} must divide expert_ffn_hidden_size "
                            f"{_expert_ffn(ctx)}"),
        Rule("ep_group", "ep x etp does not divide tp x dp",
             lambda ctx, c: (c["tp"] * c["dp"]) % (_ep(c)[0] * _ep(c)[1]) != 0,
             lambda ctx, r: f"ep*etp = {r['ep']}*{r['etp']} = {r['ep'] * r['etp']} must divide "
                            f"the dense group tp*dp = {r['tp']}*{r['dp']} = "
                            f"{r['tp'] * r['dp']} (experts fold over the same GPUs)"),
        Rule("ep_engine", "expert parallelism on an engine without it",
             lambda ctx, c: _everywhere(c, not ctx.engine.expert_parallel) & (_ep(c)[0] > 1),
             lambda ctx, r: f"ep={r['ep']}: the {ctx.job.engine} engine has no expert "
                            f"parallelism (DeepSpeed's needs deepspeed.moe.layer.MoE modules, "
                            f"which the runtime's model does not use); use ep=1 or --engine "
                            f"megatron"),
        Rule("etp_engine", "expert tensor parallelism on an engine without it",
             lambda ctx, c: _everywhere(c, not ctx.engine.expert_tensor_parallel)
             & (_ep(c)[1] > 1),
             lambda ctx, r: f"etp={r['etp']}: the {ctx.job.engine} engine keeps each expert "
                            f"whole on its rank; use etp=1 or --engine megatron"),
        Rule("ep_sp", "experts with tp > 1 need sequence parallelism (Megatron-Core)",
             lambda ctx, c: _everywhere(c, ctx.engine.name == "megatron"
                                        and ctx.model.moe is not None)
             & (c["tp"] > 1) & (c["sequence_parallel"] == 0),
             lambda ctx, r: f"tp={r['tp']} with an MoE model: Megatron-LM requires "
                            f"--sequence-parallel when tensor parallelism is used with experts "
                            f"(megatron/training/arguments.py); add --sp"),
        Rule("ep_dp", "ep does not divide dp (the torch runtime's EP group)",
             lambda ctx, c: _everywhere(c, ctx.engine.ep_within_dp) & (c["dp"] % _ep(c)[0] != 0),
             lambda ctx, r: f"ep={r['ep']} must divide dp={r['dp']}: the {ctx.job.engine} "
                            f"engine's expert-parallel groups are slices of its data-parallel "
                            f"group"),
    ]


def _schedule_rules() -> list:
    interleaved = lambda c: _in(c["schedule"], INTERLEAVED)
    zbv = lambda c: _in(c["schedule"], ("zbv",))
    return [
        Rule("interleave_pp", "interleaved schedule without a pipeline",
             lambda ctx, c: interleaved(c) & (c["pp"] == 1),
             lambda ctx, r: f"schedule {_name(r)} needs pp > 1"),
        Rule("zbv_v", "zbv runs exactly 2 virtual stages",
             lambda ctx, c: zbv(c) & (c["virtual_stages"] != 2),
             lambda ctx, r: f"schedule zbv runs exactly 2 virtual stages per rank, got "
                            f"{r['virtual_stages']}"),
        Rule("interleave_v", "interleaved schedule with one stage per rank",
             lambda ctx, c: interleaved(c) & ~zbv(c) & (c["pp"] > 1) & (c["virtual_stages"] < 2),
             lambda ctx, r: f"schedule {_name(r)} needs virtual_stages >= 2, got "
                            f"{r['virtual_stages']}"),
        Rule("single_v", "virtual stages under a one-stage schedule",
             lambda ctx, c: ~interleaved(c) & (c["virtual_stages"] != 1),
             lambda ctx, r: f"schedule {_name(r)} runs one stage per rank; virtual_stages is "
                            f"{r['virtual_stages']}"),
        Rule("interleave_m", "interleaved: micro-batches not divisible by pp",
             lambda ctx, c: interleaved(c) & (c["pp"] > 1)
             & (c["num_microbatches"] % c["pp"] != 0),
             lambda ctx, r: f"interleaved schedule needs micro-batches ({r['num_microbatches']}) "
                            f"divisible by pp ({r['pp']})"),
        Rule("chunks", "more pipeline chunks than layers",
             lambda ctx, c: _chunks(c) > ctx.model.num_layers,
             lambda ctx, r: f"pp*virtual_stages = {_chunks(r)} model chunks exceed "
                            f"{ctx.model.num_layers} layers"),
        Rule("split_entries", "layers_per_stage does not match the chunks",
             lambda ctx, c: (c["lps_n"] > 0) & (c["lps_n"] != _chunks(c)),
             lambda ctx, r: f"layers_per_stage has {r['lps_n']} entries; pp*virtual_stages is "
                            f"{_chunks(r)}"),
        Rule("split_sum", "layers_per_stage does not add up to the layers",
             lambda ctx, c: (c["lps_n"] > 0) & (c["lps_n"] == _chunks(c))
             & (c["lps_sum"] != ctx.model.num_layers),
             lambda ctx, r: f"layers_per_stage sums to {r['lps_sum']}; the model has "
                            f"{ctx.model.num_layers} layers"),
    ]


def _pytorch_rules() -> list:
    """Combinations PyTorch 2.13's building blocks refuse or get wrong (runtime notes 1-3, and
    the DDP cases checked on 4 gloo ranks, dp=2 x pp=2)."""
    return [
        Rule("zb_ddp", "zero-bubble schedule with DDP/ZeRO-3 (wrong gradients in PyTorch)",
             _zb_broken, _zb_message),
        Rule("ddp_microbatches", "DDP under pipelining needs more micro-batches than stages",
             lambda ctx, c: _pipelining(ctx, c) & _ddp(c) & (c["num_microbatches"] <= c["pp"]),
             lambda ctx, r: f"DDP under pipelining needs more micro-batches "
                            f"({r['num_microbatches']}) than stages (pp={r['pp']})"),
        Rule("ddp_gpipe", "GPipe with DDP (fails in PyTorch)",
             lambda ctx, c: _pipelining(ctx, c) & _ddp_proper(c) & _in(c["schedule"], ("gpipe",)),
             lambda ctx, r: f"schedule gpipe with DDP (ZeRO-{r['zero_stage']}, dp={r['dp']}) "
                            f"fails in PyTorch (DDP reducer assert at the second step); use 1f1b "
                            f"or ZeRO-2"),
        Rule("ddp_chunks", "interleaved DDP needs more micro-batches than chunks",
             lambda ctx, c: _pipelining(ctx, c) & _ddp_proper(c)
             & ~_in(c["schedule"], ("gpipe",)) & (c["virtual_stages"] > 1)
             & (c["num_microbatches"] <= _chunks(c)),
             lambda ctx, r: f"DDP under an interleaved schedule needs more micro-batches "
                            f"({r['num_microbatches']}) than chunks (pp x virtual_stages = "
                            f"{_chunks(r)})"),
        Rule("compile_tp", "torch.compile with tensor parallelism (fails in PyTorch)",
             lambda ctx, c: _compiled(c) & (c["tp"] > 1),
             lambda ctx, r: f"compile with tp={r['tp']} fails in PyTorch 2.13 (the compiled "
                            f"block's backward through DTensor's redistribute: AttributeError "
                            f"'_local_tensor', on 2 gloo ranks); use tp=1 or compile off"),
        Rule("1f1b_microbatches", "1F1B (PyTorch) needs at least as many micro-batches as stages",
             lambda ctx, c: _pipelining(ctx, c) & _in(c["schedule"], ("1f1b",))
             & (c["num_microbatches"] < c["pp"]),
             lambda ctx, r: f"PyTorch's 1F1B schedule needs at least as many micro-batches "
                            f"({r['num_microbatches']}) as stages (pp={r['pp']})"),
    ]


def _engine_rules() -> list:
    """What an engine's own code refuses (planner/engines.py traits; DeepSpeed 0.19.8)."""
    autotp = lambda ctx, c: np.asarray(ctx.engine.tp_only_autotp) & (c["tp"] > 1)
    return [
        Rule("engine_schedule", "schedule the engine does not run",
             lambda ctx, c: (c["pp"] > 1) & ~_in(c["schedule"], ctx.engine.schedules),
             lambda ctx, r: f"schedule {_name(r)}: the {ctx.engine.name} engine runs "
                            f"{', '.join(ctx.engine.schedules)} only"),
        Rule("pipeline_zero", "ZeRO stage the engine's pipeline refuses",
             lambda ctx, c: (c["pp"] > 1)
             & ~np.isin(c["zero_stage"], ctx.engine.pipeline_zero_stages),
             lambda ctx, r: f"ZeRO-{r['zero_stage']} with pp={r['pp']}: DeepSpeed's pipeline "
                            "engine asserts ZeRO-2 and ZeRO-3 are incompatible with pipeline "
                            "parallelism; use ZeRO-0 or 1"),
        Rule("autotp_pp", "AutoTP tensor parallelism with a pipeline",
             lambda ctx, c: autotp(ctx, c) & (c["pp"] > 1),
             lambda ctx, r: f"tp={r['tp']} with pp={r['pp']}: DeepSpeed runs tensor parallelism "
                            "through AutoTP, which a PipelineModule does not take; "
                            "Megatron-DeepSpeed does (plan it with --engine megatron)"),
        Rule("autotp_sp", "sequence parallel under AutoTP",
             lambda ctx, c: autotp(ctx, c) & (c["sequence_parallel"] == 1),
             lambda ctx, r: "sequence_parallel: DeepSpeed's AutoTP has no sequence parallelism; "
                            "Megatron-DeepSpeed does (plan it with --engine megatron)"),
    ]


def _lora(ctx) -> bool:
    return ctx.job.lora is not None


def _lora_absent_message(ctx, r) -> str:
    absent = ctx.job.lora.absent_targets(ctx.model.mlp)
    have = "gate, up, down" if ctx.model.mlp == "swiglu" else "fc, proj"
    return (f"lora target {absent[0]!r} is not in {ctx.model.name} (its {ctx.model.mlp} MLP has "
            f"{have}; attention has q, k, v, o)")


def _task_rules() -> list:
    """Fine-tuning (planner/job.py task, planner/lora.py): what the runtime and the cost model
    cover.  LoRA's adapters are plain modules around nn.Linear; PyTorch's ColwiseParallel /
    RowwiseParallel would shard every parameter of the module along the base weight's dimension,
    lora_A's rank rows included, so tensor parallelism is refused rather than silently wrong."""
    op = RECOMPUTE.index("op")
    return [
        Rule("lora_targets", "LoRA target the model does not have",
             lambda ctx, c: _everywhere(c, _lora(ctx) and bool(
                 ctx.job.lora.absent_targets(ctx.model.mlp))), _lora_absent_message),
        Rule("lora_engine", "LoRA on an engine without adapters",
             lambda ctx, c: _everywhere(c, _lora(ctx) and ctx.job.engine != "torch"),
             lambda ctx, r: f"LoRA (rank {ctx.job.lora.rank}) is modelled and run by the torch "
                            f"engine only (runtime/lora.py); the {ctx.job.engine} engine's "
                            f"optimizers and exports have no adapters"),
        Rule("lora_tp", "LoRA with tensor parallelism",
             lambda ctx, c: _everywhere(c, _lora(ctx)) & (c["tp"] > 1),
             lambda ctx, r: f"LoRA with tp={r['tp']}: PyTorch's Colwise/RowwiseParallel would "
                            f"shard lora_A's {ctx.job.lora.rank} rank rows with the base weight; "
                            f"use tp=1 (adapters are small: data parallelism and ZeRO suffice)"),
        Rule("lora_recompute_op", "LoRA with the op-level recompute policy",
             lambda ctx, c: _everywhere(c, _lora(ctx)) & (c["recompute"] == op),
             lambda ctx, r: "LoRA with recompute op: the op policy's saved outputs are counted "
                            "for full training only; use none, selective or full"),
        Rule("lora_compile", "LoRA with torch.compile",
             lambda ctx, c: _everywhere(c, _lora(ctx)) & _compiled(c),
             lambda ctx, r: "LoRA with compile: the compiled-block census is of fully trained "
                            "blocks; use compile off"),
        Rule("classify_tp", "classification with tensor parallelism",
             lambda ctx, c: _everywhere(c, ctx.job.task == "classify") & (c["tp"] > 1),
             lambda ctx, r: f"task classify with tp={r['tp']}: the {ctx.job.num_labels}-way "
                            f"classifier is not vocabulary-parallel; use tp=1"),
    ]


def _policy(r: dict) -> str:
    return RECOMPUTE[r["recompute"]]


def _recompute_rules() -> list:
    """recompute_every applies a policy to every K-th block (torchtitan's selective-layer
    convention); engines run only their own policies (planner.engines)."""
    none = RECOMPUTE.index("none")
    return [
        Rule("recompute_every_none", "recompute_every without a recompute policy",
             lambda ctx, c: (c["recompute_every"] > 1) & (c["recompute"] == none),
             lambda ctx, r: f"recompute_every {r['recompute_every']} picks the blocks a "
                            f"recompute policy runs on; recompute is none"),
        Rule("recompute_every_layers", "recompute_every larger than the layers",
             lambda ctx, c: c["recompute_every"] > ctx.model.num_layers,
             lambda ctx, r: f"recompute_every {r['recompute_every']} exceeds the model's "
                            f"{ctx.model.num_layers} layers: no block would recompute"),
        Rule("recompute_engine", "recompute policy the engine does not run",
             lambda ctx, c: ~np.isin(c["recompute"], [RECOMPUTE.index(p) for p in
                                                      ctx.engine.recompute_policies]),
             lambda ctx, r: f"recompute {_policy(r)} is not a {ctx.engine.name} engine policy "
                            f"(it runs {', '.join(ctx.engine.recompute_policies)})"),
        Rule("recompute_every_engine", "recompute_every > 1 under an engine without it",
             lambda ctx, c: _everywhere(c, ctx.engine.recompute_every_block_only)
             & (c["recompute_every"] > 1),
             lambda ctx, r: f"recompute_every {r['recompute_every']} (every K-th block) is not "
                            f"expressible in the {ctx.engine.name} engine; use 1"),
    ]


def _runtime_moe_rules() -> list:
    """What the torch runtime's MoE (runtime/moe.py) does not build yet (etp and latent
    attention: rules etp_engine and runtime_model): its router sees whole sequences (the
    per-sequence auxiliary loss), and ZeRO-1's flat partition would mix experts of ep ranks."""
    return [
        Rule("moe_sp_runtime", "sequence parallelism over the runtime model's MoE blocks",
             lambda ctx, c: _everywhere(c, ctx.engine.runs_runtime_model and ctx.model.is_moe)
             & (c["sequence_parallel"] == 1),
             lambda ctx, r: f"sequence parallel with tp={r['tp']}: runtime/model.py's MoE "
                            f"blocks route whole sequences (use sequence_parallel off)"),
        Rule("ep_zero1_runtime", "expert parallelism with ZeRO-1 in the torch runtime",
             lambda ctx, c: _everywhere(c, ctx.engine.ep_within_dp) & _expert_split(c)
             & (c["zero_stage"] == 1) & (c["dp"] > 1),
             lambda ctx, r: f"ep={r['ep']} with ZeRO-1: the torch runtime's sharded optimizer "
                            f"does not handle expert-parallel experts (use ZeRO-0, 2 or 3)"),
        Rule("ep_hsdp_runtime", "expert parallelism with hybrid sharding in the torch runtime",
             lambda ctx, c: _everywhere(c, ctx.engine.ep_within_dp) & _expert_split(c)
             & _hybrid(c),
             lambda ctx, r: f"ep={r['ep']} with dp_shard={r['dp_shard']}: the torch runtime "
                            f"splits experts over the whole data-parallel group, not over a "
                            f"hybrid shard group (use dp_shard 0)"),
    ]


RULES = _shape_rules() + _cp_rules() + _hsdp_rules() + _offload_rules() + _schedule_rules() + \
    _pytorch_rules() + _recompute_rules() + _engine_rules() + _task_rules() + \
    _runtime_moe_rules()
BY_KEY = {rule.key: rule for rule in RULES}
# labels of the search's own rejections (not layout rules)
SEARCH_LABELS = {"batch": "dp does not divide the global batch",
                 "memory": "does not fit in memory", "target": "below the target tokens/s",
                 "host_memory": "CPU offload does not fit in host memory"}
# shape-level reasons (why tp or dp cannot take the obvious value) the nothing-fits line cites
SHAPE_KEYS = ("tp_heads", "tp_ffn", "tp_node", "batch")
# reasons that rule out every layout of a request: said first when nothing is valid
REQUEST_KEYS = ("precision", "fp8_engine", "positions", "compile_engine", "lora_targets",
                "lora_engine", "runtime_model")


def label(key: str) -> str:
    return BY_KEY[key].label if key in BY_KEY else SEARCH_LABELS[key]


def first_broken(ctx: Context, cols: dict) -> np.ndarray:
    """Index into RULES of each layout's first broken rule; -1 where none is."""
    reason = np.full(cols["tp"].shape, -1, dtype=np.int64)
    for i, rule in enumerate(RULES):
        reason[rule.broken(ctx, cols) & (reason < 0)] = i
    return reason


def messages(ctx: Context, cols: dict, i: int = 0) -> list:
    """Every broken rule's message for layout i of the columns, in table order."""
    row = row_at(cols, i)
    return [rule.message(ctx, row) for rule in RULES if bool(rule.broken(ctx, cols)[i])]
