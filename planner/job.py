"""Job: what is being trained per step (batch, sequence, precision) and with which kernels."""

import dataclasses
from dataclasses import dataclass

from planner.engines import ENGINES as ENGINE_TRAITS
from planner.limits import MAX_GLOBAL_BATCH, MAX_SEQ_LEN, check_int
from planner.lora import LoraSpec
from planner.schema import check_keys, require_choice

PRECISIONS = ("bf16", "fp16", "fp32", "fp8")
# FP8 training recipes (README, FP8): tensorwise and rowwise dynamic scaling as torchao's
# float8 training implements them (torchao/float8/config.py Float8LinearRecipeName), delayed
# scaling from an amax history as Transformer Engine runs it under Megatron-LM
# (transformer_engine DelayedScaling; megatron-core TransformerConfig.fp8_recipe); "none" for
# every other precision
FP8_RECIPES = ("tensorwise", "rowwise", "delayed")
FP8_NONE = "none"
# keys a plan written before FP8 lacked; absent means "none" (such plans cannot be fp8)
JOB_KEYS_SINCE_FP8 = ("fp8_recipe",)
OPTIMIZERS = ("adamw",)
# Which implementation's activation bookkeeping to model:
#   torch    - this project's runtime (PyTorch DTensor TP/SP, FSDP2, torch.distributed.pipelining)
#   megatron - Megatron-LM (Korthikanti et al. 2022): SP re-gathers layer inputs in backward
ENGINES = tuple(ENGINE_TRAITS)  # what each does: planner/engines.py
# Attention kernels: flash (fused, no s^2 tensors; Dao et al. 2022), fused (one scale-mask-softmax
# kernel over materialised scores, Megatron-LM since 2020), eager (separate scale, mask, softmax and
# dropout kernels, as plain PyTorch code or Megatron-LM 2019 runs them)
ATTENTION = ("flash", "fused", "eager")
# What is trained: pretrain (next-token or masked-token LM loss on every position), classify
# (sequence classification: a num_labels classifier head, loss at the pooled token), sft
# (causal LM on prompt/response pairs, the prompt masked out of the loss)
TASKS = ("pretrain", "classify", "sft")
MAX_LABELS = 1 << 20
# Job keys of plan schema 4 that older plans lack: those are pre-training with every weight
# trained (task pretrain, num_labels 2 unused, lora None)
JOB_KEYS_SINCE_4 = ("task", "num_labels", "lora")


@dataclass(frozen=True, kw_only=True)
class Job:
    global_batch: int
    seq_len: int
    precision: str = "bf16"
    optimizer: str = "adamw"
    attention: str = "flash"
    engine: str = "torch"
    fp8_recipe: str = FP8_NONE        # precision fp8 only: one of FP8_RECIPES
    task: str = "pretrain"
    num_labels: int = 2               # classify only: classes of the classifier head
    lora: LoraSpec | None = None            # None: full fine-tuning (every weight trained)

    def __post_init__(self):
        check_int(self.global_batch, "global batch", 1, MAX_GLOBAL_BATCH)
        check_int(self.seq_len, "seq len", 1, MAX_SEQ_LEN)
        require_choice(self.precision, "precision", PRECISIONS)
        require_choice(self.optimizer, "optimizer", OPTIMIZERS)
        require_choice(self.attention, "attention", ATTENTION)
        require_choice(self.engine, "engine", ENGINES)
        require_choice(self.task, "task", TASKS)
        check_int(self.num_labels, "num labels", 2, MAX_LABELS)
        if self.lora is not None and not isinstance(self.lora, LoraSpec):
            raise ValueError(f"lora must be a LoraSpec or None, got {self.lora!r}")
        require_choice(self.fp8_recipe, "fp8_recipe", (FP8_NONE,) + FP8_RECIPES)
        if self.precision == "fp8" and self.fp8_recipe == FP8_NONE:
            raise ValueError(f"precision fp8 needs an fp8_recipe ({', '.join(FP8_RECIPES)})")
        if self.precision != "fp8" and self.fp8_recipe != FP8_NONE:
            raise ValueError(f"fp8_recipe {self.fp8_recipe} needs precision fp8, got "
                             f"{self.precision}")

    @property
    def fp8(self) -> bool:
        return self.precision == "fp8"

    @property
    def dtype(self) -> str:
        """The dtype of activations, compute copies of weights, attention and communication:
        FP8 training runs only the linear layers' GEMMs in fp8, everything else in bf16."""
        return "bf16" if self.fp8 else self.precision

    @property
    def flash_attention(self) -> bool:
        return self.attention == "flash"

    @property
    def tokens_per_step(self) -> int:
        return self.global_batch * self.seq_len

    @property
    def trains_classifier(self) -> bool:
        return self.task == "classify"

    def to_dict(self) -> dict:
        """All fields; `fp8_recipe` only on fp8 jobs (elsewhere it can only be "none", and
        from_dict reads its absence so)."""
        d = dataclasses.asdict(self)
        if not self.fp8:
            del d["fp8_recipe"]
        d["lora"] = None if self.lora is None else self.lora.to_dict()
        return d

    @classmethod
    def from_dict(cls, data: dict, optional=()) -> "Job":
        """Every key is required (a dropped `precision` must not become bf16); `optional` names
        keys an older plan schema_version lacked (JOB_KEYS_SINCE_4), for the plan loader to
        allow explicitly.  `fp8_recipe` (JOB_KEYS_SINCE_FP8) may be absent where precision is
        not fp8: "none" is then the only value it can hold."""
        if isinstance(data, dict) and data.get("precision") != "fp8":
            optional = tuple(optional) + JOB_KEYS_SINCE_FP8
        data = dict(check_keys(data, cls, "job", optional))
        if data.get("lora") is not None:
            data["lora"] = LoraSpec.from_dict(data["lora"])
        return cls(**data)
