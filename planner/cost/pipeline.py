"""Pipeline schedules: which rank runs which model chunk, and the in-flight micro-batches per
rank (activation memory); the bubble is planner.cost.combine.bubble_chunks.  Chunk = the layers
of one virtual stage on one rank.

Sources: GPipe (Huang et al. 2019) holds all m micro-batches; 1F1B (Narayanan et al. 2021,
Sec. 2.2) holds p - r on rank r; interleaved 1F1B warms up 2(p-r-1) + (v-1)p chunks
(Megatron-LM and torch.distributed.pipelining agree) so rank 0 holds L/p layers x p micro-batches
x (1 + (p-1)/(pv)) (Korthikanti et al. 2022, Sec. 4.2.3); zero-bubble schedules (Qi et al. 2023)
split the backward into input-gradient B and weight-gradient W and fill the bubble with W."""

from functools import lru_cache


def inflight_chunks(*, pp, num_microbatches, virtual_stages, schedule, rank) -> int:
    """Chunk forward passes whose activations pipeline rank `rank` holds at its peak."""
    p, m, v = pp, num_microbatches, virtual_stages
    if p == 1:
        return 1
    if schedule == "gpipe":
        return m * v
    if schedule == "1f1b":
        return min(m, p - rank)
    if schedule == "zbv":
        return min(v * m, 2 * p)  # V placement balances memory: every rank as 1F1B's first stage
    if schedule == "interleaved_zb":
        # PyTorch's ZB1P warms up one forward per hop, not two (its pipeline_order)
        return min(v * m, (v - 1) * p + p - rank)
    return min(v * m, 2 * (p - rank - 1) + (v - 1) * p + 1)


def head_inflight(*, pp, num_microbatches, schedule) -> int:
    """Micro-batches of output-layer activations held at once on the last stage."""
    return num_microbatches if schedule == "gpipe" and pp > 1 else 1


def chunk_rank(chunk: int, *, pp: int, schedule: str) -> int:
    """Pipeline rank that runs model chunk `chunk` (looped placement; V shape for zbv)."""
    if schedule == "zbv":
        return chunk if chunk < pp else 2 * pp - 1 - chunk
    return chunk % pp


def stage_layers(num_layers: int, *, pp: int, virtual_stages: int,
                 layers_per_stage: tuple = ()) -> tuple:
    """Layers of each model chunk, in pipeline order (an even split unless given)."""
    if layers_per_stage:
        return tuple(layers_per_stage)
    chunks = pp * virtual_stages
    base, extra = divmod(num_layers, chunks)
    return tuple(base + (1 if c < extra else 0) for c in range(chunks))


@lru_cache(maxsize=4096)
def rank_chunk_layers(num_layers: int, *, pp: int, virtual_stages: int, schedule: str,
                      layers_per_stage: tuple = ()) -> tuple:
    """For each pipeline rank, the layer counts of the chunks it runs (cached: the search and
    the estimate ask for the same pipelines often)."""
    per_rank: list[list[int]] = [[] for _ in range(pp)]
    layers = stage_layers(num_layers, pp=pp, virtual_stages=virtual_stages,
                          layers_per_stage=layers_per_stage)
    for chunk, n in enumerate(layers):
        per_rank[chunk_rank(chunk, pp=pp, schedule=schedule)].append(n)
    return tuple(tuple(chunks) for chunks in per_rank)


@lru_cache(maxsize=65536)
def rank_facts(num_layers: int, *, pp: int, virtual_stages: int, schedule: str, rank: int,
               layers_per_stage: tuple = ()) -> tuple:
    """(layers, chunks, holds the first chunk, holds the last chunk) of pipeline rank `rank`."""
    chunks = rank_chunk_layers(num_layers, pp=pp, virtual_stages=virtual_stages,
                               schedule=schedule, layers_per_stage=layers_per_stage)[rank]
    last = pp * virtual_stages - 1
    return (sum(chunks), len(chunks), chunk_rank(0, pp=pp, schedule=schedule) == rank,
            chunk_rank(last, pp=pp, schedule=schedule) == rank)



def recomputed(layer: int, every: int) -> bool:
    """Whether global block `layer` (0-based) runs the recompute policy under recompute_every K:
    torchtitan's selective-layer convention (a counter over blocks, incremented before the test
    `count % K == 0`), so blocks K-1, 2K-1, ... (runtime/model.py set_recompute)."""
    return (layer + 1) % every == 0


@lru_cache(maxsize=65536)
def rank_recomputed_layers(num_layers: int, *, pp: int, virtual_stages: int, schedule: str,
                           rank: int, every: int, layers_per_stage: tuple = ()) -> int:
    """Blocks of pipeline rank `rank` that run the recompute policy (every K-th global block)."""
    layers = stage_layers(num_layers, pp=pp, virtual_stages=virtual_stages,
                          layers_per_stage=layers_per_stage)
    start, count = 0, 0
    for chunk, n in enumerate(layers):
        if chunk_rank(chunk, pp=pp, schedule=schedule) == rank:
            count += sum(recomputed(i, every) for i in range(start, start + n))
        start += n
    return count
