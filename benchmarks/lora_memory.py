"""Llama-3 8B fine-tuning memory, full vs LoRA (planner/lora.py): one H100 with a fixed layout,
and eight A100s with the search's best layout for each, itemised per GPU (the README's LoRA
table).  `python benchmarks/lora_memory.py`"""

from planner.cost.estimate import estimate
from planner.cost.params import count_parameters
from planner.hardware import load_cluster
from planner.job import Job
from planner.lora import LoraSpec
from planner.plan import Layout, Plan
from planner.presets import load_model
from planner.search.ranking import SearchOptions, search

SEQ = 2048
ALL_LINEAR = ("q", "k", "v", "o", "gate", "up", "down")
RUNS = [("full fine-tuning", None),
        ("LoRA r=16 q,k,v,o", LoraSpec(rank=16)),
        ("LoRA r=16 all linear", LoraSpec(rank=16, targets=ALL_LINEAR)),
        ("QLoRA-style r=16 all linear, 4-bit base", LoraSpec(rank=16, targets=ALL_LINEAR,
                                                              base_4bit=True))]


def gib(x: float) -> str:
    return f"{x / 2**30:.1f}"


def row(name: str, est, spec, job) -> str:
    m, lay = est.memory, est.plan.layout
    layout = f"dp{lay.dp} tp{lay.tp} pp{lay.pp} ZeRO-{lay.zero_stage} mb {lay.micro_batch}"
    if lay.recompute != "none":
        layout += f" {lay.recompute} recompute"
    trained = count_parameters(spec, job, trainable_only=True)
    other = m.gathered_params_bytes + m.comm_buffers_bytes + m.framework_bytes
    cells = [name, f"{trained / 1e6:,.1f} M", layout, gib(m.weights_bytes),
             gib(m.gradients_bytes), gib(m.optimizer_bytes), gib(m.activations_bytes), gib(other),
             gib(m.total_bytes), "yes" if m.fits else "**no**", f"{est.tokens_per_s:,.0f}"]
    return "| " + " | ".join(cells) + " |"


HEADER = ("| run | trained params | layout | weights | grads | optimizer | activations | "
          "other | total GiB | fits | tokens/s |\n|---|---:|---|---:|---:|---:|---:|---:|---:|"
          "---|---:|")


def one_h100(spec) -> list:
    cluster = load_cluster("h100-80g", 1, num_gpus=1)
    rows = []
    for name, lora in RUNS:
        job = Job(global_batch=8, seq_len=SEQ, lora=lora)
        plan = Plan(model=spec, cluster=cluster, job=job,
                    layout=Layout(micro_batch=1, num_microbatches=8))
        rows.append(row(name, estimate(plan), spec, job))
    return rows


def eight_a100(spec) -> list:
    cluster = load_cluster("a100-80g", 1)
    rows = []
    for name, lora in RUNS[:3]:
        job = Job(global_batch=64, seq_len=SEQ, lora=lora)
        best = search(spec, cluster, job, SearchOptions(top=1)).best
        rows.append(row(name, estimate(best.plan), spec, job))
    return rows


def main() -> None:
    spec = load_model("llama3-8b")
    print(f"One H100 80GB, batch 8 x {SEQ} tokens, bf16, micro-batch 1 (memory in GiB per GPU):")
    print()
    print(HEADER)
    print("\n".join(one_h100(spec)))
    print()
    print(f"Eight A100 80GB, batch 64 x {SEQ} tokens, bf16, the search's best layout for each:")
    print()
    print(HEADER)
    print("\n".join(eight_a100(spec)))


if __name__ == "__main__":
    main()
