"""--init-from: a Hugging Face checkpoint (tiny, random, built and saved by the test) loaded into
the runtime's model gives transformers' logits, in one process and on every rank of TP, PP and
FSDP2 worlds, each rank reading only its own blocks."""

import dataclasses

import pytest
import torch
from hf_models import CONFIGS, hf_model, save, spec_of
from runtime_dist import Layout, make_plan, run_world

from runtime.hf_weights import Checkpoint, check_config, load_into
from runtime.model import Transformer, materialize

LOGIT_TOL = 1e-5  # fp32; observed <= 2e-7 (float reassociation of SDPA / fused GEMMs)
SEQ = 16


def _inputs(n: int = 2) -> torch.Tensor:
    return torch.randint(0, 96, (n, SEQ), generator=torch.Generator().manual_seed(1))


def _saved(tmp_path, family, **kw):
    model = hf_model(family)
    path = save(model, tmp_path / family, **kw)
    with torch.no_grad():
        want = model(_inputs()).logits
    return path, want


def _runtime_logits(path) -> torch.Tensor:
    spec = spec_of(path)
    with torch.device("meta"):
        model = Transformer(spec)
    materialize(model, "cpu", seed=3)
    report = load_into(model, Checkpoint(path, spec))
    assert report["kept"] == []
    assert len(report["loaded"]) == len(list(model.parameters()))
    with torch.no_grad():
        return model.eval()(_inputs())


@pytest.mark.parametrize("family", sorted(CONFIGS))
def test_one_process_logits_equal_transformers(tmp_path, family):
    path, want = _saved(tmp_path, family)
    got = _runtime_logits(path)
    assert want.abs().max() > 0.1  # not a degenerate model
    assert (got - want).abs().max() < LOGIT_TOL


def test_sharded_checkpoint_with_index(tmp_path):
    path, want = _saved(tmp_path, "llama", max_shard_size="20KB")
    assert (path / "model.safetensors.index.json").is_file()
    assert len(list(path.glob("*.safetensors"))) > 2
    assert (_runtime_logits(path) - want).abs().max() < LOGIT_TOL


def test_mismatched_config_names_the_first_field(tmp_path):
    path, _ = _saved(tmp_path, "llama")
    spec = dataclasses.replace(spec_of(path), ffn_hidden_size=128)
    with pytest.raises(ValueError) as err:
        check_config(path, spec)
    msg = str(err.value)
    assert "\n" not in msg
    assert msg.endswith("config.json has ffn_hidden_size 64 but the plan's model 'tiny' has "
                        "ffn_hidden_size 128")


def test_activation_the_runtime_does_not_compute_is_refused(tmp_path):
    path = save(hf_model("gpt2", activation_function="relu"), tmp_path / "relu")
    with pytest.raises(ValueError, match="activation_function 'relu': the runtime computes "
                                         "'gelu_new'"):
        check_config(path, spec_of(path))


def test_missing_body_tensor_is_named(tmp_path):
    from safetensors.torch import load_file, save_file
    path, _ = _saved(tmp_path, "llama")
    tensors = load_file(path / "model.safetensors")
    del tensors["model.layers.2.mlp.up_proj.weight"]
    save_file(tensors, path / "model.safetensors")
    with pytest.raises(ValueError, match="no tensor 'layers.2.mlp.up_proj.weight' for "
                                         "layers.2.mlp.up.weight"):
        _runtime_logits(path)


# --- parallel worlds ---------------------------------------------------------------------------

def _rank_logits(plan, path, inputs):
    """This rank's logits through its chunks (pipeline: hidden states sent to the next stage),
    and the checkpoint tensors it read (name -> block shape)."""
    import torch.distributed as dist
    from torch.distributed.tensor import DTensor

    from runtime.engine import Engine
    from runtime.mesh import init_distributed
    ctx = init_distributed(plan.layout, timeout_s=60)
    engine = Engine(plan, ctx, init_from=path)
    read = {}
    for part in engine.parts:
        for n, p in part.named_parameters():
            read[n] = tuple((p.to_local() if isinstance(p, DTensor) else p).shape)
    x = inputs
    pp, me = plan.layout.pp, ctx.pp_rank
    with torch.no_grad():
        if me > 0:
            x = torch.empty(inputs.shape + (plan.model.hidden_size,))
            dist.recv(x, src=ctx.rank_at(pp=me - 1))
        module = engine.modules[0].eval()
        out = module(x)
        if isinstance(out, DTensor):
            out = out.full_tensor()
        if me < pp - 1:
            dist.send(out.contiguous(), dst=ctx.rank_at(pp=me + 1))
            out = None
    return {"coords": dict(ctx.coords), "logits": out, "read": read}


