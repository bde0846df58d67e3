"""Traced activation bytes (`--trace-activations`, planner/traced.py) in the memory model.

A trace measures what a Hugging Face implementation saves for backward at one sequence length
and precision, on one rank without tensor parallelism, at micro-batches 2 and 3: one layer, and
the rest of the model (embedding, final norm, head and loss). Saved tensors are linear in the
micro-batch (each has a batch dimension, or none: position tables, masks), so two points give
bytes(b) = bytes(2) + (b - 2) * (bytes(3) - bytes(2)) exactly from b = 2 on; at b = 1 a few
bytes may differ (transformers' shifted labels are a view there and a copy above: 8 bytes).
Tensor parallelism and sequence parallelism shard those tensors as they shard the analytic count
(planner/cost/activations.py), so a traced figure is scaled by the analytic ratio sharded /
unsharded. The rest of the model is split as the analytic model splits it: the embedding's analytic bytes (token and position ids,
its dropout mask) on the first stage, the remainder on the head.

While `use(trace)` is active, planner/cost/memory.activation_pieces takes these figures instead
of the analytic ones for layers without recompute and for the head (recompute policies keep
their analytic counts: what they keep is fixed by the policy, not the implementation)."""

import contextlib
import contextvars
import dataclasses
from dataclasses import dataclass

from planner.schema import check_keys

TRACED_MICRO_BATCHES = (2, 3)
_ACTIVE: contextvars.ContextVar = contextvars.ContextVar("traced_activations", default=None)


@dataclass(frozen=True, kw_only=True)
class TracedActivations:
    model_class: str       # the transformers class traced
    seq_len: int
    precision: str
    attention: str         # the plan's attention kernels (transformers attn_implementation)
    layer_bytes: tuple     # one layer at micro-batch 2 and 3 (TRACED_MICRO_BATCHES)
    rest_bytes: tuple      # embedding + head + loss at micro-batch 2 and 3
    versions: str = ""     # transformers / torch versions of the trace

    def __post_init__(self):
        for key in ("layer_bytes", "rest_bytes"):
            value = tuple(getattr(self, key))
            if len(value) != 2 or any(not isinstance(v, int) or v < 0 for v in value):
                raise ValueError(f"traced {key} must be two byte counts >= 0, got {value!r}")
            object.__setattr__(self, key, value)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "TracedActivations":
        return cls(**check_keys(data, cls, "traced activations"))

    def matches(self, job) -> bool:
        return (self.seq_len, self.precision, self.attention) == (job.seq_len, job.precision,
                                                                   job.attention)

    @staticmethod
    def _at(pair: tuple, b):
        return pair[0] + (b - TRACED_MICRO_BATCHES[0]) * (pair[1] - pair[0])

    def layer(self, spec, job, *, tp, sequence_parallel, micro_batch):
        """One layer's saved bytes on one rank (no recompute)."""
        from planner.cost.activations import layer_bytes
        shape = {"tp": tp, "sequence_parallel": sequence_parallel, "micro_batch": micro_batch}
        whole = {**shape, "tp": 1, "sequence_parallel": False}
        ratio = layer_bytes(spec, job, **shape, recompute="none") / layer_bytes(
            spec, job, **whole, recompute="none")
        return self._at(self.layer_bytes, micro_batch) * ratio

    def head(self, spec, job, *, tp, sequence_parallel, micro_batch):
        """The head and loss path's saved bytes on one rank."""
        from planner.cost.activations import embedding_bytes, head_bytes
        shape = {"tp": tp, "sequence_parallel": sequence_parallel, "micro_batch": micro_batch}
        whole = {**shape, "tp": 1, "sequence_parallel": False}
        rest = self._at(self.rest_bytes, micro_batch) - embedding_bytes(spec, job, **whole)
        return rest * head_bytes(spec, job, **shape) / head_bytes(spec, job, **whole)


def active(job):
    """The trace in use for `job`'s sequence length, precision and attention, or None."""
    trace = _ACTIVE.get()
    return trace if trace is not None and trace.matches(job) else None


@contextlib.contextmanager
def use(trace: TracedActivations):
    token = _ACTIVE.set(trace)
    try:
        yield trace
    finally:
        _ACTIVE.reset(token)
