"""Measure this machine for `planner profile`: GEMM throughput over transformer-shaped
matrices, copy bandwidth, all-reduce times among local ranks (gloo on CPU, NCCL on GPU) and the
host time of one small transformer layer, plain and under each tensor-parallel degree.  Each
figure is the median of REPEATS timings, and the spread of those timings is recorded; so is the
machine's load before the measuring (load average and an idle-core probe: a busy machine is
refused unless --allow-busy) and while it runs (the CPU share the ranks got).

Run as `python -m runtime.hwprofile --out measurements.json --ranks N`; the planner turns the
JSON (planner.measured.ProfileMeasurements) into a profile (planner/calibration/profile_fit.py).
Exit code 3: the machine was busy; the reason is in `<out>.refused`."""

import argparse
import json
import math
import multiprocessing
import os
import platform
import socket
import statistics
import sys
import time
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from planner.measured import PROFILE_SCHEMA_VERSION, MachineLoad, ProfileMeasurements
from runtime import memprofile

# Datasheet dense peaks by device name, for GPUs; on CPU the best measured GEMM is the peak.
GPU_PEAKS = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "V100": 125e12}
# Every figure is the median of this many timings; their (max - min) / median is its spread.
REPEATS = 5
IDLE_PROBE_S = 0.5  # seconds of the idle-core probe's busy loops


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


def median_spread(samples: list) -> tuple:
    """(median, (max - min) / median) of repeated timings."""
    mid = statistics.median(samples)
    return mid, (max(samples) - min(samples)) / mid


def _repeated(fn, device, repeat: int) -> tuple:
    """(median seconds per call, spread) over REPEATS timings of `repeat` calls each."""
    return median_spread([_timed(fn, device, repeat) for _ in range(REPEATS)])


# --- the machine's load -------------------------------------------------------------------------

def _spin(seconds: float) -> float:
    """CPU time over wall time of a busy loop: about 1 on a free core."""
    wall, cpu = time.perf_counter(), time.process_time()
    while time.perf_counter() - wall < seconds:
        pass
    return (time.process_time() - cpu) / (time.perf_counter() - wall)


def idle_core_share(cores: int, seconds: float = IDLE_PROBE_S) -> float:
    """The mean CPU share of `cores` busy loops run at once, one process each."""
    with multiprocessing.get_context("fork").Pool(cores) as pool:
        return sum(pool.map(_spin, [seconds] * cores)) / cores


def machine_load(cores: int, own_load: float = 0.0, core_share=None) -> MachineLoad:
    return MachineLoad(loadavg_1min=float(os.getloadavg()[0]), own_load=float(own_load),
                       host_cpus=os.cpu_count() or 1, cores=cores, core_share=core_share)


def profile_cores(ranks: int, cuda: bool) -> int:
    """Cores the measuring keeps busy: all this process may use on CPU (its GEMMs use them
    all), one per rank on GPUs (each rank's host thread)."""
    usable = len(os.sched_getaffinity(0))
    return min(ranks, usable) if cuda else usable


def _gemm_shapes(device) -> list:
    hs = (1024, 2048, 4096, 8192) if device.type == "cuda" else (128, 256, 512)
    tokens = 8192 if device.type == "cuda" else 512
    return [(tokens, h, k * h) for h in hs for k in (1, 3, 4)] + \
        [(tokens, 4 * h, h) for h in hs]


def measure_gemms(device, dtype, share: float) -> tuple:
    """([(m, n, k, FLOP/s)] for out[m, n] = a[m, k] @ b[k, n], largest spread); `share` scales
    a CPU rate to one of several processes sharing the cores."""
    rows, spreads = [], []
    shapes = _gemm_shapes(device)
    for i, (m, k, n) in enumerate(shapes):
        a = torch.randn(m, k, device=device, dtype=dtype)
        b = torch.randn(k, n, device=device, dtype=dtype)
        seconds, spread = _repeated(lambda a=a, b=b: a @ b, device,
                                    10 if device.type == "cuda" else 3)
        rate = 2 * m * n * k / seconds * share
        rows.append((m, n, k, rate))
        spreads.append(spread)
        _log(f"[gemm {i + 1}/{len(shapes)}] {m}x{k}x{n}: {rate / 1e12:.3f} TFLOP/s "
             f"(spread {100 * spread:.0f}%)")
    return rows, max(spreads)


