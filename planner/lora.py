"""LoRA adapters (Hu et al. 2021): the frozen weight W of a targeted linear layer gets a trainable
low-rank update, y = W x + (alpha / r) B A x, with A: r x in (Gaussian) and B: out x r (zero, so
training starts from the base model).  `LoraSpec` is the plan's `lora` field (planner/job.py);
None means full fine-tuning.

`base_4bit` stores the frozen base weights in 4 bits (QLoRA, Dettmers et al. 2023: NF4 with one
fp32 absmax per 64 weights, 4 + 32/64 = 4.5 bits per weight).  It is a memory model only: the
runtime keeps the frozen base in the training precision and refuses it."""

import dataclasses
from dataclasses import dataclass

from planner.limits import check_int
from planner.schema import check_keys, require_bool, require_number

# the short target names and the block tensor (planner/cost/params.py) each adapts
TARGETS = {"q": "attn.q", "k": "attn.k", "v": "attn.v", "o": "attn.o",
           "gate": "mlp.gate", "up": "mlp.up", "down": "mlp.down",
           "fc": "mlp.fc", "proj": "mlp.proj"}
SWIGLU_ONLY, GELU_ONLY = ("gate", "up", "down"), ("fc", "proj")
MAX_RANK = 4096          # well above every published LoRA rank (Hu et al. 2021 use 1-64)
NF4_BITS_PER_WEIGHT = 4 + 32 / 64   # QLoRA Sec. 3: NF4 plus an fp32 absmax per 64-weight block
DEFAULT_TARGETS = ("q", "k", "v", "o")


@dataclass(frozen=True, kw_only=True)
class LoraSpec:
    rank: int
    alpha: float = 16.0
    targets: tuple = DEFAULT_TARGETS
    base_4bit: bool = False

    def __post_init__(self):
        check_int(self.rank, "lora rank", 1, MAX_RANK)
        require_number(self.alpha, "lora alpha", 0.0, strict=True)
        require_bool(self.base_4bit, "lora base_4bit")
        if not isinstance(self.targets, (list, tuple)) or not self.targets:
            raise ValueError(f"lora targets must be a non-empty list, got {self.targets!r}")
        for name in self.targets:
            if name not in TARGETS:
                raise ValueError(f"lora target {name!r} is not one of {', '.join(TARGETS)}")
        if len(set(self.targets)) != len(self.targets):
            raise ValueError(f"lora targets repeat a name: {list(self.targets)}")
        object.__setattr__(self, "targets", tuple(self.targets))

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    def absent_targets(self, mlp: str) -> list:
        """Targets the model's MLP does not have (gate/up/down are SwiGLU's, fc/proj GELU's)."""
        missing = GELU_ONLY if mlp == "swiglu" else SWIGLU_ONLY
        return [t for t in self.targets if t in missing]

    def tensor_names(self) -> tuple:
        """Block tensor names (`attn.q`, ...) of the adapted linear layers."""
        return tuple(TARGETS[t] for t in self.targets)

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["targets"] = list(self.targets)
        return d

    @classmethod
    def from_dict(cls, data) -> "LoraSpec":
        return cls(**check_keys(data, cls, "lora"))


def parse_targets(text: str) -> tuple:
    """'q,k,v,o' -> ('q', 'k', 'v', 'o') (names checked by LoraSpec)."""
    return tuple(t.strip() for t in str(text).split(",") if t.strip())
