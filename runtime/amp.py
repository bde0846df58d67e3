"""Dynamic loss scaling for fp16 compute (Micikevicius et al. 2018, Sec. 3.2), as
torch.amp.GradScaler does it, but over gradients that are DTensor shards or live on several
pipeline ranks: one overflow check for the whole world."""

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor

INIT_SCALE = 2.0 ** 16
GROWTH_INTERVAL = 2000  # GradScaler's defaults: x2 after 2000 clean steps, /2 on overflow


class LossScaler:
    def __init__(self, enabled: bool):
        self.enabled = enabled
        self.scale = INIT_SCALE if enabled else 1.0
        self.good_steps = 0

    @torch.no_grad()
    def unscale(self, params, device) -> bool:
        """Divide every gradient by the scale; True if any rank saw inf/NaN (skip the step)."""
        if not self.enabled:
            return False
        grads = [p.grad.to_local() if isinstance(p.grad, DTensor) else p.grad
                 for p in params if p.grad is not None]
        if grads:
            torch._foreach_mul_(grads, 1.0 / self.scale)
        bad = torch.zeros((), device=device)
        for g in grads:
            bad = torch.maximum(bad, (~torch.isfinite(g)).any().float())
        dist.all_reduce(bad, op=dist.ReduceOp.MAX)
        return bool(bad)

    def update(self, overflow: bool) -> None:
        if not self.enabled:
            return
        if overflow:
            self.scale, self.good_steps = self.scale / 2, 0
        else:
            self.good_steps += 1
            if self.good_steps == GROWTH_INTERVAL:
                self.scale, self.good_steps = self.scale * 2, 0

    def state(self) -> dict:
        return {"loss_scale": torch.tensor(self.scale if self.enabled else 0.0,
                                           dtype=torch.float64),
                "good_steps": torch.tensor(self.good_steps)}

    def load(self, state: dict) -> None:
        if self.enabled and float(state["loss_scale"]) > 0:  # 0: saved without fp16
            self.scale = float(state["loss_scale"])
            self.good_steps = int(state["good_steps"])
