"""Context parallelism: each sequence split over cp ranks, load-balanced for causal attention.

Chunking (Megatron-LM, Llama 3 Sec. 3.3.2, PyTorch's context_parallel): the sequence is cut into
2cp chunks and rank i holds chunks i and 2cp-1-i, so every rank runs the same causal attention
work: its s/cp queries against the keys before them, sum over its chunks = s^2/(2cp) of the
full s^2 score matrix, i.e. cp times the causal work of a sequence of length s/cp.  Everything
else in a layer (GEMMs, norms, the MLP, activations, TP and PP traffic) is per token: the
rank works on a sequence of s/cp (local_job).

The three ways attention sees the whole sequence, per layer and micro-batch on one rank
(kv = the TP rank's K/V width, a = activation bytes, b = micro-batch):
  allgather  Llama 3 (Dubey et al. 2024, Sec. 3.3.2): all-gather K and V in forward (gathered
             buffer 2 a b s kv), reduce-scatter dK and dV in backward; not overlapped (exposed);
             cheap with GQA, where kv << h.
  ring       Ring Attention (Liu et al. 2023, Sec. 3): the local K/V block (2 a b s/cp kv) is
             passed cp-1 times around the cp ranks in forward, each send overlapped with the
             attention of the block at hand; backward passes K/V and their gradients (twice the
             bytes).  Exposed: only where a send is slower than one block's attention.
  a2a        DeepSpeed-Ulysses (Jacobs et al. 2023, Sec. 3.1): all-to-all q, k, v from
             sequence-sharded to head-sharded and the output back: 4 all-to-alls per layer in
             forward and 4 in backward, each over the rank's sequence-sharded tensor; exposed.
"""

import dataclasses

from planner.cost.comm import make_collective
from planner.plan import Mesh
from planner.topology import axis_link
from planner.units import dtype_bytes

# backward of the ring passes each K/V block and its gradient block (Liu et al. 2023, Alg. 1 and
# the Ring Attention reference backward: dk, dv travel with k, v)
RING_BWD_BLOCKS = 2
# Ulysses: q, k, v in and the output back, per pass (Jacobs et al. 2023, Fig. 2)
ULYSSES_A2A_PER_PASS = 4


def local_job(job, cp: int):
    """The job one CP rank sees for its per-token work: a sequence of seq_len / cp."""
    if cp == 1:
        return job
    return dataclasses.replace(job, seq_len=job.seq_len // cp)


def _kv_bytes(spec, job, *, tp, micro_batch, cp) -> float:
    """K and V of the rank's local sequence (TP-local heads)."""
    return 2 * dtype_bytes(job.dtype) * micro_batch * (job.seq_len // cp) * \
        spec.kv_hidden_size / tp


def cp_collectives(profile, spec, job, *, mesh_order, dp, tp, pp, cp, cp_comm,
                   micro_batch) -> tuple:
    """(forward, backward) Collectives of one layer and micro-batch over the cp group."""
    if cp == 1:
        return [], []
    link = axis_link(profile, Mesh(mesh_order=tuple(mesh_order), dp=dp, tp=tp, pp=pp, cp=cp), "cp")
    kv = _kv_bytes(spec, job, tp=tp, micro_batch=micro_batch, cp=cp)
    if cp_comm == "allgather":
        return ([make_collective("cp_kv_all_gather", "all_gather", link, 1, kv * cp)],
                [make_collective("cp_dkv_reduce_scatter", "reduce_scatter", link, 1, kv * cp)])
    if cp_comm == "ring":
        return ([make_collective("cp_kv_send", "p2p", link, cp - 1, kv)],
                [make_collective("cp_kv_dkv_send", "p2p", link, cp - 1, RING_BWD_BLOCKS * kv)])
    a = dtype_bytes(job.dtype)
    qo = a * micro_batch * (job.seq_len // cp) * spec.hidden_size / tp
    one_pass = [make_collective("cp_a2a_qo", "all_to_all", link, 2, qo),
                make_collective("cp_a2a_kv", "all_to_all", link, 2, kv / 2)]
    return one_pass, [dataclasses.replace(c, name=c.name + "_grad") for c in one_pass]


def cp_rerun_collectives(forward: list, cp_comm: str, recompute: str) -> list:
    """The forward CP collectives a recomputed layer runs again: all of them under full and
    op-level recompute (neither saves a collective's output; runtime/recompute.py), and under
    selective recompute those inside the attention core - the K/V all-gather (runtime/model.py
    checkpoints the core with the gather in it) and the ring's sends (Megatron-LM's core
    attention holds them) - but not Ulysses' all-to-alls, which sit outside it."""
    if recompute == "none" or (recompute == "selective" and cp_comm == "a2a"):
        return []
    return forward


def cp_exposed(cp_comm: str, cp: int, forward: list, backward: list, attn_fwd_s: float,
               attn_bwd_s: float) -> float:
    """Seconds of CP traffic on the critical path: all of it, except that a ring's sends
    overlap the attention of the block at hand (the rank's attention split over cp blocks)."""
    fwd = sum(c.time_s for c in forward)
    bwd = sum(c.time_s for c in backward)
    if cp_comm != "ring" or cp == 1:
        return fwd + bwd
    steps = cp - 1
    return steps * (max(0.0, fwd / steps - attn_fwd_s / cp)
                    + max(0.0, bwd / steps - attn_bwd_s / cp))


def gathered_kv_bytes(spec, job, *, tp, micro_batch, cp, cp_comm) -> float:
    """Saved bytes the all-gather flavour adds per layer: the attention kernel keeps the
    gathered K and V of the whole sequence for its backward, not the local s/cp of them
    (counted on the runtime, tests/test_runtime_cp.py)."""
    if cp == 1 or cp_comm != "allgather":
        return 0.0
    return _kv_bytes(spec, job, tp=tp, micro_batch=micro_batch, cp=cp) * (cp - 1)
