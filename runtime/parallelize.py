"""Apply a layout to one model part, in a fixed order: TP (+SP, loss parallel), recompute,
then data parallelism (FSDP2 for ZeRO-2/3, DDP or FSDP2-replicate for ZeRO-0/1).

The TP plan follows Megatron-LM's split (Shoeybi et al. 2019, Sec. 3): q/k/v and the first MLP
projections column-parallel, o and the last MLP projection row-parallel, the word embedding and
the output layer vocabulary-parallel; with sequence parallelism (Korthikanti et al. 2022,
Sec. 4.2) norms and residuals run on sequence shards. Module plans as in torchtitan's Llama."""

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import Replicate, Shard
from torch.distributed.tensor.parallel import (
    ColwiseParallel,
    PrepareModuleInput,
    PrepareModuleOutput,
    RowwiseParallel,
    SequenceParallel,
    parallelize_module,
)
from torch.distributed.tensor.parallel.style import ParallelStyle

from runtime.model import Transformer, set_recompute
from runtime.moe import is_expert_param

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def _gather_input(sp: bool, extra: int = 0):
    """Sequence shards -> full sequence before a TP region (all-gather under SP)."""
    return PrepareModuleInput(input_layouts=(Shard(1),) + (None,) * extra,
                              desired_input_layouts=(Replicate(),) + (None,) * extra,
                              use_local_output=True)


def block_plan(block, sp: bool) -> dict:
    seq_out = Shard(1) if sp else Replicate()
    plan = {"attn.q": ColwiseParallel(), "attn.k": ColwiseParallel(),
            "attn.v": ColwiseParallel(), "attn.o": RowwiseParallel(output_layouts=seq_out)}
    if block.moe:
        # router and routed experts replicated over tp (every tp rank routes the same tokens,
        # etp = 1); shared experts split as the dense MLP (planner/cost/params.py)
        plan.update(_shared_plan(block.mlp.shared))
    elif block.mlp.swiglu:
        plan.update({"mlp.gate": ColwiseParallel(), "mlp.up": ColwiseParallel(),
                     "mlp.down": RowwiseParallel(output_layouts=seq_out)})
    else:
        plan.update({"mlp.fc": ColwiseParallel(),
                     "mlp.proj": RowwiseParallel(output_layouts=seq_out)})
    if sp:
        # Norm weights stay replicated; their gradients are summed over the TP group.
        plan.update({"attn_norm": SequenceParallel(use_local_output=True),
                     "mlp_norm": SequenceParallel(use_local_output=True),
                     "attn": _gather_input(sp, extra=2), "mlp": _gather_input(sp)})
    return plan


def _shared_plan(shared) -> dict:
    if shared is None:
        return {}
    if shared.swiglu:
        return {"mlp.shared.gate": ColwiseParallel(), "mlp.shared.up": ColwiseParallel(),
                "mlp.shared.down": RowwiseParallel()}
    return {"mlp.shared.fc": ColwiseParallel(), "mlp.shared.proj": RowwiseParallel()}


def _embed_plan(part: Transformer, sp: bool) -> dict:
    assert part.embed is not None  # called for the chunk holding the embedding
    plain = part.embed.wpe is None and part.embed.norm is None
    if plain:  # Llama: reduce-scatter straight into sequence shards
        return {"embed.wte": RowwiseParallel(input_layouts=Replicate(),
                                             output_layouts=Shard(1) if sp else Replicate())}
    plan: dict[str, ParallelStyle] = {
        "embed.wte": RowwiseParallel(input_layouts=Replicate(), output_layouts=Replicate())}
    if sp:  # positions/norm act on the full sequence, then each rank keeps its slice
        plan["embed"] = PrepareModuleOutput(output_layouts=Replicate(),
                                            desired_output_layouts=Shard(1))
    return plan


