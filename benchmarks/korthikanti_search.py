"""Published plan vs suggested plan for the four models of Korthikanti et al. 2022, Table 3
(Selene: 8 x A100-80GB per node; seq 2048, vocab 51200; Megatron-LM, fused softmax attention,
no flash).  The published plans use TP 8, the listed PP, sequence parallelism with selective
recompute (their best, Table 5) and interleaving v = 3 for 175B and 530B.

Both plans are evaluated by our own cost model; the suggested plan is `planner suggest`'s best
(engine megatron, default 10% memory headroom).  Prints a markdown table.
Usage: python benchmarks/korthikanti_search.py"""

from planner.cost.estimate import estimate
from planner.hardware import load_cluster
from planner.job import Job
from planner.plan import Layout, Plan
from planner.report import layout_summary
from planner.search.explain import why_better
from planner.search.ranking import Candidate, SearchOptions, search
from planner.spec import ModelSpec

# name, heads, hidden, layers, TP, PP, GPUs, global batch, micro batch, virtual stages
TABLE3 = [("22B", 64, 6144, 48, 8, 1, 8, 4, 4, 1),
          ("175B", 96, 12288, 96, 8, 8, 64, 64, 1, 3),
          ("530B", 128, 20480, 105, 8, 35, 280, 280, 1, 3),
          ("1T", 160, 25600, 128, 8, 64, 512, 512, 1, 1)]


def _model(name, heads, hidden, layers) -> ModelSpec:
    return ModelSpec(name=f"gpt-{name}", arch="gpt", num_layers=layers, hidden_size=hidden,
                     num_heads=heads, num_kv_heads=heads, ffn_hidden_size=4 * hidden,
                     vocab_size=51200, max_seq_len=2048, tie_embeddings=True, linear_bias=True,
                     dropout=0.1)


def published(row) -> Candidate:
    name, heads, hidden, layers, tp, pp, gpus, gb, mb, v = row
    model = _model(name, heads, hidden, layers)
    dp = gpus // (tp * pp)
    layout = Layout(dp=dp, tp=tp, pp=pp, sequence_parallel=True, micro_batch=mb,
                    num_microbatches=gb // (dp * mb),
                    schedule="interleaved_1f1b" if v > 1 else "1f1b", virtual_stages=v,
                    recompute="selective")
    plan = Plan(model=model, cluster=load_cluster("a100-80g", -(-gpus // 8), gpus % 8),
                job=Job(global_batch=gb, seq_len=2048, attention="fused", engine="megatron"),
                layout=layout)
    return Candidate(plan=plan, estimate=estimate(plan))


def compare(row) -> tuple:
    pub = published(row)
    res = search(pub.plan.model, pub.plan.cluster, pub.plan.job, SearchOptions(top=1))
    return pub, res


def _cells(c: Candidate) -> str:
    return (f"{layout_summary(c.layout)} | {c.step_s:.2f} | {100 * c.mfu:.1f} | "
            f"{c.total_bytes / 2**30:.1f}")


def main() -> None:
    print("| model | GPUs | published plan | step s | MFU % | GiB/GPU | suggested plan | step s | "
          "MFU % | GiB/GPU | speed-up | why |")
    print("|---|---:|---|---:|---:|---:|---|---:|---:|---:|---:|---|")
    for row in TABLE3:
        pub, res = compare(row)
        ours = res.best
        same = ours.layout == pub.layout
        why = "same plan" if same else why_better(ours, pub)
        print(f"| {row[0]} | {row[6]} | {_cells(pub)} | {_cells(ours)} | "
              f"{ours.tokens_per_s / pub.tokens_per_s:.3f}x | {why} |")
        assert ours.tokens_per_s >= pub.tokens_per_s * (1 - 1e-9) or \
            pub.total_bytes > 0.9 * pub.estimate.memory.capacity_bytes, row[0]


if __name__ == "__main__":
    main()
