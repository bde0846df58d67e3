"""Real-text data: the stdlib corpus, user files, .bin tokens, sharding and the held-out split."""

import numpy as np
import pytest
import torch

from planner.plan import Layout
from runtime.data import TokenData, load_tokens, stdlib_files


def test_stdlib_corpus_is_deterministic_real_text():
    files = stdlib_files()
    assert files == sorted(files) and len(files) > 100
    tokens = load_tokens(cap_bytes=1 << 16)
    assert len(tokens) == 1 << 16 and tokens.dtype == np.uint8
    assert b"import" in tokens.tobytes() or b"def " in tokens.tobytes()
    assert np.array_equal(tokens, load_tokens(cap_bytes=1 << 16))


def test_user_text_file_dir_and_bin(tmp_path):
    (tmp_path / "a.txt").write_text("hello world\n" * 100)
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "b.txt").write_text("more text\n" * 100)
    assert bytes(load_tokens(tmp_path / "a.txt")[:5]) == b"hello"
    assert len(load_tokens(tmp_path)) == 1200 + 1000
    ids = np.arange(1000, dtype=np.uint16) % 500
    ids.tofile(tmp_path / "tok.bin")
    assert np.array_equal(load_tokens(tmp_path / "tok.bin", vocab_size=500), ids)
    with pytest.raises(ValueError, match="token id 499 >= the model's vocab_size 300"):
        load_tokens(tmp_path / "tok.bin", vocab_size=300)


def test_missing_data_path_is_one_line_error(tmp_path):
    with pytest.raises(ValueError, match="data path not found"):
        load_tokens(tmp_path / "nope.txt")


def _data(dp_rank, dp=2, causal=True):
    layout = Layout(dp=dp, micro_batch=2, num_microbatches=2)
    return TokenData(load_tokens(cap_bytes=1 << 18), 32, layout, dp_rank, causal=causal)


def test_batches_are_sharded_by_dp_rank_and_deterministic():
    a, b = _data(0), _data(1)
    xa, ya = a.batch(3)
    xb, _ = b.batch(3)
    assert xa.shape == (4, 32) and torch.equal(xa[:, 1:], ya[:, :-1])
    assert not torch.equal(xa, xb)
    assert torch.equal(xa, _data(0).batch(3)[0])
    # The two dp shards together are the single-process global batch, in rank order.
    whole = _data(0, dp=1)
    whole.per_rank, whole.global_batch = 8, 8
    assert torch.equal(torch.cat([xa, xb]), whole.batch(3)[0])


def test_validation_split_is_held_out():
    d = _data(0)
    tokens = load_tokens(cap_bytes=1 << 18)
    assert len(d.train) + len(d.val) == len(tokens)
    assert np.array_equal(np.asarray(d.val), tokens[len(d.train):])  # the tail, never trained on
    x, _ = d.val_batch(0)
    assert torch.equal(x[0], torch.from_numpy(tokens[len(d.train):][:32].astype(np.int64)))


def test_masked_lm_batches_for_bert():
    x, y = _data(0, causal=False).batch(0)
    masked = y != -100
    assert masked.any(dim=1).all()
    assert (x[masked] == 255).all() and (x[~masked] != 255).all()
