"""Per-rank memory measured from real tensors: parameters, gradients and optimizer state
(rank-local shards, each storage counted once, so padding and shared buckets count as they
really are), and the activations autograd saves for backward (saved_tensors_hooks)."""

import contextlib
import resource

import torch
from torch import nn
from torch.distributed._functional_collectives import AsyncCollectiveTensor
from torch.distributed.tensor import DTensor
from torch.utils._pytree import tree_leaves

from runtime import recompute

# Autograd nodes that only view or cast their input: a saved tensor reached from a parameter
# through these alone is a weight (an FSDP2 unsharded parameter, an autocast copy), not an
# activation.
_PASS_THROUGH = {"TBackward0", "ViewBackward0", "ToCopyBackward0", "TransposeBackward0",
                 "AliasBackward0", "ExpandBackward0", "PermuteBackward0", "UnsafeViewBackward0",
                 "SliceBackward0", "SelectBackward0", "ReshapeAliasBackward0"}


def local(t: torch.Tensor) -> torch.Tensor:
    """The plain tensor holding this rank's data (DTensor shard, async collective result)."""
    if isinstance(t, DTensor):
        t = t._local_tensor
    if isinstance(t, AsyncCollectiveTensor):
        t = t.elem
    return t


def storage_bytes(tensors) -> int:
    """Bytes of the distinct storages behind these (rank-local) tensors."""
    seen, total = set(), 0
    for t in tensors:
        st = local(t).untyped_storage()
        if st.data_ptr() not in seen:
            seen.add(st.data_ptr())
            total += st.nbytes()
    return total


def weights_bytes(params) -> int:
    return storage_bytes(params)


def gradients_bytes(params) -> int:
    return storage_bytes(p.grad for p in params if p.grad is not None)


def optimizer_bytes(optimizers) -> int:
    """AdamW state: exp_avg, exp_avg_sq and the float32 `step` tensor of every parameter."""
    tensors = [t for opt in optimizers for state in _states(opt) for t in state.values()
               if torch.is_tensor(t)]
    return storage_bytes(tensors)


def _states(opt):
    inner = getattr(opt, "inner", opt)  # ShardedAdamW wraps a torch AdamW
    return inner.state.values()


def _param_derived(t: torch.Tensor, depth: int = 6) -> bool:
    if isinstance(t, nn.Parameter) or isinstance(local(t)._base, nn.Parameter):
        return True  # a view of a frozen parameter (LoRA's base: W.t() in F.linear)
    fn = t.grad_fn
    for _ in range(depth):
        if fn is None:
            return False
        if type(fn).__name__ == "AccumulateGrad":  # a leaf: a parameter or a stage input
            # torch's Node stub lacks AccumulateGrad's `variable` (the leaf tensor)
            return isinstance(fn.variable, nn.Parameter)  # type: ignore[attr-defined]
        if type(fn).__name__ not in _PASS_THROUGH or not fn.next_functions:
            return False
        fn = fn.next_functions[0][0]
    return False


class _Saved:
    """What autograd keeps for a counted tensor; its release marks the storage free."""
    __slots__ = ("tensor", "key", "counter")

    def __init__(self, tensor, key, counter):
        self.tensor, self.key, self.counter = tensor, key, counter

    def __del__(self):
        self.counter._release(self.key)


class ActivationCounter:
    """Bytes autograd saves for backward, each live storage counted once; parameters, tensors
    derived from them by views/casts, and module buffers (RoPE tables) are excluded."""

    def __init__(self, modules):
        self.buffers = {b.untyped_storage().data_ptr() for m in modules for b in m.buffers()}
        self.live = {}         # storage ptr -> [bytes, references]
        self.total_bytes = 0   # every storage that became live
        self.live_bytes = 0
        self.peak_bytes = 0

    def _pack(self, t):
        if _param_derived(t):
            return t
        st = local(t).untyped_storage()
        key = st.data_ptr()
        if key in self.buffers:
            return t
        self._add(key, st.nbytes())
        return _Saved(t, key, self)

    def _add(self, key, nbytes: int) -> None:
        if key in self.live:
            self.live[key][1] += 1
        else:
            self.live[key] = [nbytes, 1]
            self.total_bytes += nbytes
            self.live_bytes += nbytes
            self.peak_bytes = max(self.peak_bytes, self.live_bytes)

    @staticmethod
    def _unpack(packed):
        return packed.tensor if isinstance(packed, _Saved) else packed

    def _release(self, key):
        entry = self.live.get(key)
        if entry is None:
            return
        entry[1] -= 1
        if entry[1] == 0:
            self.live_bytes -= entry[0]
            del self.live[key]

    def count_cached(self, outputs) -> list:
        """Count the outputs a selective checkpoint caches (runtime/recompute.py) as saved
        tensors; returns their keys for release_cached."""
        keys = []
        for t in tree_leaves(outputs):
            if isinstance(t, torch.Tensor):
                st = local(t).untyped_storage()
                keys.append(st.data_ptr())
                self._add(keys[-1], st.nbytes())
        return keys

    def release_cached(self, keys) -> None:
        for key in keys:
            self._release(key)

    @contextlib.contextmanager
    def hooks(self):
        recompute.OBSERVER.append(self)
        try:
            with torch.autograd.graph.saved_tensors_hooks(self._pack, self._unpack):
                yield
        finally:
            recompute.OBSERVER.remove(self)


def max_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def peak_allocated_bytes(device) -> int | None:
    """torch.cuda.max_memory_allocated; None on CPU (null in measured.json, see
    planner.measured.RankMeasurement)."""
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    return None


def current_memory_bytes(device) -> int:
    """Allocated bytes on CUDA, resident set size on CPU (for the step log)."""
    if device.type == "cuda":
        return int(torch.cuda.memory_allocated(device))
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()
