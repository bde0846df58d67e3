"""Generators of the README's computed figure blocks: deterministic predictions of the cost
model, each produced by the benchmark script or CLI command the README names.  Fast (a few
seconds together), so tests/test_readme_figures.py recomputes them all."""

import contextlib
import io

from benchmarks.readme_figures import Block

# the README's `planner estimate` example: llama2-7b on one DGX A100, dp 4 x tp 2 with SP, ZeRO-1
ESTIMATE_ARGS = ["estimate", "--model", "llama2-7b", "--cluster", "a100-80g", "--nodes", "1",
                 "--global-batch", "64", "--seq-len", "4096", "--dp", "4", "--tp", "2", "--sp",
                 "--zero", "1", "--micro-batch", "2"]
# the README's nothing-fits example: llama2-70b on 7 of 8 GPUs
NOTHING_FITS_ARGS = ["suggest", "--model", "llama2-70b", "--cluster", "a100-80g", "--gpus", "7",
                     "--global-batch", "7", "--seq-len", "4096"]


def printed(main, *args, stderr: bool = False) -> str:
    """What main(*args) prints on standard output (with stderr=True, standard error too: a CLI
    refusal's one line); progress on standard error passes through otherwise."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out), \
            contextlib.redirect_stderr(out) if stderr else contextlib.nullcontext():
        main(*args)
    return out.getvalue().rstrip("\n")


def published_runs() -> str:
    from benchmarks import published_runs as script
    return printed(script.main)


def korthikanti_search() -> str:
    from benchmarks import korthikanti_search as script
    return printed(script.main)


def torch_engine_mfu() -> str:
    from benchmarks import torch_engine_mfu as script
    return printed(script.main)


def fp8_memory() -> str:
    from benchmarks import fp8_memory as script
    return printed(script.main)


def published_fp8() -> str:
    from benchmarks import published_fp8 as script
    return printed(script.main)


def simulate_agreement() -> str:
    from benchmarks import simulate_agreement as script
    return printed(script.main)


def estimate_example() -> str:
    """The header and memory breakdown of `planner estimate`, then its step and throughput."""
    from planner.cli import main
    lines = printed(main, ESTIMATE_ARGS).splitlines()
    memory = lines[:lines.index(next(ln for ln in lines if ln.startswith("Step time")))]
    step = next(ln for ln in lines if ln.strip().startswith("step "))
    throughput = next(ln for ln in lines if ln.startswith("Throughput"))
    shown = memory + [lines[len(memory)], "  ...", step, throughput]
    return "\n".join(["```", *shown, "```"])


def nothing_fits_example() -> str:
    from planner.cli import main
    error = printed(main, NOTHING_FITS_ARGS, stderr=True).splitlines()[-1]
    return "\n".join(["```", "$ planner " + " ".join(NOTHING_FITS_ARGS), error, "```"])


def llama70b_two_nodes() -> str:
    """`planner suggest`'s best plan for Llama-2 70B on two DGX A100 nodes, batch 512 x 4096
    (the cost model's "ZeRO-2/3 under pipelining" paragraph)."""
    from planner.hardware import load_cluster
    from planner.job import Job
    from planner.presets import load_model
    from planner.search.ranking import SearchOptions, search
    best = search(load_model("llama2-70b"), load_cluster("a100-80g", 2),
                  Job(global_batch=512, seq_len=4096), SearchOptions(top=1)).best
    lay = best.layout
    axes = " × ".join(f"{name} {n}" for name, n in (("dp", lay.dp), ("tp", lay.tp), ("pp", lay.pp))
                      if n > 1)
    recompute = "no" if lay.recompute == "none" else lay.recompute
    return (f"{axes} ZeRO-{lay.zero_stage} with {recompute} recompute ({best.step_s:.1f} s per "
            f"step, {best.total_bytes / 2**30:.1f} GiB per GPU)")


def lora_memory() -> str:
    from benchmarks import lora_memory as script
    return printed(script.main)


COMPUTED = [
    Block("estimate-example", "computed", estimate_example, "`planner " +
          " ".join(ESTIMATE_ARGS) + "`"),
    Block("nothing-fits-example", "computed", nothing_fits_example, "the command shown"),
    Block("published-runs", "computed", published_runs, "`python benchmarks/published_runs.py`"),
    Block("korthikanti-search", "computed", korthikanti_search,
          "`python benchmarks/korthikanti_search.py`"),
    Block("simulate-agreement", "computed", simulate_agreement,
          "`python benchmarks/simulate_agreement.py`"),
    Block("fp8-memory", "computed", fp8_memory, "`python -m benchmarks.fp8_memory`"),
    Block("fp8-published", "computed", published_fp8, "`python -m benchmarks.published_fp8`"),
    Block("torch-engine-mfu", "computed", torch_engine_mfu,
          "`python benchmarks/torch_engine_mfu.py`"),
    Block("lora-memory", "computed", lora_memory, "`python benchmarks/lora_memory.py`"),
    Block("llama70b-two-nodes", "computed", llama70b_two_nodes,
          "`planner suggest --model llama2-70b --cluster a100-80g --nodes 2 --global-batch 512 "
          "--seq-len 4096`"),
]
