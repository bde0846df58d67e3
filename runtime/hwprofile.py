"""Measure this machine for `planner profile`: GEMM throughput over transformer-shaped
matrices, copy bandwidth, all-reduce times among local ranks (gloo on CPU, NCCL on GPU) and the
host time of one small transformer layer, plain and under each tensor-parallel degree.

Run as `python -m runtime.hwprofile --out measurements.json --ranks N`; the planner turns the
JSON (planner.measured.ProfileMeasurements) into a profile (planner/calibration/profile_fit.py)."""

import argparse
import json
import math
import os
import platform
import socket
import sys
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from planner.measured import PROFILE_SCHEMA_VERSION, ProfileMeasurements

# Datasheet dense peaks by device name, for GPUs; on CPU the best measured GEMM is the peak.
GPU_PEAKS = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "V100": 125e12}


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def _timed(fn, device, repeat: int) -> float:
    fn()
    _sync(device)
    start = time.perf_counter()
    for _ in range(repeat):
        fn()
    _sync(device)
    return (time.perf_counter() - start) / repeat


def _gemm_shapes(device) -> list:
    hs = (1024, 2048, 4096, 8192) if device.type == "cuda" else (128, 256, 512)
    tokens = 8192 if device.type == "cuda" else 512
    return [(tokens, h, k * h) for h in hs for k in (1, 3, 4)] + \
        [(tokens, 4 * h, h) for h in hs]


def measure_gemms(device, dtype, share: float) -> list:
    """[(m, n, k, FLOP/s)] for out[m, n] = a[m, k] @ b[k, n]; `share` scales a CPU rate to one
    of several processes sharing the cores."""
    rows = []
    shapes = _gemm_shapes(device)
    for i, (m, k, n) in enumerate(shapes):
        a = torch.randn(m, k, device=device, dtype=dtype)
        b = torch.randn(k, n, device=device, dtype=dtype)
        # best of three timings: the least disturbed by other work on the machine
        seconds = min(_timed(lambda: a @ b, device, 10 if device.type == "cuda" else 3)
                      for _ in range(3))
        rate = 2 * m * n * k / seconds * share
        rows.append((m, n, k, rate))
        _log(f"[gemm {i + 1}/{len(shapes)}] {m}x{k}x{n}: {rate / 1e12:.3f} TFLOP/s")
    return rows


def measure_copy(device, share: float) -> float:
    x = torch.empty(2**26 if device.type == "cuda" else 2**23, device=device)
    y = torch.empty_like(x)
    seconds = _timed(lambda: y.copy_(x), device, 10)
    rate = 2 * x.numel() * x.element_size() / seconds * share
    _log(f"[copy] {rate / 1e9:.1f} GB/s (read + write)")
    return rate


# One small llama layer: its FLOPs and bytes are negligible, so its time is host work.
PROBE = dict(name="host-probe", arch="llama", num_layers=1, hidden_size=64, num_heads=8,
             num_kv_heads=8, ffn_hidden_size=128, vocab_size=256, max_seq_len=16,
             tie_embeddings=False, linear_bias=False)
PROBE_REPEAT = 10
PROBE_SECONDS = 2.0


