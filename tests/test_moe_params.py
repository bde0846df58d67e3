"""Mixture-of-experts and MLA parameter inventory (planner/cost/params.py): totals and active
counts of the MoE presets against their published figures, the per-rank tensor lists under
pipelining, and expert-parallel / expert-tensor-parallel local shapes."""

import dataclasses
import math

import pytest

from planner.cost.params import (
    block_tensors,
    count_active_parameters,
    count_parameters,
    rank_layer_ids,
    rank_local_numel,
    rank_param_tensors,
)
from planner.moe_spec import MoESpec
from planner.plan import Layout
from planner.presets import MODEL_PRESETS


def _digits(value: float, published: str) -> bool:
    """`value` (in billions) printed to the published figure's digits, rounded or truncated:
    the papers and model cards use both conventions (Mixtral 12.88 -> 12.9 rounds; DeepSeek-V3
    37.55 -> 37 and Qwen3-30B-A3B 3.35 -> 3.3 truncate)."""
    places = len(published.split(".")[1]) if "." in published else 0
    scale = 10 ** places
    return float(published) in (round(value, places), math.floor(value * scale) / scale)


# preset, published total, published active (billions), whether the active figure counts the
# input embedding table, source
PUBLISHED = [
    ("mixtral-8x7b", "46.7", "12.9", True),      # Jiang et al. 2024, Sec. 2 / Mistral AI blog
    ("qwen3-30b-a3b", "30.5", "3.3", True),      # Qwen3 model card: 30.5B total, 3.3B activated
    ("qwen3-235b-a22b", "235", "22", True),      # Qwen3 model card: 235B / 22B
    ("deepseek-v3", "671", "37", True),          # DeepSeek-AI 2024, abstract: 671B / 37B
    # OpenAI gpt-oss model card, Table 1: 116.83B total, 5.13B active (embedding not counted)
    ("gpt-oss-120b", "116.8", "5.1", False),
]


@pytest.mark.parametrize("name, total, active, embeddings", PUBLISHED,
                         ids=[p[0] for p in PUBLISHED])
def test_moe_presets_match_the_published_totals(name, total, active, embeddings):
    spec = MODEL_PRESETS[name]
    assert _digits(count_parameters(spec) / 1e9, total)
    assert _digits(count_active_parameters(spec, embeddings=embeddings) / 1e9, active)


def test_gpt_oss_card_figures_exactly():
    """The card's 5.13B active = all but the input embedding: 116.83B - 128 idle experts."""
    spec = MODEL_PRESETS["gpt-oss-120b"]
    assert round(count_active_parameters(spec, embeddings=False) / 1e9, 2) == 5.13
    assert round(count_parameters(spec) / 1e9, 2) == 116.83


def test_active_counts_top_k_of_the_routed_experts_only():
    spec = MODEL_PRESETS["deepseek-v3"]
    routed = sum(t.numel for t in block_tensors(spec, 3) if t.expert)
    idle = routed * (256 - 8) // 256 * 58  # 58 MoE layers after 3 dense
    assert count_parameters(spec) - count_active_parameters(spec) == idle
    dense = MODEL_PRESETS["llama3-8b"]
    assert count_active_parameters(dense) == count_parameters(dense)


def test_dense_and_moe_layers_differ():
    spec = MODEL_PRESETS["deepseek-v3"]
    dense, moe = ({t.name for t in block_tensors(spec, i)} for i in (2, 3))
    assert "mlp.gate.weight" in dense and "mlp.router.weight" not in dense
    assert {"mlp.router.weight", "mlp.experts.gate", "mlp.shared.down.weight"} <= moe
    assert {"attn.q_a.weight", "attn.kv_a_norm.weight", "attn.kv_b.weight"} <= moe
    oss = {t.name: t.shape for t in block_tensors(MODEL_PRESETS["gpt-oss-120b"], 0)}
    assert oss["attn.q.weight"] == (4096, 2880) and oss["attn.o.weight"] == (2880, 4096)
    assert oss["attn.sinks"] == (64,) and oss["mlp.router.bias"] == (128,)
    assert oss["mlp.experts.down_bias"] == (128, 2880)


LAYOUTS = [Layout(pp=4, num_microbatches=4),
           Layout(pp=2, virtual_stages=2, schedule="interleaved_1f1b", num_microbatches=4),
           Layout(pp=2, virtual_stages=2, schedule="zbv", num_microbatches=4),
           Layout(pp=3, num_microbatches=3, layers_per_stage=(5, 30, 26))]


@pytest.mark.parametrize("layout", LAYOUTS, ids=["pp4", "interleaved", "zbv", "uneven"])
def test_pipeline_ranks_partition_an_moe_model(layout):
    spec = MODEL_PRESETS["deepseek-v3"]
    ids = [rank_layer_ids(spec, layout, r) for r in range(layout.pp)]
    assert sorted(i for r in ids for i in r) == list(range(61))
    total = sum(t.numel for r in range(layout.pp) for t in rank_param_tensors(spec, layout, r))
    assert total == count_parameters(spec)
    local = sum(rank_local_numel(spec, layout, r) for r in range(layout.pp))
    assert local == count_parameters(spec)


def test_expert_parallel_local_shapes():
    spec = MODEL_PRESETS["mixtral-8x7b"]
    gate = next(t for t in block_tensors(spec, 0) if t.name == "mlp.experts.gate")
    assert gate.shape == (8, 14336, 4096)
    assert gate.local_shape(4, ep=8) == (1, 14336, 4096)        # tp does not split experts
    assert gate.local_shape(1, ep=2, etp=2) == (4, 7168, 4096)  # etp splits the expert FFN
    down = next(t for t in block_tensors(spec, 0) if t.name == "mlp.experts.down")
    assert down.local_shape(1, ep=4, etp=2, ep_rank=3, etp_rank=1) == (2, 4096, 7168)
    router = next(t for t in block_tensors(spec, 0) if t.name == "mlp.router.weight")
    assert router.local_shape(4, ep=8) == router.shape == (8, 4096)


def test_rank_numel_splits_experts_over_ep_and_the_rest_over_tp():
    spec = MODEL_PRESETS["mixtral-8x7b"]
    full = count_parameters(spec)
    experts = 32 * 3 * 8 * 14336 * 4096
    one = Layout(dp=8, ep=8)
    assert rank_local_numel(spec, one, 0, expert=True) == experts // 8
    assert rank_local_numel(spec, one, 0, expert=False) == full - experts
    assert rank_local_numel(spec, one, 0) == full - experts + experts // 8
    tp = Layout(tp=2, dp=4, ep=4)
    assert rank_local_numel(spec, tp, 0, expert=True) == experts // 4
    assert rank_local_numel(spec, tp, 0, expert=False) < (full - experts) // 2 + 8 * 4096 * 33


def test_moe_layer_patterns():
    base = MODEL_PRESETS["mixtral-8x7b"]
    every2 = dataclasses.replace(base, moe=dataclasses.replace(base.moe, first_dense_layers=1,
                                                               moe_layer_every=2))
    assert [i for i in range(6) if every2.moe.is_moe_layer(i)] == [1, 3, 5]
    dense_block = sum(t.numel for t in block_tensors(every2, 0))
    moe_block = sum(t.numel for t in block_tensors(every2, 1))
    assert count_parameters(every2) == count_parameters(base) - 16 * (moe_block - dense_block)


def test_moe_spec_refuses_a_shared_gate_without_shared_experts():
    with pytest.raises(ValueError, match="shared_expert_gate needs shared experts"):
        MoESpec(num_experts=4, experts_per_token=2, expert_ffn_hidden_size=8,
                shared_expert_gate=True)
