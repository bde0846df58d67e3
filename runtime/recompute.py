"""torchtitan's op-level selective activation checkpointing (torchtitan/models/llama3/infra/
parallelize.py, `_apply_ac_to_transformer_block`, mode "op"): a block runs under a non-reentrant
checkpoint whose policy saves the outputs of the ops in OP_POLICY_SAVE_LIST - except every second
mm, counted per forward - and recomputes everything else in backward (so the TP all-gathers and
all-reduces of a recomputed block run again; its reduce-scatters are saved).

The cached outputs live in the checkpoint's own storage, out of reach of saved_tensors_hooks; a
measuring ActivationCounter (runtime/measure.py) registers itself as OBSERVER and is told each
cached output, and when the block's recompute context (and with it the cache) is freed."""

import weakref
from collections import defaultdict

import torch
from torch.utils.checkpoint import CheckpointPolicy, create_selective_checkpoint_contexts

_ops = torch.ops.aten
# torchtitan's _save_list; plus the CPU flash kernel, CPU's counterpart of the CUDA flash kernel
# (a CPU run saves what a CUDA run saves; planner/cost/ops.py OP_POLICY_SAVE_LIST)
OP_POLICY_SAVE_LIST = {
    _ops.mm.default,
    _ops._scaled_dot_product_efficient_attention.default,
    _ops._scaled_dot_product_flash_attention.default,
    _ops._scaled_dot_product_flash_attention_for_cpu.default,
    torch.ops._c10d_functional.reduce_scatter_tensor.default,
    _ops.max.default,
}

OBSERVER: list = []  # the ActivationCounter measuring this step, if any


def op_policy_contexts():
    """The checkpoint's context_fn: a fresh mm counter per block call (torchtitan's `meta`)."""
    meta: defaultdict[str, int] = defaultdict(int)
    counted = []

    def policy(ctx, func, *args, **kwargs):
        mode = "recompute" if ctx.is_recompute else "forward"
        if func == _ops.mm.default:
            meta[f"{mode}_mm_count"] += 1
        save = func in OP_POLICY_SAVE_LIST and not (
            func == _ops.mm.default and meta[f"{mode}_mm_count"] % 2 == 0)
        if save and not ctx.is_recompute and OBSERVER:
            counted.extend(OBSERVER[0].count_cached(ctx.op_output))
        return CheckpointPolicy.MUST_SAVE if save else CheckpointPolicy.PREFER_RECOMPUTE

    forward_ctx, recompute_ctx = create_selective_checkpoint_contexts(policy)
    if OBSERVER:
        weakref.finalize(recompute_ctx, OBSERVER[0].release_cached, counted)
    return forward_ctx, recompute_ctx
