"""Real-text data: the stdlib corpus, user files, .bin tokens, sharding and the held-out split;
special files refused, reads bounded by the cap."""

import os

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


def _refused_in_time(path, match: str) -> None:
    """load_tokens(path) refuses with `match`; a FIFO must not block it (a reader blocks until
    a writer opens the FIFO, so a regression would hang: the writer side unblocks it)."""
    import threading
    result = {}

    def load():
        try:
            load_tokens(path)
        except ValueError as exc:
            result["error"] = str(exc)
    worker = threading.Thread(target=load, daemon=True)
    worker.start()
    worker.join(10)
    if worker.is_alive():
        with open(path, "wb"):
            pass
        worker.join(10)
        pytest.fail(f"load_tokens({path}) blocked")
    assert match in result.get("error", ""), result


def test_special_files_are_refused_not_read(tmp_path):
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    _refused_in_time(fifo, f"data path {fifo} is not a regular file or a directory (a FIFO)")
    _refused_in_time("/dev/zero", "is not a regular file or a directory (a character device)")
    link = tmp_path / "zero.bin"
    link.symlink_to("/dev/zero")
    _refused_in_time(link, "(a character device)")


def test_special_files_inside_a_directory_are_skipped(tmp_path):
    (tmp_path / "a.txt").write_text("text " * 100)
    os.mkfifo(tmp_path / "b.fifo")
    (tmp_path / "c.txt").symlink_to("/dev/zero")
    assert bytes(load_tokens(tmp_path)) == b"text " * 100


def test_reading_stops_at_the_cap(tmp_path):
    """A 3 GiB (sparse) text file with a 1 MiB cap: 1 MiB read, a few MiB allocated at most."""
    import tracemalloc
    big = tmp_path / "big.txt"
    with open(big, "wb") as f:
        f.write(b"hello ")
        f.truncate(3 << 30)
    tracemalloc.start()
    try:
        tokens = load_tokens(big, cap_bytes=1 << 20)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert len(tokens) == 1 << 20 and bytes(tokens[:6]) == b"hello "
    assert peak < 4 << 20, peak
    # a directory: the cap is over all its files together
    (tmp_path / "small.txt").write_text("x" * 1000)
    assert len(load_tokens(tmp_path, cap_bytes=1500)) == 1500


def test_bin_ids_checked_in_chunks(tmp_path, monkeypatch):
    import runtime.data
    monkeypatch.setattr(runtime.data, "BIN_CHUNK_TOKENS", 7)
    ids = np.zeros(50, dtype=np.uint16)
    ids[49] = 300  # in the last, partial chunk
    ids.tofile(tmp_path / "tok.bin")
    with pytest.raises(ValueError, match="token id 300 >= the model's vocab_size 256"):
        load_tokens(tmp_path / "tok.bin", vocab_size=256)
    assert np.array_equal(load_tokens(tmp_path / "tok.bin", vocab_size=301), ids)
    (tmp_path / "empty.bin").write_bytes(b"")
    assert len(load_tokens(tmp_path / "empty.bin")) == 0


def test_uint32_bin_for_vocabularies_above_uint16(tmp_path):
    """Llama 3's 128,256 ids need uint32: NAME.uint32.bin; the name's width must fit the
    vocabulary, either way, and the file must hold whole ids."""
    ids = (np.arange(3000, dtype=np.uint32) * 97) % 128_256
    assert ids.max() > 65_535
    ids.tofile(tmp_path / "llama3.uint32.bin")
    got = load_tokens(tmp_path / "llama3.uint32.bin", vocab_size=128_256)
    assert got.dtype == np.uint32 and np.array_equal(got, ids)
    with pytest.raises(ValueError, match=f"token id {ids.max()} >= the model's vocab_size 100000"):
        load_tokens(tmp_path / "llama3.uint32.bin", vocab_size=100_000)
    small = np.arange(600, dtype=np.uint16)
    small.tofile(tmp_path / "gpt2.uint16.bin")
    assert np.array_equal(load_tokens(tmp_path / "gpt2.uint16.bin", vocab_size=50_257), small)
    small.tofile(tmp_path / "gpt2.bin")
    with pytest.raises(ValueError) as exc:
        load_tokens(tmp_path / "gpt2.bin", vocab_size=128_256)
    assert str(exc.value) == (f"data {tmp_path}/gpt2.bin holds uint16 token ids but the model's "
                              f"vocab_size 128,256 needs uint32 ids (above 65,536); write the "
                              f"tokens as uint32 and name the file gpt2.uint32.bin")
    with pytest.raises(ValueError, match="holds uint32 token ids but the model's vocab_size "
                                         "50,257 fits uint16"):
        load_tokens(tmp_path / "llama3.uint32.bin", vocab_size=50_257)
    (tmp_path / "cut.uint32.bin").write_bytes(ids.tobytes()[:-1])
    with pytest.raises(ValueError, match="not a whole number of uint32 token ids"):
        load_tokens(tmp_path / "cut.uint32.bin", vocab_size=128_256)


def test_uint32_windows_are_int64_ids(tmp_path):
    ids = np.arange(5000, dtype=np.uint32) + 100_000
    ids.tofile(tmp_path / "big.uint32.bin")
    tokens = load_tokens(tmp_path / "big.uint32.bin", vocab_size=128_256)
    data = TokenData(tokens, 16, Layout(micro_batch=2, num_microbatches=1), 0,
                     vocab_size=128_256)
    x, y = data.batch(0)
    assert x.dtype == torch.int64 and int(x.min()) >= 100_000
    assert torch.equal(x[:, 1:], y[:, :-1])
