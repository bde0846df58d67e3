"""Text and tables for the CLI and the app (presentation only: no formulas here)."""

from planner.units import fmt_bytes, fmt_seconds

MEMORY_ROWS = [
    ("weights_bytes", "weights", "parameters held by this rank (ZeRO-3/FSDP: its shard)"),
    ("gradients_bytes", "gradients", "gradient buffers (ZeRO-2/3: sharded; with pp: whole)"),
    ("optimizer_bytes", "optimizer states", "AdamW moments (+ fp32 master for 16-bit weights)"),
    ("activations_bytes", "activations", "saved for backward x in-flight micro-batches"),
    ("gathered_params_bytes", "16-bit compute copies", "FSDP gathers / autocast weight cache"),
    ("comm_buffers_bytes", "comm buffers", "TP gather output, reduce-scatter staging"),
    ("context_bytes", "runtime context", "CUDA context: driver + kernel images (profile)"),
    ("nccl_buffers_bytes", "NCCL buffers", "ring buffers per communicator, P2P per peer"),
    ("workspace_bytes", "cuBLAS workspaces", "one per (handle, stream): fwd + autograd thread"),
    ("allocator_reserve_bytes", "allocator reserve", "cached free blocks (fragmentation)"),
]
OUTSIDE_KEYS = ("context_bytes", "nccl_buffers_bytes", "workspace_bytes",
                "allocator_reserve_bytes")

TIME_ROWS = [
    ("compute_s", "compute", "forward + backward kernels (+ host time), all micro-batches"),
    ("recompute_s", "recompute", "activation recomputation"),
    ("tp_comm_s", "TP/SP communication", "exposed tensor-parallel collectives"),
    ("pp_comm_s", "PP communication", "stage-boundary sends"),
    ("cp_comm_s", "CP communication", "exposed context-parallel K/V traffic (cp > 1)"),
    ("ep_comm_s", "EP all-to-all", "expert dispatch + combine, fwd + bwd (MoE)"),
    ("bubble_s", "pipeline bubble", "fill and drain of the schedule"),
    ("dp_comm_exposed_s", "DP communication", "gradient sync not hidden by backward"),
    ("optimizer_s", "optimizer step",
     "AdamW update + clipping, gradient accumulation of micro-batches 2..m (memory-bound)"),
]


def layout_summary(layout) -> str:
    parts = [f"dp={layout.dp}", f"tp={layout.tp}", f"pp={layout.pp}"]
    if layout.cp > 1:
        parts.append(f"cp={layout.cp}({layout.cp_comm})")
    if layout.ep > 1 or layout.etp > 1:
        parts += [f"ep={layout.ep}"] + ([f"etp={layout.etp}"] if layout.etp > 1 else [])
    if layout.sequence_parallel:
        parts.append("sp")
    parts.append(f"zero={layout.zero_stage}")
    if layout.dp_shard:
        parts.append(f"shard={layout.dp_shard}")  # hybrid sharding (dp_replicate x dp_shard)
    if layout.offload != "none":
        parts.append(f"offload={layout.offload}")
    parts.append(f"mb={layout.micro_batch}x{layout.num_microbatches}")
    if layout.pp > 1:
        sched = layout.schedule
        if layout.virtual_stages > 1:
            sched += f"(v={layout.virtual_stages})"
        parts.append(sched)
    parts.append(f"recompute={layout.recompute}")
    if layout.compile:
        parts.append("compile")
    if layout.recompute_every > 1:
        parts.append(f"every={layout.recompute_every}")
    return " ".join(parts)


def _engine_lines(plan) -> list:
    """What the engine builds, where that is not the layout alone (the deepspeed engine)."""
    if plan.job.engine != "deepspeed":
        return []
    from planner.cost.deepspeed import summary
    lay = plan.layout
    return [f"engine: {summary(plan.job.precision, lay.zero_stage, lay.pp)}"]


def memory_note(key: str, note: str, mem, gpu) -> str:
    """A row's note, with the plan's counts and the profile's figures behind the outside-tensor
    items."""
    if key == "context_bytes" and gpu.host_is_device:
        return "no CUDA context on CPU ranks: the process's torch runtime (profile)"
    if key == "nccl_buffers_bytes" and gpu.host_is_device:
        return (f"gloo: no staging buffers ({mem.num_communicators} communicator(s), "
                f"{mem.num_pipeline_peers} pipeline peer(s))")
    if key == "nccl_buffers_bytes":
        return (f"{mem.num_communicators} communicator(s) x "
                f"{fmt_bytes(gpu.comm_buffer_bytes_per_group)}, {mem.num_pipeline_peers} "
                f"pipeline peer(s) (profile)")
    if key == "allocator_reserve_bytes":
        return (f"{gpu.allocator_fragmentation:.0%} of the transient tensors above "
                f"(profile)")
    return note


