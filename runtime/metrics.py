"""Training metrics as they happen: one JSON line per optimizer step (rank 0), appended and
flushed at once so that a run that stops still leaves every finished step; optionally the same
scalars as TensorBoard events (only where `torch.utils.tensorboard` imports: tensorboard is not
a dependency).

A line: {"step", "loss", "lr", "step_time_s", "tokens_per_s", "grad_norm" (the global norm
before clipping; null when fp16 gradients overflowed and the step was skipped), "memory_bytes"
(allocated bytes on CUDA, resident set size on CPU), "peak_allocated_bytes" (CUDA; null on
CPU)} and, on the steps that evaluate (--eval-every), "val_loss"."""

import json
import math

NO_TENSORBOARD = ("--tensorboard needs the tensorboard package (torch.utils.tensorboard does "
                  "not import: {why}); pip install tensorboard, or leave out --tensorboard")
SCALARS = ("loss", "lr", "step_time_s", "tokens_per_s", "grad_norm", "memory_bytes",
           "val_loss")


def tensorboard_writer_class():
    """torch.utils.tensorboard.SummaryWriter, or a ValueError of one line naming the fix."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError as exc:
        raise ValueError(NO_TENSORBOARD.format(why=exc)) from None
    return SummaryWriter


class MetricsWriter:
    """The JSONL file (and TensorBoard directory) of one run; `None` paths write nothing."""

    def __init__(self, path=None, tensorboard_dir=None, resume: bool = False):
        self.file = open(path, "a" if resume else "w") if path else None  # noqa: SIM115
        self.board = tensorboard_writer_class()(tensorboard_dir) if tensorboard_dir else None

    def write(self, row: dict) -> None:
        if self.file is not None:
            clean = {k: (v if not isinstance(v, float) or math.isfinite(v) else None)
                     for k, v in row.items()}
            self.file.write(json.dumps(clean, allow_nan=False) + "\n")
            self.file.flush()
        if self.board is not None:
            for key in SCALARS:
                value = row.get(key)
                if value is not None:
                    self.board.add_scalar(f"train/{key}" if key != "val_loss" else "eval/loss",
                                          value, row["step"])
            self.board.flush()

    def close(self) -> None:
        if self.file is not None:
            self.file.close()
        if self.board is not None:
            self.board.close()
