"""planner/cost/params.py lists the runtime's parameters tensor by tensor: the same names (block
tensor `n` of layer i is `layers.{i}.n`), order, full shapes and, after the runtime's TP plan,
the same shard dimension and local shape on every TP rank; per pipeline chunk and rank too,
including the last chunk's copy of a tied output layer.

TP is applied on one process with PyTorch's fake process group (a world of `tp` ranks whose
collectives do nothing): parameters stay on the meta device, only placements are compared."""

import contextlib
import re

import pytest
import torch

from planner.cost.params import (
    block_tensors,
    embedding_tensors,
    head_tensors,
    layer_tensor_name,
    rank_param_tensors,
)
from planner.plan import Layout
from planner.presets import MODEL_PRESETS
from planner.runtime_support import runtime_gaps
from planner.spec import ModelSpec
from runtime.model import Transformer, canonical_name
from runtime.pipeline import build_chunks, local_chunks


def _spec(name, arch, **kw):
    base = {"name": name, "arch": arch, "num_layers": 4, "hidden_size": 32, "num_heads": 4,
            "num_kv_heads": 4, "ffn_hidden_size": 64, "vocab_size": 250, "max_seq_len": 16,
            "tie_embeddings": True, "linear_bias": True}
    return ModelSpec(**{**base, **kw})


# vocab 250: an uneven vocabulary split under TP=4 (63, 63, 63, 61).
SPECS = {
    "llama-gqa-untied": _spec("llama-gqa-untied", "llama", num_heads=8, num_kv_heads=4,
                              tie_embeddings=False, linear_bias=False),
    "llama-gqa-tied-bias": _spec("llama-gqa-tied-bias", "llama", num_heads=8, num_kv_heads=2),
    "gpt-tied": _spec("gpt-tied", "gpt"),
    "gpt-untied-nobias": _spec("gpt-untied-nobias", "gpt", tie_embeddings=False,
                               linear_bias=False),
    "bert-tied": _spec("bert-tied", "bert"),
    "bert-untied": _spec("bert-untied", "bert", tie_embeddings=False),
}
TIED = [k for k, s in SPECS.items() if s.tie_embeddings]
LAYOUTS = {  # pipeline splits of the 4-layer specs
    "pp2": Layout(pp=2, num_microbatches=2),
    "pp2-uneven": Layout(pp=2, num_microbatches=2, layers_per_stage=(1, 3)),
    "interleaved": Layout(pp=2, num_microbatches=4, schedule="interleaved_1f1b",
                          virtual_stages=2),
    "zbv": Layout(pp=2, num_microbatches=4, schedule="zbv", virtual_stages=2),
}


def planner_tensors(spec, layer_ids, embedding=True, head=True, tied_copy=False) -> list:
    """(full name, ParamTensor) of a model part, in the runtime's order."""
    out = [(t.name, t) for t in embedding_tensors(spec)] if embedding else []
    out += [(layer_tensor_name(i, t.name), t) for i in layer_ids
            for t in block_tensors(spec, i)]
    if head:
        out += [(t.name, t) for t in head_tensors(spec, holds_tied_copy=tied_copy)]
    return out


def chunk_layer_ids(layout, num_layers) -> list:
    """Global layer indices of every chunk, from the planner's split."""
    ids, start = [], 0
    for n in layout.stage_layers(num_layers):
        ids.append(list(range(start, start + n)))
        start += n
    return ids


def expected_chunk(spec, layout, chunk) -> list:
    last = layout.num_chunks - 1
    return planner_tensors(spec, chunk_layer_ids(layout, spec.num_layers)[chunk],
                           embedding=chunk == 0, head=chunk == last,
                           tied_copy=layout.num_chunks > 1)


def runtime_shapes(module) -> list:
    return [(n, tuple(p.shape)) for n, p in module.named_parameters()]


def planner_shapes(entries) -> list:
    return [(n, t.shape) for n, t in entries]


# presets runtime/model.py builds (the others are refused by rule runtime_model)
BUILT = sorted(n for n, s in MODEL_PRESETS.items() if not runtime_gaps(s))


