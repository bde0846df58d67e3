"""Real text as tokens, sharded by data-parallel rank, deterministic, with a held-out split.

Default corpus: this Python's own standard-library sources (always present, no download), read
in sorted path order up to a byte cap, tokenised byte-level (ids 0-255, valid for any vocabulary
of at least 256). `--data PATH` takes a text file, a directory of text files, or a `.bin` of
token ids whose name says their width: `NAME.bin` or `NAME.uint16.bin` holds uint16 ids (the
nanoGPT format), `NAME.uint32.bin` uint32 ids (little-endian, no header), for vocabularies
above 65,536 (Llama 3, Qwen, Gemma). The width must fit the model's vocabulary: uint16 for a
vocabulary of at most 65,536 ids, uint32 above; a mismatch is refused (BIN_DTYPES). Sample k of
the run is window perm_e[k mod W] of the training split, e = k div W, with a seeded permutation
per epoch; so the data position is the step.

`--tokenizer DIR` (a `tokenizer.json`, or a directory holding one, read with the `tokenizers`
package) tokenises the text instead of taking its bytes: each file is decoded as UTF-8 and
encoded in chunks of whole lines; the tokenizer's vocabulary must fit the model's.

Only regular files are read (a FIFO, a device such as /dev/zero or a socket is refused, never
opened for reading), and never more than the byte cap of each."""

import os
import stat
import sysconfig
from pathlib import Path

import numpy as np
import torch

DEFAULT_CAP_BYTES = 8 << 20
BIN_CHUNK_TOKENS = 8 << 20  # tokens per read when checking a .bin file's ids
VAL_FRACTION = 0.05
UINT16_IDS = 1 << 16  # ids 0..65535
# the suffix before .bin -> its dtype (little-endian, as numpy writes on x86 and ARM)
BIN_DTYPES: dict[str, np.dtype] = {"uint16": np.dtype("<u2"), "uint32": np.dtype("<u4")}
MLM_PROBABILITY = 0.15  # Devlin et al. 2019, Sec. 3.1


def stdlib_files() -> list:
    root = Path(sysconfig.get_paths()["stdlib"])
    return sorted(p for p in root.rglob("*.py")
                  if not {"site-packages", "dist-packages"} & set(p.parts))


def check_data_path(path) -> Path:
    """`path` if it is a regular file or a directory (symlinks followed); else ValueError."""
    p = Path(path)
    try:
        mode = p.stat().st_mode
    except FileNotFoundError:
        raise ValueError(f"data path not found: {path}") from None
    except OSError as exc:
        raise ValueError(f"data path {path} is unreadable: {exc.strerror}") from None
    if not (stat.S_ISREG(mode) or stat.S_ISDIR(mode)):
        raise ValueError(f"data path {path} is not a regular file or a directory "
                         f"({_kind(mode)})")
    return p


