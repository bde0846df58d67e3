"""The runtime model: exact parameter counts (planner/cost/params.py), shapes, determinism."""

import pytest
import torch

from planner.cost.params import count_parameters
from planner.presets import MODEL_PRESETS
from planner.spec import ModelSpec
from runtime.model import Transformer, materialize


@pytest.mark.parametrize("name", sorted(MODEL_PRESETS))
def test_param_count_equals_planner(name):
    spec = MODEL_PRESETS[name]
    with torch.device("meta"):
        model = Transformer(spec)
    assert sum(p.numel() for p in model.parameters()) == count_parameters(spec)


def _small(arch, **kw):
    base = dict(name="t", arch=arch, num_layers=2, hidden_size=32, num_heads=4,
                num_kv_heads=2 if arch == "llama" else 4, ffn_hidden_size=64, vocab_size=256,
                max_seq_len=16, tie_embeddings=arch != "llama", linear_bias=arch != "llama")
    return ModelSpec(**{**base, **kw})


@pytest.mark.parametrize("arch", ["gpt", "llama", "bert"])
def test_forward_shapes_and_deterministic_init(arch):
    spec = _small(arch)
    models = []
    for _ in range(2):
        with torch.device("meta"):
            model = Transformer(spec)
        materialize(model, "cpu", seed=3)
        models.append(model)
    tokens = torch.randint(0, 256, (2, 16))
    out = models[0](tokens)
    assert out.shape == (2, 16, 256)
    assert torch.equal(out, models[1](tokens))


def _whole_and_two_chunks(spec):
    """The whole 2-layer model and its two pipeline chunks, on the meta device."""
    with torch.device("meta"):
        return (Transformer(spec), Transformer(spec, layer_ids=[0], has_head=False),
                Transformer(spec, layer_ids=[1], has_embed=False))


def test_pipeline_chunks_partition_the_model():
    """Chunks keep global layer names; the tied copy is the only extra tensor."""
    whole, first, last = _whole_and_two_chunks(_small("gpt"))
    names = {n for n, _ in first.named_parameters()} | {n for n, _ in last.named_parameters()}
    assert names == {n for n, _ in whole.named_parameters()} | {"head.output.weight"}
    assert "layers.1.attn.q.weight" in dict(last.named_parameters())


def test_chunked_forward_equals_whole():
    whole, first, last = _whole_and_two_chunks(_small("llama"))
    for m in (whole, first, last):
        materialize(m, "cpu", seed=1)
    tokens = torch.randint(0, 256, (2, 16))
    torch.testing.assert_close(whole(tokens), last(first(tokens)), rtol=0, atol=0)


def test_rms_norm_matches_torch_and_saves_input_and_rstd_only():
    from runtime.model import RMSNorm
    norm = RMSNorm(16, 1e-5)
    with torch.no_grad():
        norm.weight.copy_(torch.rand(16) + 0.5)
    x = torch.randn(2, 3, 16, dtype=torch.float64, requires_grad=True)
    norm = norm.double()
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.shape) or t,
                                                  lambda t: t):
        y = norm(x)
    want = torch.nn.functional.rms_norm(x, (16,), norm.weight, 1e-5)
    torch.testing.assert_close(y, want)
    assert sorted(saved) == sorted([(2, 3, 16), (16,), (2, 3, 1)])
    assert torch.autograd.gradcheck(lambda a, w: RMSNorm.forward(_with(norm, w), a),
                                    (x, norm.weight))


def _with(norm, weight):
    class View:
        eps = norm.eps
    view = View()
    view.weight = weight
    return view


def test_tied_weights_stay_tied_after_materialize():
    spec = _small("gpt")
    with torch.device("meta"):
        model = Transformer(spec)
    materialize(model, "cpu")
    assert model.head.output.weight is model.embed.wte.weight