def _head_plan(part: Transformer, sp: bool) -> dict:
    # Logits stay vocabulary-sharded DTensors for loss_parallel (no all-gather of v).
    plan: dict[str, ParallelStyle] = {
        "head.output": ColwiseParallel(input_layouts=Shard(1) if sp else Replicate(),
                                       output_layouts=Shard(-1), use_local_output=False)}
    if sp:
        plan["head.norm"] = SequenceParallel(use_local_output=True)
        if part.head is not None and part.head.dense is not None:
            plan["head.dense"] = SequenceParallel(use_local_output=True)
    return plan


def apply_tp(part: Transformer, tp_mesh, sp: bool) -> None:
    if part.spec.moe is not None and sp:  # planner/rules.py _runtime_moe_rules refuses it too
        raise ValueError(f"model {part.spec.name}: sequence parallelism over MoE blocks is not "
                         f"built in the runtime")
    plan = {}
    for name, block in part.layers.items():
        plan.update({f"layers.{name}.{k}": v for k, v in block_plan(block, sp).items()})
    if part.embed is not None:
        plan.update(_embed_plan(part, sp))
    if part.head is not None:
        plan.update(_head_plan(part, sp))
    parallelize_module(part, tp_mesh, plan)
    part.retie()


def mp_policy(precision: str) -> MixedPrecisionPolicy:
    """fp32 master weights and gradient reduction; compute in the plan's precision."""
    if precision == "fp32":
        return MixedPrecisionPolicy()
    return MixedPrecisionPolicy(param_dtype=DTYPES[precision], reduce_dtype=torch.float32)


def _blocks(part: Transformer) -> list[Any]:
    """The part's blocks (runtime/model.py Block: attributes mypy cannot see through
    nn.ModuleDict)."""
    return list(part.layers.values())


def apply_fsdp(part: Transformer, dp_mesh, zero_stage: int, precision: str,
               expert_mesh=None, offload: bool = False) -> set:
    """ZeRO-2: reshard_after_forward=False; ZeRO-3: True (Zhao et al. 2023, FSDP); `offload`:
    CPUOffloadPolicy (sharded parameters, gradients and optimizer states in host memory).

    Under expert parallelism each MoE block's routed experts are sharded over the expert-data-
    parallel group only (dp / ep ranks hold the same experts; torchtitan's MoE). FSDP divides
    their gradients by dp / ep; the engine divides by ep more, as each expert's gradient sums
    its ep peers' tokens (set_gradient_divide_factor would need PREMUL_SUM, which gloo lacks).
    With one rank per expert group (ep = dp) they stay out of FSDP. Returns the parameters FSDP
    does not manage (their gradients are reduced by the engine)."""
    kw: dict[str, Any] = dict(reshard_after_forward=zero_stage == 3,
                              mp_policy=mp_policy(precision))
    if offload:
        from torch.distributed.fsdp import CPUOffloadPolicy
        kw["offload_policy"] = CPUOffloadPolicy()
    unmanaged: set = set()
    for block in _blocks(part):
        ignored = set()
        if block.moe and expert_mesh is not None:
            experts = block.mlp.experts
            if expert_mesh.size(0) > 1:
                fully_shard(experts, mesh=expert_mesh["edp"], **kw)
            else:
                ignored = set(experts.parameters())
        unmanaged |= ignored
        fully_shard(block, mesh=dp_mesh, ignored_params=ignored or None, **kw)
    # embedding, head (and a tied pair) form the root group
    fully_shard(part, mesh=dp_mesh, ignored_params=unmanaged or None, **kw)
    return unmanaged


def apply_ep(part: Transformer, ctx) -> None:
    """Keep this expert-parallel rank's routed experts; all-to-all over the ep group."""
    for block in _blocks(part):
        if block.moe:
            block.mlp.experts.shard(ctx.ep_rank, ctx.ep)
            block.mlp.ep, block.mlp.ep_group = ctx.ep, ctx.group("ep")


