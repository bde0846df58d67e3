"""Long sequences: Llama 3 405B's long-context stage (Dubey et al. 2024, Table 4: 16,384 H100,
sequence 131,072, TP 8, CP 16, PP 16, DP 8, 16 sequences per DP rank = 16M tokens per batch,
380 TFLOP/s per GPU, 38% BF16 MFU) estimated in its published layout and searched.

The paper does not give the recompute policy, the virtual stages or the ZeRO stage; the
published layout is estimated under the Megatron engine with ZeRO-1 (the distributed optimizer),
all-gather CP (Llama 3's choice), sequence parallelism, one sequence per micro-batch, and the
combinations of schedule and recompute below (126 layers: the first and last chunk one layer
short, as Llama 3 balances its stages, Sec. 3.3.2).  Prints a markdown table (the README's
"Long sequences" section)."""

from planner.cost.estimate import estimate
from planner.hardware import load_cluster
from planner.job import Job
from planner.plan import Layout, Plan
from planner.presets import load_model
from planner.report import layout_summary
from planner.search.ranking import SearchOptions, search

PUBLISHED_TFLOPS = 380  # Dubey et al. 2024, Table 4, the CP = 16 row
SEQ, BATCH, NODES = 131_072, 128, 2048


def _split(num_layers: int, chunks: int) -> tuple:
    """The first and last chunk one layer short of the others (126 = 8 x 14 + 2 x 7)."""
    inner = (num_layers + 2) // chunks
    return (inner - 1,) + (inner,) * (chunks - 2) + (inner - 1,)


def published_layouts(model) -> list:
    base = dict(dp=8, tp=8, pp=16, cp=16, cp_comm="allgather", sequence_parallel=True,
                zero_stage=1, micro_batch=1, num_microbatches=16)
    out = []
    for schedule, v in (("1f1b", 1), ("interleaved_1f1b", 2), ("interleaved_1f1b", 4)):
        split = _split(model.num_layers, 16 * v) if model.num_layers % (16 * v) else ()
        for recompute in ("none", "selective", "full"):
            out.append(Layout(**base, schedule=schedule, virtual_stages=v, recompute=recompute,
                              layers_per_stage=split))
    return out


def _row(label, est) -> str:
    mem = est.memory.total_bytes / 2**30
    fit = "fits" if est.fits else "does not fit"
    return (f"| {label} | {layout_summary(est.plan.layout)} | {mem:.1f} GiB ({fit}) | "
            f"{est.time.cp_comm_s:.2f} s | {100 * est.time.bubble_fraction:.0f}% | "
            f"{est.step_s:.2f} s | {est.tflops_per_gpu:.0f} | {100 * est.mfu:.1f}% |")


def main() -> None:
    model = load_model("llama3-405b")
    cluster = load_cluster("h100-80g", NODES)
    job = Job(global_batch=BATCH, seq_len=SEQ, engine="megatron")
    print("| plan | layout | memory per GPU | exposed CP | bubble | step | TFLOP/s per GPU "
          "| MFU |")
    print("|---|---|---:|---:|---:|---:|---:|---:|")
    print(f"| published (Table 4) | tp8 cp16 pp16 dp8 | - | - | - | - | {PUBLISHED_TFLOPS} "
          f"| 38% |")
    for lay in published_layouts(model):
        print(_row("published layout, estimated", estimate(
            Plan(model=model, cluster=cluster, job=job, layout=lay))))
    result = search(model, cluster, job, SearchOptions(top=3))
    for i, c in enumerate(result.ranked, 1):
        print(_row(f"our best #{i}", c.estimate))
    print(f"\nsearch: {result.num_considered:,} layouts considered, {result.num_fit:,} fit "
          f"(its time: benchmarks/search_speed.py)")


if __name__ == "__main__":
    main()