def measure_copy(device, share: float) -> tuple:
    """(read + write bytes/s, spread)."""
    x = torch.empty(2**26 if device.type == "cuda" else 2**23, device=device)
    y = torch.empty_like(x)
    seconds, spread = _repeated(lambda: y.copy_(x), device, 10)
    rate = 2 * x.numel() * x.element_size() / seconds * share
    _log(f"[copy] {rate / 1e9:.1f} GB/s (read + write, spread {100 * spread:.0f}%)")
    return rate, spread


ADAM_PROBE_PARAMS = 2**23  # 8M fp32 parameters: 128 MiB of states, past every cache


def measure_host_offload(device) -> dict:
    """The host terms of CPU offload: physical memory, host-to-device copy bandwidth (pinned
    CPU -> GPU; on CPU ranks a memcpy, since host and device are one memory) and the AdamW
    update rate of the CPU on all its cores."""
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    n = 2**26 if device.type == "cuda" else 2**23
    src = torch.empty(n, pin_memory=device.type == "cuda")
    dst = torch.empty(n, device=device)
    seconds, _ = _repeated(lambda: dst.copy_(src, non_blocking=device.type == "cuda"),
                           device, 10)
    h2d = n * src.element_size() / seconds
    threads = torch.get_num_threads()
    torch.set_num_threads(os.cpu_count() or 1)
    p = torch.nn.Parameter(torch.zeros(ADAM_PROBE_PARAMS))
    p.grad = torch.ones_like(p)
    opt = torch.optim.AdamW([p], foreach=True)
    opt.step()
    adam_s, _ = _repeated(opt.step, torch.device("cpu"), 5)
    torch.set_num_threads(threads)
    out = {"memory_bytes_per_node": memory, "h2d_bandwidth_bytes_per_s": h2d,
           "cpu_adam_params_per_s": ADAM_PROBE_PARAMS / adam_s}
    _log(f"[host] {memory / 2**30:.1f} GiB, host-to-device "
         f"{'copy' if device.type == 'cuda' else 'memcpy'} {h2d / 1e9:.1f} GB/s, CPU AdamW "
         f"{out['cpu_adam_params_per_s'] / 1e9:.3f}e9 parameters/s")
    return out


# One small llama layer: its FLOPs and bytes are negligible, so its time is host work.
PROBE: dict[str, Any] = dict(name="host-probe", arch="llama", num_layers=1, hidden_size=64,
                             num_heads=8, num_kv_heads=8, ffn_hidden_size=128, vocab_size=256,
                             max_seq_len=16, tie_embeddings=False, linear_bias=False)
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


def measure_layer_host(tp: int, device) -> tuple:
    """([forward_s, backward_s], spread, CPU share) of the probe layer with every rank busy.

    At least PROBE_SECONDS of passes, so that the time a rank waits for a core (CPU ranks share
    the host's cores, and a scheduler slice is milliseconds long) counts, split into REPEATS
    chunks: the median of the chunks' means.  CPU share: this process's CPU time over the wall
    time of the passes."""
    block, x, (cos, sin) = _probe_block(tp, device)
    for _ in range(3):  # warm-up passes fill the dispatch caches
        block(x, cos, sin).sum().backward()
    _sync(device)
    start = time.perf_counter()
    block(x, cos, sin).sum().backward()
    _sync(device)
    chunk = math.ceil(_agreed_passes(time.perf_counter() - start, device) / REPEATS)
    fwds, bwds = [], []
    wall, cpu = time.perf_counter(), time.process_time()
    for _ in range(REPEATS):
        fwd = bwd = 0.0
        for _ in range(chunk):
            start = time.perf_counter()
            y = block(x, cos, sin).sum()
            _sync(device)
            mid = time.perf_counter()
            y.backward()
            _sync(device)
            fwd, bwd = fwd + mid - start, bwd + time.perf_counter() - mid
        fwds.append(fwd / chunk)
        bwds.append(bwd / chunk)
    share = (time.process_time() - cpu) / (time.perf_counter() - wall)
    (fwd, f_spread), (bwd, b_spread) = median_spread(fwds), median_spread(bwds)
    return [fwd, bwd], max(f_spread, b_spread), share


