"""CPU offload (Layout.offload): which model states leave the GPU for host memory, the traffic
over each GPU's host link, and the optimizer step on the CPU.

`optimizer` (DeepSpeed ZeRO-Offload, Ren et al. 2021; Megatron --optimizer-cpu-offload): the
fp32 master weights and AdamW moments of the rank's partition live on the host, with an fp32
copy of its gradient partition; each step the 16-bit gradient partition goes device-to-host and
the updated 16-bit parameters host-to-device (Ren et al. 2021, Sec. 4.1, Fig. 2: 2M bytes each
way per step for M parameters in 16 bits).  `params` also keeps the parameters there: FSDP2's
CPUOffloadPolicy holds the sharded fp32 parameters, gradients and optimizer states on the host,
copies each shard to the device before its all-gather and each reduced gradient shard back
(torch/distributed/fsdp/_fully_shard/_fsdp_param.py, offload_to_cpu); DeepSpeed offload_param
(ZeRO-Infinity, Rajbhandari et al. 2021) keeps the 16-bit partition there.

Overlap (Ren et al. 2021, Sec. 4.2): the gradient copies run as backward releases buckets and
are hidden behind it; the CPU Adam step and the copy-back of the updated parameters are on the
critical path (no one-step delayed update).  Under `params` every copy is counted as exposed
(FSDP2's copy-in precedes the gather it feeds): an upper bound."""

from planner.cost.comm_plan import fsdp_rounds
from planner.cost.params import _local_numel
from planner.engines import OFFLOADS, engine
from planner.units import dtype_bytes

MASTER_GRAD_BYTES = 4  # the fp32 gradient partition the host optimizer reads (Ren et al. Fig. 2)


def split(states: tuple, job, *, offload: str, optimizer_numel: float) -> tuple:
    """((weights, gradients, optimizer) on the GPU, bytes on the host) of one rank, from the
    rank's model states (planner.cost.memory.model_states) and the parameters whose optimizer
    states it holds."""
    weights, grads, opt = states
    if offload == "none":
        return states, 0.0
    fp32_grad = MASTER_GRAD_BYTES * optimizer_numel
    eng = engine(job.engine)
    # DeepSpeed's ZeRO optimizers already hold that fp32 partition among their gradients
    moved_grads = fp32_grad if eng.deepspeed_optimizers else 0.0
    host = opt + fp32_grad
    if offload == "optimizer":
        return (weights, grads - moved_grads, 0.0), host
    if eng.fp32_master_params:  # FSDP2 CPUOffloadPolicy: parameters and gradients too
        return (0.0, 0.0, 0.0), weights + grads + opt
    return (0.0, grads - moved_grads, 0.0), host + weights


def optimizer_numel(job, *, zero_stage: int, optimizer_bytes: float) -> float:
    """Parameters whose AdamW states this rank holds (its optimizer bytes over bytes per
    parameter)."""
    return optimizer_bytes / engine(job.engine).optimizer_state_bytes(job.dtype, zero_stage)


def link_bytes(spec, job, *, offload, tp, dp, pp, zero_stage, num_microbatches, rank_layers,
               holds_embedding, holds_head, tied_copy, dp_shard=0) -> tuple:
    """(hidden, exposed) bytes over this GPU's host link in one step, the larger direction."""
    if offload == "none":
        return 0.0, 0.0
    numel = _local_numel(spec, tp, rank_layers, holds_embedding, holds_head, tied_copy)
    shard = (dp_shard or dp) if zero_stage >= 1 else 1
    if offload == "params" and engine(job.engine).fp32_master_params:
        reduces, gathers = fsdp_rounds(job.engine, zero_stage, pp, num_microbatches)
        return 0.0, 4.0 * numel / shard * max(reduces, gathers)
    a = dtype_bytes(job.dtype)
    return a * numel / shard, a * numel / shard


def offload_seconds(profile, spec, job, *, offload, tp, dp, pp, zero_stage, num_microbatches,
                    rank_layers, holds_embedding, holds_head, tied_copy, dp_shard=0) -> float:
    """Exposed seconds of one step the offload adds: the CPU AdamW step over the parameters of
    every rank of the node (the node's cores are shared; host.cpu_adam_params_per_s) plus the
    exposed host-link copies (host.h2d_bandwidth_bytes_per_s, per GPU)."""
    assert offload in OFFLOADS, offload
    if offload == "none":
        return 0.0
    host = profile.host
    numel = _local_numel(spec, tp, rank_layers, holds_embedding, holds_head, tied_copy)
    shard = (dp_shard or dp) if zero_stage >= 1 else 1
    node_params = numel / shard * profile.gpus_per_node
    _, exposed = link_bytes(spec, job, offload=offload, tp=tp, dp=dp, pp=pp,
                            zero_stage=zero_stage, num_microbatches=num_microbatches,
                            rank_layers=rank_layers, holds_embedding=holds_embedding,
                            holds_head=holds_head, tied_copy=tied_copy, dp_shard=dp_shard)
    return node_params / host.cpu_adam_params_per_s + exposed / host.h2d_bandwidth_bytes_per_s