def outside_summary(mem) -> str:
    """One line: the memory outside tensors by item (for refusals and search explanations)."""
    return ", ".join(f"{label} {fmt_bytes(getattr(mem, key))}"
                     for key, label, _ in MEMORY_ROWS if key in OUTSIDE_KEYS)


def fp8_gain_text(gain: dict) -> str:
    """'FP8 (tensorwise) gains 1.17x on this shape ...' from Estimate.fp8_gain()."""
    saved = gain["memory_saved_bytes"]
    memory = (f"saves {fmt_bytes(saved)} per GPU" if saved >= 0
              else f"costs {fmt_bytes(-saved)} more per GPU")
    x = gain["speedup"]
    verb = f"gains {x:.2f}x" if x >= 1 else f"runs at {x:.2f}x (slower)"
    return (f"FP8 ({gain['recipe']}) {verb} on this shape over bf16 "
            f"({gain['bf16_tokens_per_s']:,.0f} tokens/s) and {memory} (MFU is against the "
            f"bf16 peak; eager torch casts are memory-bound: --compile fuses them)")


def estimate_text(est) -> str:
    """The readable breakdown `planner estimate` prints."""
    plan, mem, t = est.plan, est.memory, est.time
    lines = [f"{plan.model.name} on {plan.cluster.world_size} x {plan.cluster.profile.gpu.name} "
             f"({plan.cluster.num_nodes} node(s), profile {plan.cluster.profile.name}); "
             f"batch {plan.job.global_batch} x {plan.job.seq_len} tokens, {plan.job.precision}",
             f"layout: {layout_summary(plan.layout)}", *_engine_lines(plan), "",
             f"Memory per GPU (most loaded rank: pipeline stage {mem.pp_rank})"]
    for key, label, note in MEMORY_ROWS:
        lines.append(f"  {label:<22} {fmt_bytes(getattr(mem, key)):>12}   "
                     f"{memory_note(key, note, mem, plan.cluster.profile.gpu)}")
    verdict = "fits" if mem.total_bytes <= mem.capacity_bytes else "DOES NOT FIT"
    lines.append(f"  {'total':<22} {fmt_bytes(mem.total_bytes):>12}   of "
                 f"{fmt_bytes(mem.capacity_bytes)}: {verdict} "
                 f"({100 * mem.total_bytes / mem.capacity_bytes:.0f}%)")
    if mem.host_bytes_per_node:  # CPU offload: the node's host memory holds the rest
        lines.append(f"  {'host memory per node':<22} {fmt_bytes(mem.host_bytes_per_node):>12}"
                     f"   of {fmt_bytes(mem.host_capacity_bytes)}: "
                     f"{'fits' if mem.host_fits else 'DOES NOT FIT'} (offload "
                     f"{plan.layout.offload}: every GPU of the node offloads into it)")
    lines += ["", f"Step time (slowest pipeline stage: {t.slowest_pp_rank})"]
    for key, label, note in TIME_ROWS:
        if key == "cp_comm_s" and plan.layout.cp == 1:
            continue
        value = getattr(t, key)
        if key == "ep_comm_s" and not value:
            continue  # a dense model (or ep = etp = 1)
        share = 100 * value / t.step_s if t.step_s else 0
        lines.append(f"  {label:<22} {fmt_seconds(value):>12} {share:5.1f}%   {note}")
    lines.append(f"  {'step':<22} {fmt_seconds(t.step_s):>12}")
    lines += ["", f"Throughput: {est.tokens_per_s:,.0f} tokens/s, {est.tflops_per_gpu:.3g} "
              f"TFLOP/s per GPU, MFU {100 * est.mfu:.1f}%, HFU {100 * est.hfu:.1f}%"]
    if plan.job.fp8:
        lines.append(fp8_gain_text(est.fp8_gain()))
    if est.communication:
        lines += ["", "Communication per step (most loaded rank)"]
        for c in est.communication:
            lines.append(f"  {c.name:<22} {c.count:>6} x {fmt_bytes(c.bytes_each):>11} over "
                         f"{c.axis}({c.group_size}) {c.tier:<5} {fmt_seconds(c.time_s):>10}")
    return "\n".join(lines)


def compare_text(table) -> str:
    """The predicted-vs-measured table of planner.calibration.compare.compare, formatted."""
    fmt = table.copy()
    for col in ("predicted", "measured"):
        fmt[col] = fmt[col].map(lambda v: "" if v is None or v != v else f"{v:,.4g}")
    fmt["error_pct"] = fmt["error_pct"].map(
        lambda v: "" if v is None or v != v else f"{v:+.1f}%")
    return fmt.to_string(index=False)