def probe_degrees(ranks: int) -> list:
    """Powers of two that divide the ranks and the probe's heads."""
    heads = PROBE["num_heads"]
    return [d for d in range(1, ranks + 1)
            if ranks % d == 0 and heads % d == 0 and d & (d - 1) == 0]


def _log_host(tp: int, host: list, spread: float) -> None:
    _log(f"[host, layer at tp={tp}] forward {host[0] * 1e3:.1f} ms, backward "
         f"{host[1] * 1e3:.1f} ms (spread {100 * spread:.0f}%)")


def _ranks_worker(rank, ranks, port, sizes, cores, out_path):
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    torch.set_num_threads(1)
    dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=ranks)
    device = torch.device("cuda", rank) if backend == "nccl" else torch.device("cpu")
    times, spreads, group_bytes = [], [], None
    if backend == "nccl":  # the default group's first collective creates its communicator
        torch.cuda.set_device(device)
        probe = torch.ones(1, device=device)
        group_bytes = memprofile.first_collective_bytes(device, lambda: dist.all_reduce(probe))
    for size in sizes:
        t = torch.ones(size // 4, device=device)
        dist.barrier()
        seconds, spread = _repeated(lambda t=t: dist.all_reduce(t), device, 3)
        times.append(seconds)
        spreads.append(spread)
        if rank == 0:
            _log(f"[all-reduce {ranks} ranks] {size / 2**20:.0f} MiB: {seconds * 1e3:.2f} ms "
                 f"(spread {100 * spread:.0f}%)")
    host, host_spreads = {}, []
    for tp in probe_degrees(ranks):
        dist.barrier()
        host[str(tp)], spread, share = measure_layer_host(tp, device)
        host_spreads.append(spread)
        if tp == 1:  # no collectives: every rank computes all the time; their summed share
            total = torch.tensor([share], dtype=torch.float64, device=device)
            dist.all_reduce(total)  # is the cores they got
            core_share = float(total.item()) / min(ranks, cores)
        if rank == 0:
            _log_host(tp, host[str(tp)], spread)
    if rank == 0:
        with open(out_path, "w") as f:
            json.dump({"allreduce_s": times, "allreduce_spread": max(spreads),
                       "layer_host_s": host, "layer_host_spread": max(host_spreads),
                       "core_share": core_share, "comm_buffer_bytes_per_group": group_bytes}, f)
    dist.destroy_process_group()


def measure_ranks(ranks: int, cores: int, tmp_path: str) -> tuple:
    """All-reduce times at several sizes and the probe layer's host time at each TP degree,
    with all `ranks` processes running at once: (sizes, what _ranks_worker wrote)."""
    sizes = [2**20, 2**22, 2**24]
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.start_processes(_ranks_worker, args=(ranks, port, sizes, cores, tmp_path),
                       nprocs=ranks, start_method="fork")
    with open(tmp_path) as f:
        return sizes, json.load(f)


def _single_rank_host(device) -> dict:
    torch.set_num_threads(1)
    host, spread, core_share = measure_layer_host(1, device)
    _log_host(1, host, spread)
    torch.set_num_threads(os.cpu_count() or 1)
    return {"allreduce_s": [], "allreduce_spread": None, "layer_host_s": {"1": host},
            "layer_host_spread": spread, "core_share": core_share,
            "comm_buffer_bytes_per_group": None}


def measure(ranks: int, tmp_path: str, load_before: MachineLoad) -> dict:
    context_rss = memprofile.resident_bytes()  # torch imported, no tensor yet (CPU context)
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
        sizes, got = measure_ranks(ranks, load_before.cores, tmp_path)
    else:
        sizes, got = [], _single_rank_host(device)
    gemms, gemm_spread = measure_gemms(device, dtype, share)
    copy, copy_spread = measure_copy(device, share)
    host_offload = measure_host_offload(device)
    outside = memprofile.measure_outside_tensors(device, context_rss)
    if got["comm_buffer_bytes_per_group"] is not None:
        outside["comm_buffer_bytes_per_group"] = int(got["comm_buffer_bytes_per_group"])
    _log(f"[outside tensors] {outside}")
    spread = {"gemms": gemm_spread, "copy": copy_spread, "layer_host": got["layer_host_spread"]}
    if got["allreduce_spread"] is not None:
        spread["allreduce"] = got["allreduce_spread"]
    # the load average includes the profile's own processes: at most one per rank or core
    during = machine_load(load_before.cores, own_load=max(ranks, load_before.cores),
                          core_share=got["core_share"])
    _log(f"[load] during: load average {during.loadavg_1min:.2f}, the ranks got "
         f"{100 * got['core_share']:.0f}% of {during.cores} core(s)")
    return {"schema_version": PROFILE_SCHEMA_VERSION, "device_name": name,
            "host": socket.gethostname(), "ranks": ranks,
            "precision": "bf16" if dtype == torch.bfloat16 else "fp32", "peak_flops": peak,
            "gemms": gemms, "copy_bytes_per_s": copy, "memory_bytes": memory,
            "allreduce_bytes": sizes, "allreduce_s": got["allreduce_s"],
            "layer_host_s": got["layer_host_s"], "host_is_device": not cuda,
            "shared_cores": 0 if cuda else len(os.sched_getaffinity(0)),
            "outside_tensors": outside, "host_offload": host_offload,
            "repeats": REPEATS, "spread": spread, "load_before": load_before.to_dict(),
            "load_during": during.to_dict()}


def check_load_before(ranks: int, cuda: bool) -> tuple:
    """(MachineLoad, busy reason or None) of the machine before anything is measured: its load
    average and an idle-core probe on the cores the measuring will use."""
    cores = profile_cores(ranks, cuda)
    share = idle_core_share(cores)
    load = machine_load(cores, core_share=share)
    _log(f"[load] before: load average {load.loadavg_1min:.2f} on {load.host_cpus} cores, "
         f"idle-core probe {100 * share:.0f}% of {cores} core(s)")
    return load, load.busy_reason()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m runtime.hwprofile")
    parser.add_argument("--out", required=True)
    parser.add_argument("--ranks", type=int, required=True)
    parser.add_argument("--allow-busy", action="store_true",
                        help="measure even when other work holds the cores")
    args = parser.parse_args(argv)
    if args.ranks < 1:
        print(f"hwprofile: error: --ranks must be >= 1, got {args.ranks}", file=sys.stderr)
        return 2
    load, busy = check_load_before(args.ranks, torch.cuda.is_available())
    if busy and not args.allow_busy:
        with open(args.out + ".refused", "w") as f:
            f.write(busy)
        return 3
    result = measure(args.ranks, args.out + ".allreduce", load)
    if os.path.exists(args.out + ".allreduce"):
        os.remove(args.out + ".allreduce")
    # the typed file planner/calibration/profile_fit.py reads: checked here, where it is made
    ProfileMeasurements.from_dict(result).save(args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