@pytest.mark.parametrize("key", sorted(SPECS) + BUILT)
def test_whole_model_names_order_and_shapes_equal_planner(key):
    spec = SPECS.get(key) or MODEL_PRESETS[key]
    with torch.device("meta"):
        model = Transformer(spec)
    expected = planner_tensors(spec, range(spec.num_layers))
    # Order too: ZeRO-1's flat partition (planner.cost.memory, runtime/zero1.py) follows it.
    assert runtime_shapes(model) == planner_shapes(expected)


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
@pytest.mark.parametrize("key", sorted(SPECS))
def test_pipeline_chunks_and_ranks_equal_planner(key, layout):
    spec, layout = SPECS[key], LAYOUTS[layout]
    for rank in range(layout.pp):
        chunks = build_chunks(spec, layout, rank)
        assert [c for c, _ in chunks] == local_chunks(layout, rank)
        held = []
        for c, module in chunks:
            assert runtime_shapes(module) == planner_shapes(expected_chunk(spec, layout, c))
            held += runtime_shapes(module)
        # The planner's per-rank inventory (block names without the layer prefix).
        strip = [(re.sub(r"^layers\.\d+\.", "", n), s) for n, s in held]
        assert strip == [(t.name, t.shape) for t in rank_param_tensors(spec, layout, rank)]


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
@pytest.mark.parametrize("key", TIED)
def test_tied_output_copy_on_the_last_chunk(key, layout):
    """The tensor the planner adds for a split tied model exists under its name, on the rank
    the planner puts it, as a parameter of its own whose canonical name is the embedding's."""
    spec, layout = SPECS[key], LAYOUTS[layout]
    last = layout.num_chunks - 1
    copy = {t.name: t for t in head_tensors(spec, holds_tied_copy=True)}["head.output.weight"]
    assert "head.output.weight" not in {t.name for t in head_tensors(spec)}
    rank = layout.chunk_rank(last)
    assert copy in rank_param_tensors(spec, layout, rank)
    module = dict(build_chunks(spec, layout, rank))[last]
    assert module.embed is None
    assert tuple(dict(module.named_parameters())["head.output.weight"].shape) == copy.shape
    assert canonical_name(spec, "head.output.weight") == embedding_tensors(spec)[0].name
    with torch.device("meta"):
        whole = Transformer(spec)
    assert whole.head.output.weight is whole.embed.wte.weight


@contextlib.contextmanager
def fake_tp_mesh(tp: int, rank: int):
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.testing._internal.distributed.fake_pg import FakeStore
    dist.init_process_group("fake", store=FakeStore(), rank=rank, world_size=tp)
    try:
        yield init_device_mesh("cpu", (tp,), mesh_dim_names=("tp",))
    finally:
        dist.destroy_process_group()


def tp_placements(module) -> dict:
    """name -> (global shape, local shape, sharded dim or None) after TP."""
    from torch.distributed.tensor import DTensor
    out = {}
    for name, p in module.named_parameters():
        if isinstance(p, DTensor):
            (placement,) = p.placements
            dim = placement.dim if placement.is_shard() else None
            out[name] = (tuple(p.shape), tuple(p.to_local().shape), dim)
        else:
            out[name] = (tuple(p.shape), tuple(p.shape), None)
    return out


@pytest.mark.parametrize("sp", [False, True], ids=["no-sp", "sp"])
@pytest.mark.parametrize("tp", [2, 4])
@pytest.mark.parametrize("key", sorted(SPECS))
def test_tp_local_shapes_equal_planner(key, tp, sp):
    """Whole model and the chunks of a 2-stage split (tied copy included), every TP rank."""
    from runtime.parallelize import apply_tp
    spec, layout = SPECS[key], LAYOUTS["pp2"]
    parts = [(planner_tensors(spec, range(spec.num_layers)), {})]
    for c, ids in enumerate(chunk_layer_ids(layout, spec.num_layers)):
        parts.append((expected_chunk(spec, layout, c),
                      {"layer_ids": ids, "has_embed": c == 0,
                       "has_head": c == layout.num_chunks - 1}))
    for rank in range(tp):
        with fake_tp_mesh(tp, rank) as mesh:
            for expected, kw in parts:
                with torch.device("meta"):
                    module = Transformer(spec, **kw)
                apply_tp(module, mesh, sp)
                want = {n: (t.shape, t.local_shape(tp, rank), t.tp_dim) for n, t in expected}
                assert tp_placements(module) == want, (rank, kw)
