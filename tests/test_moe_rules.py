"""Layout rules of expert parallelism (planner/rules.py) and the runtime-model refusal."""

import pytest

from planner.hardware import load_cluster
from planner.job import Job
from planner.plan import Layout, layout_errors
from planner.presets import MODEL_PRESETS
from planner.runtime_support import runtime_gaps


def _errors(model, nodes=1, engine="megatron", **layout):
    job = Job(global_batch=layout.pop("batch", 64), seq_len=4096, engine=engine)
    return layout_errors(MODEL_PRESETS[model], load_cluster("h100-80g", nodes), job,
                         Layout(**layout))


def test_ep_and_etp_constraints_name_their_numbers():
    assert _errors("mixtral-8x7b", dp=8, ep=8, micro_batch=8) == []
    assert _errors("mixtral-8x7b", dp=8, ep=4, etp=2, micro_batch=8) == []
    errs = _errors("mixtral-8x7b", dp=8, ep=3, micro_batch=8)
    assert "ep=3 must divide the 8 routed experts of mixtral-8x7b" in errs[0]
    errs = _errors("mixtral-8x7b", tp=2, dp=4, ep=8, etp=2, micro_batch=16,
                   sequence_parallel=True)
    assert errs == ["ep*etp = 8*2 = 16 must divide the dense group tp*dp = 2*4 = 8 (experts "
                    "fold over the same GPUs)"]
    errs = _errors("qwen3-30b-a3b", dp=8, etp=8, micro_batch=8)
    assert errs == []  # 768 / 8
    errs = _errors("mixtral-8x7b", dp=8, ep=2, etp=4, micro_batch=8)
    assert errs == []
    errs = _errors("gpt-oss-120b", dp=8, etp=8, micro_batch=8)
    assert "etp=8 must divide expert_ffn_hidden_size 2880" not in " ".join(errs)  # 2880/8 = 360
    errs = _errors("gpt-oss-120b", dp=8, etp=7, micro_batch=8)  # 7 does not divide 2880
    assert any("etp=7 must divide expert_ffn_hidden_size 2880" in e for e in errs)


def test_dense_models_refuse_ep():
    assert _errors("llama3-8b", dp=8, ep=2, micro_batch=8)[0] == \
        "ep=2 etp=1: model llama3-8b has no experts (ep and etp need an MoE model)"


def test_engines_that_cannot_split_experts_say_so():
    errs = _errors("mixtral-8x7b", engine="deepspeed", dp=8, ep=8, micro_batch=8)
    assert any("ep=8: the deepspeed engine has no expert parallelism" in e for e in errs)
    errs = _errors("mixtral-8x7b", engine="torch", dp=8, etp=2, micro_batch=8)
    assert any("etp=2: the torch engine keeps each expert whole" in e for e in errs)
    errs = _errors("mixtral-8x7b", engine="torch", tp=4, dp=2, ep=4, micro_batch=32)
    assert any("ep=4 must divide dp=2: the torch engine's expert-parallel groups" in e
               for e in errs)


@pytest.mark.parametrize("name, gap", [
    ("deepseek-v3", "mla (multi-head latent attention)"),
    ("qwen3-30b-a3b", "qk_norm (per-head q/k RMSNorm)"),
    ("gpt-oss-120b", "attention_sinks"),
])
def test_the_runtime_model_refuses_what_it_cannot_build(name, gap):
    assert any(gap in g for g in runtime_gaps(MODEL_PRESETS[name]))
    errs = _errors(name, engine="torch", dp=8, micro_batch=8)
    assert errs[0].startswith(f"the torch engine trains runtime/model.py, which cannot build "
                              f"{name}: ")
    assert gap in errs[0] and errs[0].endswith("(plan it with --engine megatron)")
    assert not any("runtime/model.py" in e for e in _errors(name, dp=8, micro_batch=8))


def test_dense_presets_have_no_runtime_gaps():
    for name in ("tiny", "gpt2-124m", "llama3-8b", "bert-base"):
        assert runtime_gaps(MODEL_PRESETS[name]) == []