WORLDS = {
    "tp2": Layout(tp=2, micro_batch=2),
    "tp2-sp": Layout(tp=2, micro_batch=2, sequence_parallel=True),
    "pp2": Layout(pp=2, micro_batch=1, num_microbatches=2, schedule="1f1b"),
    "fsdp2": Layout(dp=2, micro_batch=1, zero_stage=3),
    "tp2xfsdp2": Layout(dp=2, tp=2, micro_batch=1, zero_stage=3),
}


@pytest.mark.parametrize("family,world", [("llama", "tp2"), ("gpt2", "tp2-sp"),
                                          ("bert", "tp2"), ("gpt2", "pp2"),
                                          ("llama", "pp2"), ("llama", "fsdp2"),
                                          ("gpt2", "fsdp2"), ("llama", "tp2xfsdp2")])
def test_parallel_world_logits_equal_transformers(tmp_path, family, world):
    path, want = _saved(tmp_path, family)
    layout = WORLDS[world]
    plan = make_plan(layout, spec=spec_of(path))
    ranks = run_world(layout.world_size, _rank_logits, plan, str(path), _inputs())
    outs = [r["logits"] for r in ranks if r["logits"] is not None]
    assert len(outs) == layout.world_size // layout.pp
    for got in outs:
        assert (got - want).abs().max() < LOGIT_TOL
    full = dict(spec_of(path).to_dict())
    if layout.tp > 1 or layout.dp > 1:  # every rank holds only its shard of a q projection
        for r in ranks:
            rows = r["read"]["layers.0.attn.q.weight"][0]
            assert rows * layout.tp * layout.dp == full["hidden_size"]
    if layout.pp > 1:  # a stage holds only its layers
        layers = [sorted({n.split(".")[1] for n in r["read"] if n.startswith("layers.")})
                  for r in ranks]
        assert layers == [["0", "1"], ["2", "3"]]


def test_train_refuses_a_mismatched_checkpoint_before_any_process_group(tmp_path, capsys):
    from runtime.train import main
    path, _ = _saved(tmp_path, "gpt2")
    spec = dataclasses.replace(spec_of(path), num_layers=2)
    make_plan(Layout(micro_batch=2), spec=spec).save(tmp_path / "plan.json")
    capsys.readouterr()  # transformers' save progress
    code = main(["--plan", str(tmp_path / "plan.json"), "--steps", "1",
                 "--init-from", str(path)])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1, err
    assert "config.json has num_layers 4 but the plan's model 'tiny' has num_layers 2" in err


def _classify_rank(plan, path, inputs):
    from torch.distributed.tensor import DTensor

    from runtime.engine import Engine
    from runtime.mesh import init_distributed
    ctx = init_distributed(plan.layout, timeout_s=60)
    engine = Engine(plan, ctx, init_from=path)
    part = engine.parts[0]
    full = {n: (p.full_tensor() if isinstance(p, DTensor) else p).detach().clone()
            for n, p in part.named_parameters() if n.startswith("head.classifier.")}
    with torch.no_grad():
        out = engine.modules[0].eval()(inputs)
    return {"logits": out, "classifier": full, "kept": engine.init_report["kept"]}


def test_bert_classifier_reads_the_checkpoints_encoder_and_mlm_transform(tmp_path):
    """Classification from a BertForMaskedLM checkpoint (FSDP2, 2 ranks): the encoder and the
    MLM transform (dense, GELU, norm) come from the checkpoint, the new classifier is kept."""
    import torch.nn.functional as F

    from planner.hardware import load_cluster
    from planner.job import Job
    from planner.plan import Plan
    model = hf_model("bert")
    path = save(model, tmp_path / "bert")
    layout = Layout(dp=2, micro_batch=1, zero_stage=2)
    job = Job(global_batch=2, seq_len=32, precision="fp32", task="classify", num_labels=3)
    plan = Plan(model=spec_of(path), cluster=load_cluster("cpu", 1, num_gpus=2), job=job,
                layout=layout)
    ranks = run_world(2, _classify_rank, plan, str(path), _inputs())
    with torch.no_grad():
        hidden = model.bert(_inputs()).last_hidden_state
        features = model.cls.predictions.transform(hidden)
    for r in ranks:
        assert r["kept"] == ["head.classifier.weight", "head.classifier.bias"]
        c = r["classifier"]
        want = F.linear(features, c["head.classifier.weight"], c["head.classifier.bias"])
        assert r["logits"].shape == (2, SEQ, 3)
        assert (r["logits"] - want).abs().max() < LOGIT_TOL
