"""Fine-tuning data: sequence classification and supervised fine-tuning (planner/job.py task).

classify: a CSV (header with `text` and `label` columns) or JSONL file (one object per line with
`text` and `label`); labels are integers 0..num_labels-1 of the plan (`planner estimate|suggest
--num-labels`, default 2), or names, mapped to 0.. in sorted order; more distinct labels than
the plan's num_labels are refused.  Each text is tokenised, cut to seq_len and padded; the loss
and the accuracy read one pooled position (labels -100 elsewhere): the first token for an
encoder (BERT's [CLS] position), the last text token for a causal decoder (the only one that has
seen the whole text, as Hugging Face's *ForSequenceClassification pool decoders).

sft: JSONL with `prompt` and `response`; the model reads prompt + response and is trained on
the response tokens only (labels -100 on the prompt and the padding).

Tokens: the runtime's byte-level tokenizer (runtime/data.py: UTF-8 bytes, ids 0-255) unless an
`encode` callable is given.  Held out: the last tenth of the records (at least one)."""

import csv
import io
import json
from pathlib import Path

import numpy as np
import torch

from runtime.data import check_data_path, read_prefix

VAL_FRACTION = 0.1
PAD_ID = 0           # byte 0 (NUL) never occurs in text; padded positions carry label -100
IGNORE = -100        # torch.nn.functional.cross_entropy's ignore_index
FIELDS = {"classify": ("text", "label"), "sft": ("prompt", "response")}


def encode_bytes(text: str) -> list:
    return list(text.encode("utf-8"))


def read_records(path, task: str, cap_bytes: int) -> list:
    """[{field: value}] of a CSV or JSONL file; a record lacking a field is refused naming its
    line."""
    p = check_data_path(path)
    if p.is_dir():
        raise ValueError(f"--data {path}: task {task} reads one CSV or JSONL file, not a "
                         f"directory")
    text = read_prefix(p, cap_bytes).decode("utf-8", errors="replace")
    fields = FIELDS[task]
    if Path(p).suffix.lower() == ".csv":
        rows = list(csv.DictReader(io.StringIO(text)))
        start = 2  # line 1 is the header
    else:
        rows, start = [], 1
        for i, line in enumerate(text.splitlines()):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as exc:
                    raise ValueError(f"data {path} line {i + 1}: not JSON ({exc.msg})") from None
    for i, row in enumerate(rows):
        if not isinstance(row, dict) or any(row.get(f) is None for f in fields):
            raise ValueError(f"data {path} record {i + start}: needs fields "
                             f"{' and '.join(fields)} (task {task})")
    if len(rows) < 2:
        raise ValueError(f"data {path} has {len(rows)} record(s); task {task} needs at least 2 "
                         f"(one is held out)")
    return rows


def label_ids(rows: list, num_labels: int, path) -> list:
    """Integer labels as given (0..num_labels-1), or names in sorted order."""
    raw = [r["label"] for r in rows]
    if all(isinstance(v, int) or (isinstance(v, str) and v.strip().lstrip("-").isdigit())
           for v in raw):
        ids = [int(v) for v in raw]
        bad = next((v for v in ids if not 0 <= v < num_labels), None)
        if bad is not None:
            raise ValueError(f"data {path} has label {bad}; the plan's classifier has "
                             f"num_labels {num_labels} (labels 0..{num_labels - 1}; plan with "
                             f"--num-labels)")
        return ids
    names = sorted({str(v) for v in raw})
    if len(names) > num_labels:
        raise ValueError(f"data {path} has {len(names)} distinct labels; the plan's classifier "
                         f"has num_labels {num_labels} (plan with --num-labels {len(names)})")
    index = {n: i for i, n in enumerate(names)}
    return [index[str(v)] for v in raw]


class TaskData:
    """Fixed-shape (inputs, labels) batches of a record list for one data-parallel rank, in a
    seeded order per epoch, with the last tenth held out (same interface as TokenData)."""

    def __init__(self, samples: list, layout, dp_rank: int, seed: int = 0):
        n_val = max(1, int(len(samples) * VAL_FRACTION))
        self.train, self.val = samples[:-n_val], samples[-n_val:]
        self.per_rank = layout.micro_batch * layout.num_microbatches
        self.global_batch = self.per_rank * layout.dp
        self.offset, self.seed = dp_rank * self.per_rank, seed
        self._perm: dict = {}

    def _train_index(self, k: int) -> int:
        epoch, i = divmod(k, len(self.train))
        if epoch not in self._perm:
            gen = torch.Generator().manual_seed(self.seed * 7919 + epoch)
            self._perm = {epoch: torch.randperm(len(self.train), generator=gen)}
        return int(self._perm[epoch][i])

    def _stack(self, picked: list) -> tuple:
        return (torch.stack([torch.from_numpy(x) for x, _ in picked]),
                torch.stack([torch.from_numpy(y) for _, y in picked]))

    def _ks(self, step: int) -> list:
        return [step * self.global_batch + self.offset + j for j in range(self.per_rank)]

    def batch(self, step: int) -> tuple:
        return self._stack([self.train[self._train_index(k)] for k in self._ks(step)])

    def val_batch(self, index: int) -> tuple:
        return self._stack([self.val[k % len(self.val)] for k in self._ks(index)])


def classify_sample(ids: list, label: int, seq_len: int, causal: bool) -> tuple:
    ids = (ids or [PAD_ID])[:seq_len]
    x = np.full(seq_len, PAD_ID, dtype=np.int64)
    x[:len(ids)] = ids
    y = np.full(seq_len, IGNORE, dtype=np.int64)
    y[len(ids) - 1 if causal else 0] = label
    return x, y


def sft_sample(prompt: list, response: list, seq_len: int) -> tuple:
    """Inputs prompt + response (cut to seq_len + 1 tokens, then shifted); a label is the next
    token where that token belongs to the response."""
    ids = (prompt + response)[:seq_len + 1]
    x = np.full(seq_len, PAD_ID, dtype=np.int64)
    y = np.full(seq_len, IGNORE, dtype=np.int64)
    n = len(ids) - 1
    x[:n] = ids[:-1]
    targets = np.asarray(ids[1:], dtype=np.int64)
    in_response = np.arange(1, n + 1) >= len(prompt)
    y[:n] = np.where(in_response, targets, IGNORE)
    return x, y


def task_samples(plan, path, *, cap_bytes: int, encode=encode_bytes) -> list:
    """[(inputs, labels)] of a classify or sft plan's data file (TaskData takes them)."""
    job, spec = plan.job, plan.model
    if path is None:
        raise ValueError(f"task {job.task} needs --data (a CSV/JSONL file with fields "
                         f"{' and '.join(FIELDS[job.task])})")
    rows = read_records(path, job.task, cap_bytes)
    if job.task == "classify":
        labels = label_ids(rows, job.num_labels, path)
        samples = [classify_sample(encode(str(r["text"])), y, job.seq_len, spec.causal)
                   for r, y in zip(rows, labels)]
    else:
        samples = [sft_sample(encode(str(r["prompt"])), encode(str(r["response"])), job.seq_len)
                   for r in rows]
    top = max(int(x.max()) for x, _ in samples)
    if top >= spec.vocab_size:
        raise ValueError(f"data {path} has token id {top} >= the model's vocab_size "
                         f"{spec.vocab_size}")
    return samples
