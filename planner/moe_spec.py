"""Mixture-of-experts and multi-head latent attention shapes of a ModelSpec (ModelSpec.moe,
ModelSpec.mla; None = a dense FFN / standard attention).

MoE: token-choice top-k routing over `num_experts` routed experts of `expert_ffn_hidden_size`
each (Shazeer et al. 2017; Fedus et al. 2022, Switch), plus shared experts always applied
(DeepSeekMoE, Dai et al. 2024) of `shared_ffn_hidden_size` in total.  Layers 0..first_dense_layers-1
are dense; after them every `moe_layer_every`-th layer is MoE (Qwen2-MoE `decoder_sparse_step`,
counted from the first non-dense layer).  `capacity_factor` 0 means dropless (Gale et al. 2023,
MegaBlocks); the router is `softmax` (Mixtral, Qwen) or `sigmoid` (DeepSeek-V3, Liu et al. 2024
Sec. 2.1.2); `aux_loss_coef` weights the load-balancing loss (Switch eq. 4; 0 = none).

MLA: DeepSeek-V2/V3 attention (DeepSeek-AI 2024, Sec. 2.1): queries through a rank-`q_lora_rank`
bottleneck (0 = a full-rank query projection, DeepSeek-V2-Lite), keys and values through a
rank-`kv_lora_rank` latent, per-head query/key dims `qk_nope_head_dim` + `qk_rope_head_dim`
(decoupled RoPE) and value dim `v_head_dim`."""

import dataclasses
from dataclasses import dataclass

from planner import limits
from planner.limits import check_int, check_range
from planner.schema import check_keys, require_bool, require_choice

ROUTERS = ("softmax", "sigmoid")
MAX_EXPERTS = 4096  # DeepSeek-V3 has 256 routed experts; 4096 leaves room for fine-grained MoE
MAX_CAPACITY_FACTOR = 64.0
MOE_KEYS_OPTIONAL = ("shared_expert_gate",)  # added after schema 4's first release: absent = off


@dataclass(frozen=True, kw_only=True)
class MoESpec:
    num_experts: int
    experts_per_token: int
    expert_ffn_hidden_size: int
    shared_ffn_hidden_size: int = 0    # all shared experts together; 0 = none
    first_dense_layers: int = 0
    moe_layer_every: int = 1
    router: str = "softmax"
    aux_loss_coef: float = 0.01
    capacity_factor: float = 0.0       # 0 = dropless
    shared_expert_gate: bool = False   # sigmoid gate (a 1 x hidden linear) on the shared experts'
    #                                    output (Qwen2-MoE Qwen2MoeSparseMoeBlock)

    def __post_init__(self):
        check_int(self.num_experts, "num_experts", 1, MAX_EXPERTS)
        check_int(self.experts_per_token, "experts_per_token", 1, self.num_experts)
        check_int(self.expert_ffn_hidden_size, "expert_ffn_hidden_size", 1,
                  limits.MAX_FFN_HIDDEN_SIZE)
        check_int(self.shared_ffn_hidden_size, "shared_ffn_hidden_size", 0,
                  limits.MAX_FFN_HIDDEN_SIZE)
        check_int(self.first_dense_layers, "first_dense_layers", 0, limits.MAX_LAYERS)
        check_int(self.moe_layer_every, "moe_layer_every", 1, limits.MAX_LAYERS)
        require_choice(self.router, "router", ROUTERS)
        require_bool(self.shared_expert_gate, "shared_expert_gate")
        if self.shared_expert_gate and not self.shared_ffn_hidden_size:
            raise ValueError("shared_expert_gate needs shared experts (shared_ffn_hidden_size "
                             "> 0)")
        check_range(self.aux_loss_coef, "aux_loss_coef", 0.0, 1.0)
        check_range(self.capacity_factor, "capacity_factor", 0.0, MAX_CAPACITY_FACTOR)
        if 0 < self.capacity_factor < 1:
            raise ValueError(f"capacity_factor must be 0 (dropless) or >= 1, got "
                             f"{self.capacity_factor}")

    def is_moe_layer(self, layer: int) -> bool:
        """Whether 0-based layer `layer` has routed experts."""
        return (layer >= self.first_dense_layers
                and (layer - self.first_dense_layers) % self.moe_layer_every == 0)

    def num_moe_layers(self, num_layers: int) -> int:
        return sum(self.is_moe_layer(i) for i in range(num_layers))

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "MoESpec":
        return cls(**check_keys(data, cls, "model spec moe", MOE_KEYS_OPTIONAL))


@dataclass(frozen=True, kw_only=True)
class MLASpec:
    q_lora_rank: int                   # 0 = full-rank query projection
    kv_lora_rank: int
    qk_nope_head_dim: int
    qk_rope_head_dim: int
    v_head_dim: int

    def __post_init__(self):
        check_int(self.q_lora_rank, "q_lora_rank", 0, limits.MAX_HIDDEN_SIZE)
        for key in ("kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim"):
            check_int(getattr(self, key), key, 1, limits.MAX_HIDDEN_SIZE)

    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "MLASpec":
        return cls(**check_keys(data, cls, "model spec mla"))
