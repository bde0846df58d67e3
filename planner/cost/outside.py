"""Memory outside the plan's tensors, itemised: the CUDA context, the communication buffers of
the process groups the runtime creates, the cuBLAS workspaces and the caching allocator's
reserve.  The per-item figures are hardware-profile terms (each cited in its profile's
sources); what depends on the plan - which process groups a rank is in, its pipeline peers, its
transient tensor bytes - is counted here from what runtime/mesh.py and runtime/engine.py create
(tests/test_memory_census.py counts the runtime's groups)."""

from planner.cost.pipeline import chunk_rank

# cuBLAS handles are per host thread (PyTorch CublasHandlePool.cpp) and each (handle, stream)
# gets its workspace; forward runs on the Python thread, backward on autograd's worker thread
# of the device (torch/csrc/autograd/engine.cpp: one thread per CUDA device): two workspaces.
BLAS_WORKSPACES = 2
# Pipeline sends: torch.distributed.pipelining's _batch_p2p sends an all-send or all-recv batch
# unbatched (ProcessGroupNCCL then uses a 2-rank communicator of its own per peer, its
# getKeySendRecv) and a mixed batch batched (the pp group's communicator): two per peer.
P2P_COMMUNICATORS_PER_PEER = 2


def process_groups(spec, *, dp, tp, pp, virtual_stages, schedule, holds_embedding,
                   holds_head, cp=1, dp_shard=0) -> tuple:
    """Names of the process groups of >= 2 ranks this rank is in, as the runtime creates them:
    the default group (init_process_group; the loss and gradient-norm all-reduces use it), one
    DeviceMesh group per axis of size > 1 (init_device_mesh; an axis spanning the whole world
    reuses the default group, torch/distributed/device_mesh.py), and the tied-embedding pair
    (runtime/mesh.py pair_group) on the two ranks holding the embedding and the output layer.
    Hybrid sharding unflattens the dp axis into dp_replicate x dp_shard (DeviceMesh._unflatten:
    one group per new axis; runtime/mesh.py hsdp_mesh)."""
    world = dp * tp * pp * cp
    names = ["world"] if world > 1 else []
    names += [axis for axis, size in (("dp", dp), ("tp", tp), ("pp", pp), ("cp", cp))
              if 1 < size < world]
    if cp > 1 and 1 < dp * cp < world:
        names.append("dp_cp")  # the flattened group FSDP shards and reduces over
    if 0 < dp_shard < dp:
        names += ["dp_replicate"] + (["dp_shard"] if dp_shard > 1 else [])
    tied_apart = spec.tie_embeddings and pp * virtual_stages > 1 and chunk_rank(
        0, pp=pp, schedule=schedule) != chunk_rank(pp * virtual_stages - 1, pp=pp,
                                                  schedule=schedule)
    if tied_apart and bool(holds_embedding) != bool(holds_head):
        names.append("tied")
    return tuple(names)


def collective_groups(spec, *, dp, tp, pp, virtual_stages, schedule, holds_embedding,
                      holds_head, cp=1, dp_shard=0) -> int:
    """Communicators that run collectives on this rank (ring buffers): every group above but the
    pipeline group, which only carries sends (NCCL connects lazily, per algorithm used); under
    hybrid sharding the dp group still all-reduces the label count (runtime/engine.py)."""
    names = process_groups(spec, dp=dp, tp=tp, pp=pp, virtual_stages=virtual_stages,
                           schedule=schedule, holds_embedding=holds_embedding,
                           holds_head=holds_head, cp=cp, dp_shard=dp_shard)
    return len([n for n in names if n != "pp"])


def pipeline_peers(*, pp, virtual_stages, schedule, rank) -> int:
    """Distinct pipeline ranks this rank sends to or receives from: the ranks of the chunks
    next to its own (looped placement wraps around under interleaving; V shape for zbv)."""
    chunks = pp * virtual_stages
    mine = [c for c in range(chunks) if chunk_rank(c, pp=pp, schedule=schedule) == rank]
    near = {chunk_rank(c + d, pp=pp, schedule=schedule) for c in mine for d in (-1, 1)
            if 0 <= c + d < chunks}
    return len(near - {int(rank)})


# The profile's per-item figures, one scalar each (the search broadcasts a function of the fixed
# inputs alone to every row, so each returns one number).
def context_bytes(gpu) -> float:
    return gpu.context_bytes


def workspace_bytes(gpu) -> float:
    return BLAS_WORKSPACES * gpu.blas_workspace_bytes


def group_buffer_bytes(gpu) -> float:
    return gpu.comm_buffer_bytes_per_group


def peer_buffer_bytes(gpu) -> float:
    """Point-to-point buffers per pipeline peer, over all the communicators carrying its sends."""
    return P2P_COMMUNICATORS_PER_PEER * gpu.comm_buffer_bytes_per_peer


def fragmentation(gpu) -> float:
    return gpu.allocator_fragmentation


OUTSIDE_TERMS = (context_bytes, workspace_bytes, group_buffer_bytes, peer_buffer_bytes,
                 fragmentation)


def outside_parts(*, terms, groups, peers, transient_bytes) -> dict:
    """One rank's bytes outside tensors by item (scalars or one entry per layout).  The caching
    allocator keeps the profile's fragmentation fraction of the transient tensors (activations,
    gathered weights, collective outputs) reserved but free at the peak: their allocate/free
    churn fragments its cached segments, while model states are allocated once at start-up."""
    context, workspace, per_group, per_peer, fragmentation = terms
    return {"context": context + 0.0 * groups, "workspace": workspace + 0.0 * groups,
            "nccl_buffers": groups * per_group + peers * per_peer,
            "allocator_reserve": fragmentation * transient_bytes}
