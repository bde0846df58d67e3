"""Published configurations the golden tests evaluate (Korthikanti et al. 2022, Table 3)."""

from planner.hardware import load_cluster
from planner.job import Job
from planner.plan import Layout, Plan
from planner.spec import ModelSpec

# name, heads, hidden, layers, tp, pp, gpus, global batch, micro batch, virtual stages,
# Table 5 iteration time (s) with SP + selective recompute, and with full recompute (no SP)
KORTHIKANTI = [
    ("22B", 64, 6144, 48, 8, 1, 8, 4, 4, 1, 1.10, 1.42),
    ("175B", 96, 12288, 96, 8, 8, 64, 64, 1, 3, 13.75, 18.13),
    ("530B", 128, 20480, 105, 8, 35, 280, 280, 1, 3, 37.83, 49.05),
    ("1T", 160, 25600, 128, 8, 64, 512, 512, 1, 1, 71.49, 94.42),
]


def megatron_gpt(name, heads, hidden, layers) -> ModelSpec:
    return ModelSpec(name=name, arch="gpt", num_layers=layers, hidden_size=hidden,
                     num_heads=heads, num_kv_heads=heads, ffn_hidden_size=4 * hidden,
                     vocab_size=51200, max_seq_len=2048, tie_embeddings=True, linear_bias=True,
                     dropout=0.1)


def korthikanti_plan(row, sp=True, recompute="selective", dp=1) -> Plan:
    name, heads, hidden, layers, tp, pp, gpus, batch, micro, v = row[:10]
    job = Job(global_batch=batch * dp, seq_len=2048, precision="bf16", attention="fused",
              engine="megatron")
    layout = Layout(dp=dp, tp=tp, pp=pp, sequence_parallel=sp, micro_batch=micro,
                    num_microbatches=batch // micro, recompute=recompute,
                    schedule="interleaved_1f1b" if v > 1 else "1f1b", virtual_stages=v)
    return Plan(model=megatron_gpt(name, heads, hidden, layers),
                cluster=load_cluster("a100-80g", gpus * dp // 8), job=job, layout=layout)


def v100_baseline_plan() -> Plan:
    """Shoeybi et al. 2019: GPT-2 1.2B (hidden 1536, 16 heads, 40 layers, seq 1024) on one
    V100 at batch 8 with activation checkpointing; its code ran attention as separate scale,
    mask, softmax and dropout kernels (attention="eager")."""
    job = Job(global_batch=8, seq_len=1024, precision="fp16", attention="eager",
              engine="megatron")
    return Plan(model=megatron_gpt("1.2B", 16, 1536, 40),
                cluster=load_cluster("v100-32g", 1, num_gpus=1), job=job,
                layout=Layout(micro_batch=8, recompute="full"))
