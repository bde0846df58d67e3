"""LoRA adapters on the runtime's model (Hu et al. 2021; planner/lora.py is the plan's field).

`LoraLinear` is the targeted nn.Linear with two more parameters, registered after its own
weight and bias (the order planner/cost/params.py lists): lora_A (r x in, Gaussian) and lora_B
(out x r, zero), so y = W x + b + (alpha / r) B (A x) starts equal to the base model.  Applied
on the meta device before FSDP2 or DDP wrap the model; every other parameter is frozen
(requires_grad False) and, in bf16/fp16 training, held in that precision (no fp32 master, no
gradient, no optimizer state).  A classification head stays trainable (it is new).

`merge` folds the adapters into the base weights, W + (alpha / r) B A, returning a plain state
dict (no lora_* keys) that a model without adapters loads."""

import torch
import torch.nn.functional as F
from torch import nn

TRAINED_PREFIXES = ("head.classifier",)  # trained also under LoRA: a new head


class LoraLinear(nn.Linear):
    """nn.Linear plus a rank-r update; shares the base layer's weight and bias tensors."""

    def __init__(self, base: nn.Linear, rank: int, scale: float):
        nn.Module.__init__(self)
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight = base.weight
        self.bias = base.bias
        device = base.weight.device
        self.lora_A = nn.Parameter(torch.empty(rank, base.in_features, device=device))
        self.lora_B = nn.Parameter(torch.empty(base.out_features, rank, device=device))
        self.scale = scale

    def forward(self, x):
        return F.linear(x, self.weight, self.bias) + \
            F.linear(F.linear(x, self.lora_A), self.lora_B) * self.scale


def check_runtime_lora(lora) -> None:
    if lora is not None and lora.base_4bit:
        raise ValueError("lora base_4bit is a memory model of QLoRA only; the runtime keeps "
                         "the frozen base in the training precision (plan without "
                         "--lora-base-4bit to run it)")


def apply_lora(part: nn.Module, lora, dtype: torch.dtype) -> None:
    """Wrap the targeted linear layers of every block of a (meta-device) model part, then
    freeze the rest and cast it to `dtype` (tied tensors stay one tensor)."""
    if lora is None:
        return
    for block in part.get_submodule("layers").children():
        for name in lora.tensor_names():
            parent_name, leaf = name.split(".")
            parent = getattr(block, parent_name)
            setattr(parent, leaf, LoraLinear(getattr(parent, leaf), lora.rank, lora.scale))
    frozen = {}
    for module_name, module in part.named_modules():
        if module_name.startswith(TRAINED_PREFIXES):
            continue
        for key, p in list(module._parameters.items()):
            if p is None or key.startswith("lora_"):
                continue
            if id(p) not in frozen:
                frozen[id(p)] = nn.Parameter(p.detach().to(dtype), requires_grad=False)
            module._parameters[key] = frozen[id(p)]


@torch.no_grad()
def merge(state: dict, lora) -> dict:
    """A full state dict with the adapters folded in: W <- W + (alpha / r) B A, in fp32 and
    cast back to W's dtype; the lora_* entries are dropped."""
    out = {k: v for k, v in state.items() if ".lora_" not in k}
    for key in state:
        if key.endswith(".lora_A"):
            base = key[:-len(".lora_A")]
            a, b = state[key].float(), state[f"{base}.lora_B"].float()
            w = out[f"{base}.weight"]
            out[f"{base}.weight"] = (w.float() + lora.scale * b @ a).to(w.dtype)
    return out


def _tensor(value):
    """A state-dict value that is a tensor (model state dicts hold nothing else)."""
    assert hasattr(value, "detach"), type(value)
    return value


def save_merged(engine, out_dir) -> str | None:
    """Gather the whole model's weights (every rank takes part: FSDP2 gathers), merge the
    adapters on rank 0 and write `out_dir/merged.pt`; returns its path on rank 0, else None."""
    import os

    import torch.distributed as dist
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    from runtime.model import canonical_name
    spec, ctx = engine.plan.model, engine.ctx
    state = {}
    for module in engine.modules:
        full = get_model_state_dict(module, options=StateDictOptions(full_state_dict=True))
        state.update({canonical_name(spec, k.removeprefix("module.")): _tensor(v).detach().cpu()
                      for k, v in full.items()})
    keep = ctx.dp_rank == 0 and ctx.tp_rank == 0
    pieces = [None] * dist.get_world_size()
    dist.all_gather_object(pieces, state if keep else None)
    if dist.get_rank() != 0:
        return None
    whole: dict = {}
    for piece in pieces:
        whole.update(piece or {})
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, "merged.pt")
    torch.save(merge(whole, engine.plan.job.lora), path)
    return path
