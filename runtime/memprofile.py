"""Measure the memory outside tensors for `planner profile` (the hardware profile's
context_bytes, blas_workspace_bytes, comm_buffer_bytes_per_group, allocator_fragmentation;
planner/cost/outside.py uses them).

On a GPU: the device memory in use that the caching allocator does not hold
(torch.cuda.mem_get_info against torch.cuda.memory_reserved) once kernels are loaded; the
cuBLAS workspace as the allocator bytes the first GEMM on a cleared workspace adds beyond its
output; a communicator's buffers as the device memory its first all-reduce takes; the
allocator's reserved-but-free bytes after training steps of a small transformer, over the
transient bytes of a step.  These GPU paths have not been run on hardware by this project's
tests (no GPU where they run); they only read counters torch documents.  On CPU ranks there is
no CUDA context: the context is the process's resident set before any tensor, and the other
items are 0 (see hardware_profiles/cpu.json)."""

import os

import torch

PAGE_BYTES = os.sysconf("SC_PAGE_SIZE")


def resident_bytes() -> int:
    """This process's resident set (Linux /proc/self/statm, second field, in pages)."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * PAGE_BYTES


def device_used_outside_allocator(device) -> int:
    """Device bytes in use that the caching allocator does not hold: the CUDA context (and
    anything else on the GPU, so measure on an idle one)."""
    free, total = torch.cuda.mem_get_info(device)
    return int(total - free - torch.cuda.memory_reserved(device))


def blas_workspace_bytes(device):
    """Allocator bytes a GEMM adds beyond its output once the cuBLAS workspaces are cleared;
    None where this torch cannot clear them (the item is then not measured)."""
    if not hasattr(torch._C, "_cuda_clearCublasWorkspaces"):
        return None
    a = torch.randn(256, 256, device=device, dtype=torch.bfloat16)
    torch.cuda.synchronize(device)
    torch._C._cuda_clearCublasWorkspaces()
    before = torch.cuda.memory_allocated(device)
    out = a @ a
    torch.cuda.synchronize(device)
    return max(0, int(torch.cuda.memory_allocated(device) - before
                      - out.numel() * out.element_size()))


def first_collective_bytes(device, run) -> int:
    """Device bytes the first collective of a new communicator takes outside the allocator
    (NCCL creates the communicator and connects its rings lazily, on first use)."""
    torch.cuda.synchronize(device)
    before = device_used_outside_allocator(device)
    run()
    torch.cuda.synchronize(device)
    return max(0, device_used_outside_allocator(device) - before)


def allocator_fragmentation(device, steps: int = 4) -> float:
    """(max reserved - max allocated) / (max allocated - allocated between steps) over training
    steps of a small transformer: the reserved-but-free share of the transient bytes."""
    from planner.spec import ModelSpec
    from runtime.model import Transformer
    spec = ModelSpec(name="fragmentation-probe", arch="llama", num_layers=4, hidden_size=1024,
                     num_heads=8, num_kv_heads=8, ffn_hidden_size=4096, vocab_size=32000,
                     max_seq_len=1024, tie_embeddings=False, linear_bias=False)
    model = Transformer(spec).to(device)
    opt = torch.optim.AdamW(model.parameters())
    tokens = torch.randint(0, spec.vocab_size, (4, spec.max_seq_len), device=device)
    for step in range(steps):
        if step == 1:  # after the optimizer states exist
            torch.cuda.synchronize(device)
            torch.cuda.reset_peak_memory_stats(device)
            steady = torch.cuda.memory_allocated(device)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            logits = model(tokens)
        torch.nn.functional.cross_entropy(logits.flatten(0, 1).float(),
                                          tokens.flatten()).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    torch.cuda.synchronize(device)
    peak = torch.cuda.max_memory_allocated(device)
    reserved = torch.cuda.max_memory_reserved(device)
    return max(0.0, (reserved - peak) / max(1, peak - steady))


def measure_outside_tensors(device, context_rss: int) -> dict:
    """The outside-tensor items this process can measure (the communicator's buffers come from
    the ranks' worker); `context_rss`: the resident set taken before any tensor (CPU)."""
    if device.type != "cuda":
        return {"context_bytes": int(context_rss)}
    items = {"blas_workspace_bytes": blas_workspace_bytes(device),
             "allocator_fragmentation": float(allocator_fragmentation(device)),
             "context_bytes": device_used_outside_allocator(device)}
    return {k: v for k, v in items.items() if v is not None}
