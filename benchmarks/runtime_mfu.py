"""Training throughput and MFU of the runtime on one GPU: a Llama-style 1.1B (22 layers, hidden
2048, 32 heads, 4 kv-heads, FFN 5632, vocab 32000, seq 2048, bf16 autocast with fp32 master
weights, SDPA flash attention, torch.compile per block, AdamW) through runtime.engine, exactly
as `runtime.train` runs it.

Model FLOPs per token = 6 * (all parameters) + 12 * layers * hidden * seq (the attention scores;
Narayanan et al. 2021, Eq. 3, and PaLM's MFU definition, Chowdhery et al. 2022, App. B),
against 989e12 dense bf16 FLOP/s per H100 SXM (NVIDIA H100 datasheet).

    python benchmarks/runtime_mfu.py [--micro-batch 8] [--steps 10] [--no-compile]
"""

import argparse
import sys
import time

PEAK_FLOPS = 989e12
SPEC = dict(name="llama-1.1b", arch="llama", num_layers=22, hidden_size=2048, num_heads=32,
            num_kv_heads=4, ffn_hidden_size=5632, vocab_size=32000, max_seq_len=2048,
            tie_embeddings=False, linear_bias=False)


def _plan(micro_batch: int, recompute: str):
    from planner.hardware import load_cluster
    from planner.job import Job
    from planner.plan import Layout, Plan
    from planner.spec import ModelSpec
    return Plan(model=ModelSpec(**SPEC), cluster=load_cluster("h100-80g", 1, num_gpus=1),
                job=Job(global_batch=micro_batch, seq_len=2048, precision="bf16"),
                layout=Layout(micro_batch=micro_batch, recompute=recompute))


def model_flops_per_token(spec, params: int, seq: int) -> float:
    return 6 * params + 12 * spec.num_layers * spec.hidden_size * seq


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--micro-batch", type=int, default=8)
    p.add_argument("--steps", type=int, default=10, help="timed steps after 3 warm-up steps")
    p.add_argument("--recompute", default="none", choices=("none", "selective", "full"))
    p.add_argument("--no-compile", action="store_true")
    args = p.parse_args()
    import torch
    if not torch.cuda.is_available():
        print("runtime_mfu: needs a CUDA GPU and found none; nothing measured", file=sys.stderr)
        return 1
    from planner.cost.params import count_parameters
    from runtime.data import TokenData, load_tokens
    from runtime.engine import Engine
    from runtime.mesh import init_distributed
    torch.backends.cuda.matmul.allow_tf32 = True
    plan = _plan(args.micro_batch, args.recompute)
    ctx = init_distributed(plan.layout)
    engine = Engine(plan, ctx, compile_blocks=not args.no_compile)
    data = TokenData(load_tokens(vocab_size=32000), 2048, plan.layout, 0)
    times = []
    for step in range(3 + args.steps):
        x, y = (t.to(ctx.device) for t in data.batch(step))
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        loss = engine.train_step(x, y)
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    dt = sorted(times[3:])[len(times[3:]) // 2]
    tokens = args.micro_batch * 2048
    params = count_parameters(plan.model)
    mfu = model_flops_per_token(plan.model, params, 2048) * tokens / dt / PEAK_FLOPS
    print(f"llama-1.1b ({params / 1e9:.3f}B params) micro-batch {args.micro_batch} seq 2048 "
          f"bf16 on {torch.cuda.get_device_name()}: step {dt * 1e3:.1f} ms, "
          f"{tokens / dt:,.0f} tokens/s, MFU {100 * mfu:.1f}% (final loss {loss:.3f}, "
          f"peak memory {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