def _kind(mode: int) -> str:
    for test, name in ((stat.S_ISFIFO, "a FIFO"), (stat.S_ISCHR, "a character device"),
                       (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket")):
        if test(mode):
            return name
    return "a special file"


def read_prefix(path, limit: int) -> bytes:
    """At most `limit` bytes from the start of a regular file. Opened non-blocking and checked
    on the open descriptor, so a FIFO or device swapped in after a check is refused too."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise ValueError(f"data path {path} is not a regular file ({_kind(st.st_mode)})")
        want = min(limit, st.st_size)
        chunks, got = [], 0
        while got < want:
            chunk = os.read(fd, min(want - got, 1 << 20))
            if not chunk:
                break
            chunks.append(chunk)
            got += len(chunk)
        return b"".join(chunks)
    finally:
        os.close(fd)


def _read_files(files, cap_bytes: int) -> np.ndarray:
    chunks, size = [], 0
    for path in files:
        if size >= cap_bytes:
            break
        try:
            data = read_prefix(path, cap_bytes - size)
        except (OSError, ValueError):
            continue  # unreadable or special files inside a directory are skipped
        chunks.append(np.frombuffer(data, dtype=np.uint8))
        size += len(data)
    return np.concatenate(chunks) if chunks else np.zeros(0, dtype=np.uint8)


def load_tokens(path=None, vocab_size: int = 256, cap_bytes: int = DEFAULT_CAP_BYTES,
                tokenizer=None):
    """Token ids as a numpy array (uint8 for bytes, uint16 or uint32 for a .bin file or text
    through `tokenizer`, a tokenizers.Tokenizer)."""
    top = None
    if path is None:
        tokens = _read_files(stdlib_files(), cap_bytes)
        source = "the Python standard library"
    else:
        p = check_data_path(path)
        try:
            if p.is_dir():
                tokens = _read_files(sorted(f for f in p.rglob("*") if f.is_file()), cap_bytes)
            elif p.suffix == ".bin":
                if tokenizer is not None:
                    raise ValueError(f"data {p} holds token ids already; --tokenizer applies "
                                     f"to text data")
                tokens, top = _read_bin(p, bin_dtype(p, vocab_size))
            else:
                tokens = np.frombuffer(read_prefix(p, cap_bytes), dtype=np.uint8)
        except OSError as exc:
            raise ValueError(f"data path {path} is unreadable: {exc.strerror or exc}") from None
        source = str(path)
    if tokenizer is not None:
        tokens = encode_bytes(tokenizer, tokens, vocab_size)
    if vocab_size < 256 and tokens.dtype == np.uint8:
        raise ValueError(f"byte-level tokens need vocab_size >= 256, the model has {vocab_size}")
    if top is None:
        top = int(tokens.max()) if len(tokens) else -1
    if top >= vocab_size:
        raise ValueError(f"data {source} has token id {top} >= the model's "
                         f"vocab_size {vocab_size}")
    return tokens


TOKENIZER_FILE = "tokenizer.json"
ENCODE_CHUNK_BYTES = 1 << 16  # text per encode_batch item, cut at a line end


def load_tokenizer(path, vocab_size: int):
    """A `tokenizers.Tokenizer` from tokenizer.json (or a directory holding one), if its
    vocabulary (with added tokens) fits the model's `vocab_size`; else a one-line ValueError."""
    p = Path(path)
    file = p / TOKENIZER_FILE if p.is_dir() else p
    if not file.is_file():
        raise ValueError(f"--tokenizer {path}: no {TOKENIZER_FILE} there")
    try:
        from tokenizers import Tokenizer
    except ImportError:
        raise ValueError("--tokenizer needs the tokenizers package (pip install "
                         "'parallel-planner[hf]')") from None
    try:
        tok = Tokenizer.from_file(str(file))
    except Exception as exc:  # noqa: BLE001 - the Rust parser's errors have no common type
        raise ValueError(f"--tokenizer {path}: {file.name} is not a tokenizer file "
                         f"({str(exc).splitlines()[0] if str(exc) else type(exc).__name__})"
                         ) from None
    size = tok.get_vocab_size(with_added_tokens=True)
    if size > vocab_size:
        raise ValueError(f"--tokenizer {path} has {size:,} tokens but the model's vocab_size "
                         f"is {vocab_size:,}")
    return tok


def mask_token_id(tokenizer, vocab_size: int) -> int:
    """The id masked-LM inputs use: the tokenizer's [MASK] (or <mask>), else vocab_size - 1."""
    if tokenizer is not None:
        for name in ("[MASK]", "<mask>"):
            tid = tokenizer.token_to_id(name)
            if tid is not None:
                return tid
    return vocab_size - 1


def _line_chunks(text: str, size: int) -> list:
    chunks, start = [], 0
    while start < len(text):
        end = text.find("\n", start + size)
        end = len(text) if end < 0 else end + 1
        chunks.append(text[start:end])
        start = end
    return chunks


def encode_bytes(tokenizer, data: np.ndarray, vocab_size: int) -> np.ndarray:
    """UTF-8 text (bytes as uint8) -> token ids, uint16 when the vocabulary fits, else uint32."""
    text = data.tobytes().decode("utf-8", errors="replace")
    ids = [e.ids for e in tokenizer.encode_batch(_line_chunks(text, ENCODE_CHUNK_BYTES),
                                                 add_special_tokens=False)]
    dtype = BIN_DTYPES["uint16"] if vocab_size <= UINT16_IDS else BIN_DTYPES["uint32"]
    flat = [i for chunk in ids for i in chunk]
    return np.asarray(flat, dtype=dtype)


def bin_dtype(p: Path, vocab_size: int) -> np.dtype:
    """The id width a .bin file's name says (NAME.bin, NAME.uint16.bin: uint16;
    NAME.uint32.bin: uint32), refused in one line if it does not fit `vocab_size`."""
    width = Path(p.stem).suffix.lstrip(".")
    if width not in BIN_DTYPES:
        width = "uint16"  # a plain NAME.bin is nanoGPT's uint16 format
    if width == "uint16" and vocab_size > UINT16_IDS:
        raise ValueError(f"data {p} holds uint16 token ids but the model's vocab_size "
                         f"{vocab_size:,} needs uint32 ids (above {UINT16_IDS:,}); write the "
                         f"tokens as uint32 and name the file {Path(p.stem).stem}.uint32.bin")
    if width == "uint32" and vocab_size <= UINT16_IDS:
        raise ValueError(f"data {p} holds uint32 token ids but the model's vocab_size "
                         f"{vocab_size:,} fits uint16 (at most {UINT16_IDS:,}); is it "
                         f"tokenised for another model? (uint16 files: NAME.bin)")
    return BIN_DTYPES[width]


def _read_bin(p: Path, dtype: np.dtype = BIN_DTYPES["uint16"]) -> tuple:
    """(token ids of `dtype` memory-mapped, the largest id). The largest id is found with
    plain reads of bounded chunks, so checking a big file does not map all of it into the
    process."""
    fd = os.open(p, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise ValueError(f"data path {p} is not a regular file ({_kind(st.st_mode)})")
        if st.st_size % dtype.itemsize:
            raise ValueError(f"data {p} has {st.st_size:,} bytes, not a whole number of "
                             f"{dtype.name} token ids ({dtype.itemsize} bytes each)")
        count, top = st.st_size // dtype.itemsize, -1
        with os.fdopen(os.dup(fd), "rb", buffering=0) as f:
            for start in range(0, count, BIN_CHUNK_TOKENS):
                chunk = np.frombuffer(
                    f.read(dtype.itemsize * min(BIN_CHUNK_TOKENS, count - start)), dtype=dtype)
                if len(chunk):
                    top = max(top, int(chunk.max()))
    finally:
        os.close(fd)
    if count == 0:
        return np.zeros(0, dtype=dtype), top
    return np.memmap(p, dtype=dtype, mode="r", shape=(count,)), top


class TokenData:
    """Fixed-length windows of a token stream for one data-parallel rank."""

    def __init__(self, tokens, seq_len: int, layout, dp_rank: int, *, causal: bool = True,
                 vocab_size: int = 256, seed: int = 0, mask_id: int | None = None):
        n_val = max(seq_len + 1, int(len(tokens) * VAL_FRACTION))
        if len(tokens) < n_val + 2 * (seq_len + 1):
            raise ValueError(f"data has {len(tokens)} tokens; need at least "
                             f"{n_val + 2 * (seq_len + 1)} for sequence length {seq_len}")
        self.train, self.val = tokens[:len(tokens) - n_val], tokens[len(tokens) - n_val:]
        self.seq_len, self.causal, self.seed = seq_len, causal, seed
        # 0xFF for bytes: never occurs in UTF-8 text; a tokenizer's own [MASK] otherwise
        self.mask_id = vocab_size - 1 if mask_id is None else mask_id
        self.per_rank = layout.micro_batch * layout.num_microbatches
        self.global_batch = self.per_rank * layout.dp
        self.offset = dp_rank * self.per_rank
        self.windows = (len(self.train) - 1) // seq_len
        self._perm: dict = {}

    def _window(self, split, start: int) -> torch.Tensor:
        return torch.from_numpy(np.asarray(split[start:start + self.seq_len + 1],
                                           dtype=np.int64))

    def _train_start(self, k: int) -> int:
        epoch, i = divmod(k, self.windows)
        if epoch not in self._perm:
            gen = torch.Generator().manual_seed(self.seed * 7919 + epoch)
            self._perm = {epoch: torch.randperm(self.windows, generator=gen)}
        return int(self._perm[epoch][i]) * self.seq_len

    def _sample(self, window: torch.Tensor, k: int) -> tuple:
        if self.causal:
            return window[:-1], window[1:]
        x = window[:-1].clone()  # BERT: masked-LM on the same positions
        gen = torch.Generator().manual_seed(self.seed * 104729 + k)
        masked = torch.rand(self.seq_len, generator=gen) < MLM_PROBABILITY
        masked[int(torch.randint(self.seq_len, (1,), generator=gen))] = True
        labels = torch.where(masked, x, torch.full_like(x, -100))
        x[masked] = self.mask_id
        return x, labels

    def batch(self, step: int) -> tuple:
        """(inputs, labels) of shape (micro_batch * num_microbatches, seq_len) for a step."""
        ks = [step * self.global_batch + self.offset + j for j in range(self.per_rank)]
        pairs = [self._sample(self._window(self.train, self._train_start(k)), k) for k in ks]
        return torch.stack([p[0] for p in pairs]), torch.stack([p[1] for p in pairs])

    def val_batch(self, index: int) -> tuple:
        """A held-out batch of the same shape (pipelines freeze shapes, RUNTIME_NOTES 5)."""
        windows = max(1, (len(self.val) - 1) // self.seq_len)
        ks = [index * self.global_batch + self.offset + j for j in range(self.per_rank)]
        pairs = [self._sample(self._window(self.val, (k % windows) * self.seq_len), 10**9 + k)
                 for k in ks]
        return torch.stack([p[0] for p in pairs]), torch.stack([p[1] for p in pairs])
