"""Job: what is being trained per step (batch, sequence, precision) and with which kernels."""

import dataclasses
from dataclasses import dataclass

from planner.engines import ENGINES as ENGINE_TRAITS
from planner.limits import MAX_GLOBAL_BATCH, MAX_SEQ_LEN, check_int, check_range
from planner.schema import check_keys, require_choice

PRECISIONS = ("bf16", "fp16", "fp32")
# Default routing imbalance of an MoE model, max over mean tokens per expert: Switch Transformer
# trains with capacity factor 1.25 as the headroom a load-balanced (auxiliary-loss) router needs
# for few tokens to overflow (Fedus et al. 2022, Sec. 2.2 and Table 1).  planner/cost/moe.py.
DEFAULT_MOE_IMBALANCE = 1.25
MAX_MOE_IMBALANCE = 64.0
JOB_KEYS_SINCE_4 = ("moe_imbalance",)  # absent from older plans: the default
OPTIMIZERS = ("adamw",)
# Which implementation's activation bookkeeping to model:
#   torch    - this project's runtime (PyTorch DTensor TP/SP, FSDP2, torch.distributed.pipelining)
#   megatron - Megatron-LM (Korthikanti et al. 2022): SP re-gathers layer inputs in backward
ENGINES = tuple(ENGINE_TRAITS)  # what each does: planner/engines.py
# Attention kernels: flash (fused, no s^2 tensors; Dao et al. 2022), fused (one scale-mask-softmax
# kernel over materialised scores, Megatron-LM since 2020), eager (separate scale, mask, softmax and
# dropout kernels, as plain PyTorch code or Megatron-LM 2019 runs them)
ATTENTION = ("flash", "fused", "eager")


@dataclass(frozen=True, kw_only=True)
class Job:
    global_batch: int
    seq_len: int
    precision: str = "bf16"
    optimizer: str = "adamw"
    attention: str = "flash"
    engine: str = "torch"
    moe_imbalance: float = DEFAULT_MOE_IMBALANCE  # MoE: max over mean tokens per expert

    def __post_init__(self):
        check_int(self.global_batch, "global batch", 1, MAX_GLOBAL_BATCH)
        check_int(self.seq_len, "seq len", 1, MAX_SEQ_LEN)
        require_choice(self.precision, "precision", PRECISIONS)
        require_choice(self.optimizer, "optimizer", OPTIMIZERS)
        require_choice(self.attention, "attention", ATTENTION)
        require_choice(self.engine, "engine", ENGINES)
        check_range(self.moe_imbalance, "moe imbalance", 1.0, MAX_MOE_IMBALANCE)

    @property
    def flash_attention(self) -> bool:
        return self.attention == "flash"

    @property
    def tokens_per_step(self) -> int:
        return self.global_batch * self.seq_len

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict, optional=()) -> "Job":
        """Every key is required (a dropped `precision` must not become bf16); `optional` names
        keys an older plan schema_version lacked, for the plan loader to allow explicitly."""
        return cls(**check_keys(data, cls, "job", optional))
