"""Fork-based multi-rank launcher for runtime tests (RUNTIME_NOTES: fork after importing the
distributed modules, one thread per rank, a fresh port per world, failures end the run fast)."""

import os
import socket
import tempfile
import time

import torch
import torch.distributed as dist
# Imported in the parent before forking, so ranks start in a fraction of a second.
import torch.distributed.checkpoint
import torch.distributed.fsdp
import torch.distributed.pipelining
import torch.distributed.tensor.parallel
import torch.multiprocessing as mp

from planner.hardware import load_cluster
from planner.job import Job
from planner.plan import Layout, Plan
from planner.spec import ModelSpec

WORLD_TIMEOUT_S = 240


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_main(rank, world, port, out_dir, fn, args):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world))
    torch.set_num_threads(1)
    try:
        result = fn(*args)
        torch.save(result, os.path.join(out_dir, f"{rank}.pt"))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def run_world(world: int, fn, *args, timeout_s: float = WORLD_TIMEOUT_S) -> list:
    """Run fn(*args) on `world` forked ranks; return each rank's result (rank order)."""
    with tempfile.TemporaryDirectory() as out_dir:
        ctx = mp.start_processes(_rank_main, args=(world, free_port(), out_dir, fn, args),
                                 nprocs=world, join=False, start_method="fork")
        deadline = time.monotonic() + timeout_s
        while not ctx.join(timeout=0.5):
            if time.monotonic() > deadline:
                for p in ctx.processes:
                    if p.is_alive():
                        p.kill()
                raise TimeoutError(f"{world}-rank world did not finish in {timeout_s} s")
        return [torch.load(os.path.join(out_dir, f"{r}.pt"), weights_only=False)
                for r in range(world)]


# --- shared pieces of the runtime tests --------------------------------------------------------
# Small enough for 8 CPU ranks on 2 cores, large enough for pp=4 x 2 virtual stages and tp=4.
SPEC = ModelSpec(name="test-llama", arch="llama", num_layers=8, hidden_size=64, num_heads=8,
                 num_kv_heads=4, ffn_hidden_size=128, vocab_size=256, max_seq_len=32,
                 tie_embeddings=False, linear_bias=False)
SEQ_LEN = 32
_TOKENS = []


def corpus_tokens():
    """Real text (the stdlib's sources), loaded once in the parent before ranks fork."""
    if not _TOKENS:
        from runtime.data import load_tokens
        _TOKENS.append(load_tokens(cap_bytes=1 << 20))
    return _TOKENS[0]


def make_plan(layout: Layout, spec: ModelSpec = SPEC, precision: str = "fp32") -> Plan:
    job = Job(global_batch=layout.micro_batch * layout.num_microbatches * layout.dp,
              seq_len=SEQ_LEN, precision=precision)
    cluster = load_cluster("cpu", 1, num_gpus=layout.world_size)
    return Plan(model=spec, cluster=cluster, job=job, layout=layout)


def _train_rank(plan: Plan, steps: int, tokens, measure_step: int) -> dict:
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_model_state_dict,
    )

    from runtime.data import TokenData
    from runtime.engine import Engine
    from runtime.mesh import init_distributed
    from runtime.model import canonical_name
    ctx = init_distributed(plan.layout, timeout_s=60)
    engine = Engine(plan, ctx)
    data = TokenData(tokens, SEQ_LEN, plan.layout, ctx.dp_rank, causal=plan.model.causal)
    losses, record = [], {}
    for step in range(steps):
        inputs, labels = data.batch(step)
        torch.manual_seed(step)
        losses.append(engine.train_step(inputs, labels, record if step == measure_step else None))
    val_loss = engine.eval_loss(*data.val_batch(0))
    params = {}
    for module in engine.modules:
        full = get_model_state_dict(module, options=StateDictOptions(full_state_dict=True))
        params.update({canonical_name(plan.model, k): v for k, v in full.items()})
    # expert-parallel experts: every ep rank of the first expert-data-parallel group has its own
    keep = ctx.dp_rank // ctx.ep == 0 and ctx.tp_rank == 0
    return {"coords": dict(ctx.coords), "losses": losses, "record": record, "val": val_loss,
            "params": params if keep else None, "ep_rank": ctx.ep_rank}


def _train_many(plans: list, steps: int, tokens, measure_step: int) -> list:
    """Several plans one after another in one world (shared start-up and DTensor caches)."""
    return [_train_rank(plan, steps, tokens, measure_step) for plan in plans]


def _merge(ranks: list) -> dict:
    from runtime.moe import is_expert_param
    params, experts = {}, {}
    for r in ranks:
        for k, v in (r["params"] or {}).items():
            if is_expert_param(k):
                experts.setdefault(k, {})[r["ep_rank"]] = v
            else:
                params[k] = v
    for k, shards in experts.items():  # whole stacked tensors, experts in ep-rank order
        params[k] = torch.cat([shards[i] for i in sorted(shards)])
    return {"losses": ranks[0]["losses"], "params": params, "val_loss": ranks[0]["val"],
            "ranks": [(r["coords"], r["record"]) for r in ranks]}


def train_world(plan: Plan, steps: int = 3, measure_step: int = 1) -> dict:
    """Train `steps` steps under the plan on forked ranks: losses (all ranks agree), the whole
    model's final parameters, and each rank's memory record."""
    return train_worlds({"plan": plan}, steps, measure_step)["plan"]


def train_worlds(plans: dict, steps: int = 3, measure_step: int = 1) -> dict:
    """train_world for many plans {name: plan}: one forked world per world size."""
    by_world = {}
    for name, plan in plans.items():
        by_world.setdefault(plan.layout.world_size, []).append((name, plan))
    out = {}
    for world, items in sorted(by_world.items()):
        ranks = run_world(world, _train_many, [p for _, p in items], steps, corpus_tokens(),
                          measure_step)
        for i, (name, _) in enumerate(items):
            out[name] = _merge([r[i] for r in ranks])
    return out
