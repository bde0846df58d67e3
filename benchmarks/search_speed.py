"""Search speed: wall time and layouts evaluated per second of `planner suggest`'s search for
large cases (targets: under 1 s and under 3 s on a 2-core machine), two of them MoE.

  1T GPT (128 layers, hidden 25600, 160 heads, seq 2048, vocab 51200; Korthikanti et al. 2022,
      Table 3) on 3072 A100-80GB (384 nodes), global batch 3072
  Llama-3 405B (Dubey et al. 2024) on 16,384 H100-80GB (2048 nodes), 16M-token batches:
      global batch 2048 x seq 8192
  the same at 131,072 tokens (its long-context stage), global batch 128: context parallelism
      searched (cp and, under megatron, its three flavours)

Each run builds a fresh cluster so no cache from a previous run helps; the figure is the median
of the runs (the first, cold, run is printed too), with the process CPU time beside the wall time
(on a shared machine the wall time also counts other processes' turns on the cores).

With --against CHECKOUT the same cases also run, in fresh processes taking turns, on the planner
of another checkout (e.g. a git worktree of an older commit), and the ratio of median CPU times
is printed: the same machine, the same run.
Usage: python benchmarks/search_speed.py [repeats] [--against CHECKOUT]"""

import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

from planner.hardware import load_cluster
from planner.job import Job
from planner.presets import load_model
from planner.report import layout_summary
from planner.spec import ModelSpec

try:
    from planner.search.ranking import SearchOptions, search
except ImportError:  # a checkout from before the planner's sub-packages
    from planner.search import SearchOptions, search

GPT_1T = ModelSpec(name="gpt-1t", arch="gpt", num_layers=128, hidden_size=25600, num_heads=160,
                   num_kv_heads=160, ffn_hidden_size=4 * 25600, vocab_size=51200,
                   max_seq_len=2048, tie_embeddings=True, linear_bias=True, dropout=0.1)

CASES = [  # name, model, profile, nodes, global batch, seq len, target seconds
    ("1T GPT, 3072 x A100-80G", GPT_1T, "a100-80g", 384, 3072, 2048, 1.0),
    ("Llama-3 405B, 16384 x H100", load_model("llama3-405b"), "h100-80g", 2048, 2048, 8192, 3.0),
    # the long-context stage (Dubey et al. 2024, Table 4): the search adds cp and its flavours
    ("Llama-3 405B 131k tokens, 16384 x H100", load_model("llama3-405b"), "h100-80g", 2048, 128,
     131072, 3.0),
    # mixture of experts (searching ep and etp too): Mixtral on 8 DGX H100, DeepSeek-V3 on 1024
    # H100 with its 15.36M-token batches (DeepSeek-AI 2024, Sec. 4.2: 3840 x 4096 at the end)
    ("Mixtral-8x7B, 64 x H100", load_model("mixtral-8x7b"), "h100-80g", 8, 1024, 4096, 3.0),
    ("DeepSeek-V3, 1024 x H100", load_model("deepseek-v3"), "h100-80g", 128, 3840, 4096, 3.0),
]
# the torch engine's runtime model builds no MoE block yet (rule runtime_model)
ENGINES = {"Mixtral-8x7B, 64 x H100": ("megatron",), "DeepSeek-V3, 1024 x H100": ("megatron",)}


def run_case(model, profile, nodes, gb, seq, engine, repeats) -> list:
    out = []
    for _ in range(repeats):
        cluster = load_cluster(profile, nodes)
        job = Job(global_batch=gb, seq_len=seq, engine=engine)
        t0, c0 = time.perf_counter(), time.process_time()
        res = search(model, cluster, job, SearchOptions(top=10))
        out.append((time.perf_counter() - t0, time.process_time() - c0, res))
    return out


def main(repeats: int = 3) -> None:
    print("| case | engine | layouts considered | fit | first run s | median wall s | median CPU s "
          "| layouts/s (wall) | target | best plan | tokens/s |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---|---|---:|")
    for name, model, profile, nodes, gb, seq, target in CASES:
        for engine in ENGINES.get(name, ("torch", "megatron")):
            runs = run_case(model, profile, nodes, gb, seq, engine, repeats)
            times = [t for t, _, _ in runs]
            res = runs[-1][2]
            med, cpu = statistics.median(times), statistics.median(c for _, c, _ in runs)
            best = res.best
            print(f"| {name} | {engine} | {res.num_considered:,} | {res.num_fit:,} | "
                  f"{times[0]:.2f} | {med:.2f} | {cpu:.2f} | {res.num_considered / med:,.0f} | "
                  f"< {target:g} s | {layout_summary(best.layout)} | {best.tokens_per_s:,.0f} |")


def _child_cpu_s(checkout: Path, case: int, engine: str) -> float:
    """CPU seconds of one cold search in a fresh process on `checkout`'s planner."""
    env = {**os.environ, "PYTHONPATH": str(checkout)}
    out = subprocess.run([sys.executable, __file__, "--child", str(case), engine], env=env,
                         capture_output=True, text=True, check=True, cwd=checkout)
    return float(out.stdout.split()[-1])


def against(other: Path, repeats: int) -> None:
    here = Path(__file__).resolve().parents[1]
    print(f"\n| case | engine | CPU s here | CPU s {other} | ratio here / there |")
    print("|---|---|---:|---:|---:|")
    for i, (name, *_rest) in enumerate(CASES):
        for engine in ENGINES.get(name, ("torch", "megatron")):
            mine, theirs = [], []
            for _ in range(repeats):  # taking turns, so both see the same load
                mine.append(_child_cpu_s(here, i, engine))
                theirs.append(_child_cpu_s(other, i, engine))
            a, b = statistics.median(mine), statistics.median(theirs)
            print(f"| {name} | {engine} | {a:.3f} | {b:.3f} | {a / b:.2f} |")


def _child(case: int, engine: str) -> None:
    _, model, profile, nodes, gb, seq, _ = CASES[case]
    (_, cpu, _), = run_case(model, profile, nodes, gb, seq, engine, 1)
    print(cpu)


if __name__ == "__main__":
    args = sys.argv[1:]
    if args[:1] == ["--child"]:
        _child(int(args[1]), args[2])
        sys.exit(0)
    other = Path(args[args.index("--against") + 1]).resolve() if "--against" in args else None
    numbers = [a for a in args if a.isdigit()]
    reps = int(numbers[0]) if numbers else 3
    main(reps)
    if other:
        against(other, reps)
