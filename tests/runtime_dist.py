"""Fork-based multi-rank launcher for runtime tests (RUNTIME_NOTES: fork after importing the
distributed modules, one thread per rank, a fresh port per world, failures end the run fast)."""

import os
import socket
import tempfile
import time

import torch
import torch.distributed as dist
import torch.distributed.checkpoint  # noqa: F401  (imported before fork: fast rank start)
import torch.distributed.fsdp  # noqa: F401
import torch.distributed.pipelining  # noqa: F401
import torch.distributed.tensor.parallel  # noqa: F401
import torch.multiprocessing as mp

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