def _probe_block(tp: int, device):
    """(block, input, rope tables) of the probe layer; under TP (DTensor, sequence parallel)
    when tp > 1."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor.parallel import parallelize_module

    from planner.spec import ModelSpec
    from runtime.model import Block, rope_tables
    from runtime.parallelize import block_plan
    spec = ModelSpec(**PROBE)
    torch.manual_seed(0)
    block = Block(spec).to(device)
    if tp > 1:
        world = dist.get_world_size()
        mesh = init_device_mesh(device.type, (world // tp, tp), mesh_dim_names=("rest", "tp"))
        parallelize_module(block, mesh["tp"], block_plan(block, True))
    x = torch.randn(1, spec.max_seq_len // tp, spec.hidden_size, device=device,
                    requires_grad=True)
    return block, x, rope_tables(spec, device)


def _agreed_passes(seconds_per_pass: float, device) -> int:
    """Passes enough for PROBE_SECONDS on the slowest rank: every rank of a TP group must run
    the same number of passes (their collectives pair up), so the ranks agree on the largest."""
    n = torch.tensor([max(PROBE_REPEAT, math.ceil(PROBE_SECONDS / seconds_per_pass))],
                     device=device)
    if dist.is_initialized():
        dist.all_reduce(n, op=dist.ReduceOp.MAX)
    return int(n.item())


def measure_layer_host(tp: int, device) -> list:
    """[forward_s, backward_s] of the probe layer with every rank busy: the mean over at least
    PROBE_SECONDS of passes, so that the time a rank waits for a core (CPU ranks share the
    host's cores, and a scheduler slice is milliseconds long) counts."""
    block, x, (cos, sin) = _probe_block(tp, device)
    for _ in range(3):  # warm-up passes fill the dispatch caches
        block(x, cos, sin).sum().backward()
    _sync(device)
    start = time.perf_counter()
    block(x, cos, sin).sum().backward()
    _sync(device)
    passes = _agreed_passes(time.perf_counter() - start, device)
    fwd = bwd = 0.0
    for _ in range(passes):
        start = time.perf_counter()
        y = block(x, cos, sin).sum()
        _sync(device)
        mid = time.perf_counter()
        y.backward()
        _sync(device)
        fwd, bwd = fwd + mid - start, bwd + time.perf_counter() - mid
    return [fwd / passes, bwd / passes]


def probe_degrees(ranks: int) -> list:
    """Powers of two that divide the ranks and the probe's heads."""
    heads = PROBE["num_heads"]
    return [d for d in range(1, ranks + 1)
            if ranks % d == 0 and heads % d == 0 and d & (d - 1) == 0]


def _ranks_worker(rank, ranks, port, sizes, out_path):
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    torch.set_num_threads(1)
    dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=ranks)
    device = torch.device("cuda", rank) if backend == "nccl" else torch.device("cpu")
    times = []
    for size in sizes:
        t = torch.ones(size // 4, device=device)
        dist.barrier()
        times.append(min(_timed(lambda: dist.all_reduce(t), device, 3) for _ in range(3)))
        if rank == 0:
            _log(f"[all-reduce {ranks} ranks] {size / 2**20:.0f} MiB: {times[-1] * 1e3:.2f} ms")
    host = {}
    for tp in probe_degrees(ranks):
        dist.barrier()
        host[str(tp)] = measure_layer_host(tp, device)
        if rank == 0:
            _log(f"[host, layer at tp={tp}] forward {host[str(tp)][0] * 1e3:.1f} ms, "
                 f"backward {host[str(tp)][1] * 1e3:.1f} ms")
    if rank == 0:
        with open(out_path, "w") as f:
            json.dump({"allreduce_s": times, "layer_host_s": host}, f)
    dist.destroy_process_group()


def measure_ranks(ranks: int, tmp_path: str) -> tuple:
    """All-reduce times at several sizes and the probe layer's host time at each TP degree,
    with all `ranks` processes running at once."""
    sizes = [2**20, 2**22, 2**24]
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.start_processes(_ranks_worker, args=(ranks, port, sizes, tmp_path), nprocs=ranks,
                       start_method="fork")
    with open(tmp_path) as f:
        result = json.load(f)
    return sizes, result["allreduce_s"], result["layer_host_s"]


def measure(ranks: int, tmp_path: str) -> dict:
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    dtype = torch.bfloat16 if cuda and torch.cuda.is_bf16_supported() else torch.float32
    share = 1.0
    if not cuda:
        torch.set_num_threads(os.cpu_count() or 1)
        share = 1.0 / ranks  # the host's cores are shared by the ranks of a CPU run
    name = torch.cuda.get_device_name() if cuda else f"cpu-process ({platform.processor()})"
    peak = next((v for k, v in GPU_PEAKS.items() if k in name), None) if cuda else None
    memory = torch.cuda.get_device_properties(0).total_memory if cuda else \
        os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // ranks
    if ranks > 1:
        sizes, times, host = measure_ranks(ranks, tmp_path)
    else:
        torch.set_num_threads(1)
        sizes, times, host = [], [], {"1": measure_layer_host(1, device)}
        _log(f"[host, layer] forward {host['1'][0] * 1e3:.1f} ms, "
             f"backward {host['1'][1] * 1e3:.1f} ms")
        torch.set_num_threads(os.cpu_count() or 1)
    return {"schema_version": PROFILE_SCHEMA_VERSION, "device_name": name,
            "host": socket.gethostname(), "ranks": ranks,
            "precision": "bf16" if dtype == torch.bfloat16 else "fp32", "peak_flops": peak,
            "gemms": measure_gemms(device, dtype, share),
            "copy_bytes_per_s": measure_copy(device, share), "memory_bytes": memory,
            "allreduce_bytes": sizes, "allreduce_s": times,
            "layer_host_s": host, "host_is_device": not cuda,
            "shared_cores": 0 if cuda else len(os.sched_getaffinity(0))}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m runtime.hwprofile")
    parser.add_argument("--out", required=True)
    parser.add_argument("--ranks", type=int, required=True)
    args = parser.parse_args(argv)
    if args.ranks < 1:
        print(f"hwprofile: error: --ranks must be >= 1, got {args.ranks}", file=sys.stderr)
        return 2
    result = measure(args.ranks, args.out + ".allreduce")
    if os.path.exists(args.out + ".allreduce"):
        os.remove(args.out + ".allreduce")
    # the typed file planner/calibration/profile_fit.py reads: checked here, where it is made
    ProfileMeasurements.from_dict(result).save(args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