def apply_replicate(part: Transformer, dp_mesh, precision: str, ignored=None) -> None:
    """ZeRO-0/1 data parallelism over DTensor (TP) parameters: FSDP2-based replicate
    (DDP refuses DTensor parameters, RUNTIME_NOTES item 4); `ignored`: expert-parallel
    experts, reduced by the engine."""
    from torch.distributed._composable.replicate_with_fsdp import replicate
    replicate(part, mesh=dp_mesh, mp_policy=mp_policy(precision), ignored_params=ignored)


def apply_ddp(part: nn.Module, dp_group, ignore: Sequence = ()) -> nn.Module:
    """DDP over dp; `ignore`: names of parameters it leaves alone (expert-parallel experts,
    reduced over their expert-data-parallel group by the engine)."""
    from torch.nn.parallel import DistributedDataParallel
    if ignore:
        DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(part, list(ignore))
    # Gradients are views of the buckets, so buckets add no bytes.
    return DistributedDataParallel(part, process_group=dp_group, forward_sync_buffers=False,
                                   gradient_as_bucket_view=True)


def check_offload(layout, device_type: str) -> None:
    """The runtime offloads `params` through FSDP2's CPUOffloadPolicy, which needs an
    accelerator (RUNTIME_NOTES item 6) and ZeRO-2/3; anything else is refused in one line."""
    if layout.offload == "none":
        return
    if layout.offload != "params" or layout.zero_stage < 2 or layout.dp < 2:
        raise ValueError(f"offload {layout.offload} with ZeRO-{layout.zero_stage}, "
                         f"dp={layout.dp}: this runtime offloads params only, with FSDP2 "
                         f"(ZeRO-2/3, dp > 1)")
    if device_type != "cuda":
        raise ValueError("offload params: FSDP2's CPUOffloadPolicy needs a CUDA device; this "
                         "run is on CPU (re-plan without --offload)")


def parallelize(part: Transformer, layout, precision: str, ctx, compile_blocks=False,
                fp8_recipe: str = "none") -> str:
    """(FP8 linears,) TP, recompute, (torch.compile per block) and FSDP on a meta-device part;
    `precision` is the job's dtype (bf16 under FP8). Returns the data-parallel wrapper still to
    apply after materialisation: 'ddp' or 'none'."""
    if fp8_recipe != "none":  # runtime/fp8.py: checked before any process group
        from runtime.fp8 import apply_fp8
        apply_fp8(part, fp8_recipe, layout.zero_stage if layout.dp > 1 else 0)
    check_offload(layout, ctx.device.type)
    if layout.tp > 1:
        apply_tp(part, ctx.mesh["tp"], layout.sequence_parallel)
    if layout.ep > 1:
        apply_ep(part, ctx)
    set_recompute(part, layout.recompute, layout.recompute_every)
    if compile_blocks:
        for block in part.layers.values():
            block.compile()  # in place: parameter names are unchanged
    data = layout.dp * layout.cp  # ranks holding other tokens of the batch (dp x cp)
    if data > 1 and layout.zero_stage >= 2:
        # hybrid sharding: FSDP2 on the 2-D (replicate, shard) mesh is HSDP (not with cp > 1:
        # rule cp_hsdp)
        dp_mesh = ctx.hsdp_mesh if ctx.hsdp_mesh is not None else ctx.data_mesh
        apply_fsdp(part, dp_mesh, layout.zero_stage, precision, ctx.expert_mesh,
                   offload=layout.offload == "params")
        return "none"
    if precision != "fp32":
        part.autocast_dtype = DTYPES[precision]
    if data > 1 and layout.tp > 1:
        part.autocast_dtype = None
        experts = {p for n, p in part.named_parameters() if is_expert_param(n)}
        apply_replicate(part, ctx.data_mesh, precision, experts if layout.ep > 1 else None)
        return "none"
    return "ddp" if data > 1 else "none"
