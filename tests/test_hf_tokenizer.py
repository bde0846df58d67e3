"""--tokenizer: text tokenised with a tokenizer.json the test trains (tokenizers' BPE trainer on
generated text); and a two-rank run from a Hugging Face checkpoint with its tokenizer, whose
first loss is transformers' loss on the same batch."""

import json
import random

import numpy as np
import pytest
from hf_models import hf_model, save, spec_of
from runtime_dist import Layout, make_plan, run_world
from test_runtime_train import _main_rank

from runtime.data import TokenData, load_tokenizer, load_tokens, mask_token_id

VOCAB = 96  # the tiny models' vocabulary
SPECIALS = ["[UNK]", "[MASK]"]


def _text(lines: int = 400, seed: int = 0) -> str:
    rng = random.Random(seed)
    words = ["".join(rng.choice("abcdefghij") for _ in range(rng.randint(2, 6)))
             for _ in range(60)]
    return "\n".join(" ".join(rng.choice(words) for _ in range(12)) for _ in range(lines)) + "\n"


def _train_tokenizer(path, vocab_size: int = 80):
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    tok = Tokenizer(models.BPE(unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator(_text().splitlines(), trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=SPECIALS, show_progress=False))
    path.mkdir()
    tok.save(str(path / "tokenizer.json"))
    return tok


@pytest.fixture
def corpus(tmp_path):
    tok = _train_tokenizer(tmp_path / "tok")
    data = tmp_path / "corpus.txt"
    data.write_text(_text(seed=1))
    return tok, tmp_path / "tok", data


def test_text_is_tokenised_with_the_trained_tokenizer(corpus):
    tok, tok_dir, data = corpus
    loaded = load_tokenizer(tok_dir, VOCAB)
    ids = load_tokens(data, VOCAB, 1 << 20, tokenizer=loaded)
    want = tok.encode(data.read_text(), add_special_tokens=False).ids
    assert ids.dtype == np.uint16 and ids.tolist() == want
    assert len(ids) < len("".join(data.read_text().split()))  # merges, not characters
    assert 0 < int(ids.max()) < 80
    assert mask_token_id(loaded, VOCAB) == tok.token_to_id("[MASK]") == 1


def test_vocabulary_larger_than_the_model_is_one_line(corpus):
    _, tok_dir, _ = corpus
    with pytest.raises(ValueError) as err:
        load_tokenizer(tok_dir / "tokenizer.json", 64)
    assert str(err.value) == (f"--tokenizer {tok_dir / 'tokenizer.json'} has 80 tokens but "
                              f"the model's vocab_size is 64")


def test_bad_tokenizer_paths_are_one_line(tmp_path, corpus):
    _, tok_dir, _ = corpus
    with pytest.raises(ValueError, match="no tokenizer.json there"):
        load_tokenizer(tmp_path / "nowhere", VOCAB)
    junk = tmp_path / "junk.json"
    junk.write_text("{}")
    with pytest.raises(ValueError, match="junk.json is not a tokenizer file"):
        load_tokenizer(junk, VOCAB)
    ids = tmp_path / "ids.bin"
    np.arange(100, dtype="<u2").tofile(ids)
    with pytest.raises(ValueError, match="holds token ids already; --tokenizer applies"):
        load_tokens(ids, VOCAB, tokenizer=load_tokenizer(tok_dir, VOCAB))


def test_two_rank_run_from_checkpoint_starts_at_transformers_loss(tmp_path, corpus):
    import torch
    import torch.nn.functional as F
    tok, tok_dir, data = corpus
    model = hf_model("gpt2")
    ckpt = save(model, tmp_path / "gpt2")
    layout = Layout(tp=2, micro_batch=2)
    plan = make_plan(layout, spec=spec_of(ckpt))
    plan.save(tmp_path / "plan.json")
    metrics = tmp_path / "m.jsonl"
    argv = ["--plan", str(tmp_path / "plan.json"), "--steps", "2", "--data", str(data),
            "--tokenizer", str(tok_dir), "--init-from", str(ckpt), "--metrics", str(metrics),
            "--timeout", "30", "--lr", "1e-4"]
    results = run_world(2, _main_rank, argv, timeout_s=120)
    assert [r[0] for r in results] == [0, 0], results[0][1]
    assert "weights from" in results[0][2]
    first = json.loads(metrics.read_text().splitlines()[0])["loss"]
    tokens = load_tokens(data, VOCAB, 8 << 20, tokenizer=load_tokenizer(tok_dir, VOCAB))
    x, y = TokenData(tokens, plan.job.seq_len, layout, 0, vocab_size=VOCAB).batch(0)
    with torch.no_grad():
        want = F.cross_entropy(model(x).logits.flatten(0, 1), y.flatten()).item()
    assert abs(first - want) < 1e-5


def test_classify_records_are_encoded_with_the_tokenizers_template(tmp_path):
    from benchmarks.hf_journey import train_tokenizer, write_data
    from planner.hardware import load_cluster
    from planner.job import Job
    from planner.plan import Plan
    from runtime.train import RunConfig, load_data
    samples = write_data(tmp_path / "train.csv", rows=50)
    train_tokenizer([t for t, _ in samples], tmp_path)
    tok = load_tokenizer(tmp_path, 128)
    path = save(hf_model("bert", vocab_size=128), tmp_path / "bert")
    plan = Plan(model=spec_of(path), cluster=load_cluster("cpu", 1, num_gpus=1),
                job=Job(global_batch=2, seq_len=32, precision="fp32", task="classify"),
                layout=Layout(micro_batch=2))
    got = load_data(plan, RunConfig(steps=1, data=str(tmp_path / "train.csv"),
                                    tokenizer=str(tmp_path)))
    x, y = got[0]
    ids = tok.encode(samples[0][0]).ids
    assert ids[0] == tok.token_to_id("[CLS]") and ids[-1] == tok.token_to_id("[SEP]")
    assert x[:len(ids)].tolist() == ids
    assert y[0] == samples[0][1] and (y[1:] == -100).all()  # the label at [CLS]
