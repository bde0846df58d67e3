"""--trace-activations (planner/traced.py): the bytes a transformers model saves for backward,
traced on the meta device, equal those of the same model run on real CPU tensors; linear in the
micro-batch as the memory model assumes; cached; and used by estimate/suggest."""

import json
import subprocess
import sys

import pytest

pytest.importorskip("transformers")

from planner import traced  # noqa: E402
from planner.cost.traced_bytes import TracedActivations  # noqa: E402

TINY = {
    "gpt2": {"model_type": "gpt2", "n_layer": 2, "n_embd": 64, "n_head": 4, "vocab_size": 128,
             "n_positions": 64, "resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0},
    "llama": {"model_type": "llama", "num_hidden_layers": 2, "hidden_size": 64,
              "num_attention_heads": 4, "num_key_value_heads": 2, "intermediate_size": 128,
              "vocab_size": 128, "max_position_embeddings": 64},
    "bert": {"model_type": "bert", "num_hidden_layers": 2, "hidden_size": 64,
             "num_attention_heads": 4, "intermediate_size": 128, "vocab_size": 128,
             "max_position_embeddings": 64, "hidden_dropout_prob": 0.0,
             "attention_probs_dropout_prob": 0.0},
}


@pytest.mark.parametrize("family", sorted(TINY))
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_meta_trace_equals_real_tensors(family, precision):
    args = (TINY[family], 1, 2, 32, precision, "eager")
    meta = traced.saved_bytes(*args)
    cpu = traced.saved_bytes(*args, device="cpu")
    assert meta > 0
    if precision == "bf16" and family != "llama":
        # one known difference: a 16-bit LayerNorm's mean and rstd are fp32 on meta (as the
        # CUDA kernel returns them) and 16-bit on the CPU kernel: 2 bytes x 2 stats per token
        tokens = 2 * 32
        assert meta > cpu and (meta - cpu) % (2 * 2 * tokens) == 0
    else:
        assert meta == cpu


@pytest.mark.parametrize("family", sorted(TINY))
def test_linear_in_micro_batch_and_layers(family, tmp_path, monkeypatch):
    monkeypatch.setenv(traced.CACHE_ENV, str(tmp_path))
    t = traced.trace(TINY[family], seq_len=32, precision="bf16")
    for layers, b in ((3, 4), (4, 2)):
        got = traced.saved_bytes(TINY[family], layers, b, 32, "bf16", "flash")
        assert got == layers * t._at(t.layer_bytes, b) + t._at(t.rest_bytes, b)
    assert 2 * t.layer_bytes[1] == 3 * t.layer_bytes[0]  # a layer keeps nothing batch-free
    one = traced.saved_bytes(TINY[family], 1, 1, 32, "bf16", "flash")
    assert abs(one - t._at(t.layer_bytes, 1) - t._at(t.rest_bytes, 1)) <= 8  # shifted labels


def test_flash_contract_keeps_no_score_matrix(tmp_path, monkeypatch):
    monkeypatch.setenv(traced.CACHE_ENV, str(tmp_path))
    flash = traced.trace(TINY["llama"], seq_len=64, precision="bf16", attention="flash")
    eager = traced.trace(TINY["llama"], seq_len=64, precision="bf16", attention="eager")
    heads, s = 4, 64
    # eager keeps the bf16 softmax probabilities (b x heads x s x s) at least
    assert eager.layer_bytes[0] - flash.layer_bytes[0] >= 2 * heads * s * s


def test_results_are_cached_by_config_hash(tmp_path, monkeypatch):
    monkeypatch.setenv(traced.CACHE_ENV, str(tmp_path))
    first = traced.trace(TINY["gpt2"], seq_len=32, precision="fp32")
    files = list(tmp_path.glob("*.json"))
    assert len(files) == 1
    assert TracedActivations.from_dict(json.loads(files[0].read_text())) == first
    monkeypatch.setattr(traced, "saved_bytes", lambda *a, **k: pytest.fail("traced again"))
    assert traced.trace(TINY["gpt2"], seq_len=32, precision="fp32") == first
    with pytest.raises(pytest.fail.Exception):  # another shape is another entry
        traced.trace(TINY["gpt2"], seq_len=16, precision="fp32")


def test_unknown_family_and_missing_transformers_are_one_line(monkeypatch):
    with pytest.raises(ValueError, match=r"^--trace-activations: model_type 't5' is not a "
                                         r"family it traces \(known: bert, gemma"):
        traced.trace({"model_type": "t5"}, seq_len=8, precision="bf16")
    monkeypatch.setitem(sys.modules, "transformers", None)
    with pytest.raises(ValueError, match=r"^--trace-activations needs the transformers package"):
        traced.trace(TINY["gpt2"], seq_len=8, precision="bf16")


def _cli(*argv, cache):
    import os
    env = {**os.environ, traced.CACHE_ENV: str(cache)}
    return subprocess.run([sys.executable, "-m", "planner.cli", *argv], capture_output=True,
                          text=True, env=env)


def test_estimate_uses_the_traced_bytes_and_reports_both(tmp_path):
    cfg = tmp_path / "config.json"
    cfg.write_text(json.dumps(TINY["gpt2"]))
    argv = ["estimate", "--model", str(cfg), "--cluster", "a100-80g", "--gpus", "1",
            "--global-batch", "4", "--seq-len", "32", "--micro-batch", "2", "--json"]
    plain = json.loads(_cli(*argv, cache=tmp_path).stdout)
    out = _cli(*argv, "--trace-activations", cache=tmp_path)
    assert out.returncode == 0, out.stderr
    got = json.loads(out.stdout)
    t = got["traced_activations"]
    assert t["layer_traced_bytes"] > t["layer_analytic_bytes"]  # tanh GELU, fp32 paths
    per_mb = got["memory"]["activation_bytes_per_microbatch"]
    assert per_mb == pytest.approx(2 * t["layer_traced_bytes"] + t["rest_traced_bytes"])
    assert plain["memory"]["activation_bytes_per_microbatch"] == pytest.approx(
        2 * t["layer_analytic_bytes"] + t["rest_analytic_bytes"])
    text = _cli(*argv[:-1], "--trace-activations", cache=tmp_path).stdout
    assert "activations traced from transformers GPT2LMHeadModel" in text
    assert "traced vs" in text and "analytic" in text


def test_suggest_with_trace_activations(tmp_path):
    out = _cli("suggest", "--model", "tiny-gpt", "--cluster", "a100-80g", "--gpus", "2",
               "--global-batch", "8", "--seq-len", "64", "--trace-activations", "--top", "2",
               cache=tmp_path)
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("activations traced from transformers GPT2LMHeadModel")


def test_planner_without_the_flag_imports_no_tracer():
    code = ("import sys; from planner.cli import main; main(['estimate', '--model', 'tiny', "
            "'--cluster', 'a100-80g', '--gpus', '1', '--global-batch', '1', '--seq-len', "
            "'32']); print([m for m in ('torch', 'transformers', 'planner.traced') "
            "if m in sys.modules])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True)
    assert out.stdout.strip().splitlines()[-1] == "[]"
