"""Predicted step time and MFU of the `torch` engine (eager PyTorch) before and after its kernels
were timed op by op from the runtime's op census (planner/cost/ops.py), against the published
plain-PyTorch runs of the shared anchors (section 6: one H100 80GB, PyTorch 2.11, bf16).

"before" is the same planner with the engine trait `kernels_from_op_census` off, i.e. the
Megatron-LM-style fused-kernel model the torch engine used to share.  MFU here is the anchors'
definition, (6 N + 12 L h s) tokens / step time / peak (989 TFLOP/s H100, 312 A100).
Prints the markdown table of the README's "How accurate is it? - PyTorch engine".

    python benchmarks/torch_engine_mfu.py"""

import contextlib
import dataclasses

from planner import engines
from planner.cost.estimate import estimate
from planner.cost.params import count_parameters
from planner.hardware import load_cluster
from planner.job import Job
from planner.plan import Layout, Plan
from planner.presets import MODEL_PRESETS
from planner.spec import ModelSpec

# shared anchors section 6: 22 layers, hidden 2048, 32 heads, 4 kv heads, FFN 5632, vocab 32000
LLAMA_1B = ModelSpec(name="llama-1.1b", arch="llama", num_layers=22, hidden_size=2048,
                     num_heads=32, num_kv_heads=4, ffn_hidden_size=5632, vocab_size=32000,
                     max_seq_len=2048, tie_embeddings=False, linear_bias=False)
# (label, model, profile, GPUs, seq, micro-batch, layout, measured eager MFU, note)
RUNS = [
    ("1.1B, 1 H100, mb 4", LLAMA_1B, "h100-80g", 1, 2048, 4, {}, 0.378,
     "compiled: 50.4%"),
    ("1.1B, 1 H100, mb 8", LLAMA_1B, "h100-80g", 1, 2048, 8, {}, 0.404, "compiled: 53.6%"),
    ("llama3-8b, 1 H100, seq 8192, mb 1", MODEL_PRESETS["llama3-8b"], "h100-80g", 1, 8192, 1,
     {}, None, "does not fit in 80 GB (time only)"),
    ("llama2-7b, 8 A100, FSDP (ZeRO-3), seq 4096", MODEL_PRESETS["llama2-7b"], "a100-80g", 8,
     4096, 1, {"dp": 8, "zero_stage": 3}, None, ""),
    ("llama3-8b, 8 A100, FSDP (ZeRO-3), seq 8192", MODEL_PRESETS["llama3-8b"], "a100-80g", 8,
     8192, 1, {"dp": 8, "zero_stage": 3}, None, ""),
    ("llama2-7b, 8 H100, FSDP (ZeRO-3), seq 4096", MODEL_PRESETS["llama2-7b"], "h100-80g", 8,
     4096, 1, {"dp": 8, "zero_stage": 3}, None, ""),
    ("llama3-8b, 8 H100, FSDP (ZeRO-3), seq 8192", MODEL_PRESETS["llama3-8b"], "h100-80g", 8,
     8192, 1, {"dp": 8, "zero_stage": 3}, None, ""),
]


@contextlib.contextmanager
def fused_kernel_model():
    """The torch engine with its kernels timed as before (Megatron-LM-style fused kernels)."""
    saved = engines.ENGINES["torch"]
    engines.ENGINES["torch"] = dataclasses.replace(saved, kernels_from_op_census=False)
    try:
        yield
    finally:
        engines.ENGINES["torch"] = saved


def _mfu(plan: Plan, step_s: float) -> float:
    spec, job = plan.model, plan.job
    per_token = 6 * count_parameters(spec) + 12 * spec.num_layers * spec.hidden_size * job.seq_len
    peak = plan.cluster.profile.gpu.peak_flops[job.precision] * plan.cluster.world_size
    return per_token * job.tokens_per_step / step_s / peak


def main() -> None:
    print("| run | step s before | step s after | MFU before | MFU after | measured (eager) | "
          "notes |")
    print("|---|---:|---:|---:|---:|---:|---|")
    for label, spec, profile, gpus, seq, mb, layout, measured, note in RUNS:
        plan = Plan(model=spec, cluster=load_cluster(profile, 1, num_gpus=gpus),
                    job=Job(global_batch=mb * gpus, seq_len=seq),
                    layout=Layout(micro_batch=mb, **layout))
        with fused_kernel_model():
            before = estimate(plan).step_s
        after = estimate(plan).step_s
        seen = f"{100 * measured:.1f}%" if measured else "-"
        print(f"| {label} | {before:.3f} | {after:.3f} | {100 * _mfu(plan, before):.1f}% | "
              f"{100 * _mfu(plan, after):.1f}% | {seen} | {note} |")


if __name__ == "__main__":
    main()
