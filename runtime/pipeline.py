"""Pipeline parallelism: the plan's layer split into model chunks and a PyTorch schedule.

Chunk c runs on pipeline rank layout.chunk_rank(c) (looped placement; V shape for ZB-V,
Qi et al. 2024). Each chunk is a `Transformer` holding only its layers under their global names,
so checkpoints do not depend on the split."""

import torch.nn.functional as F
from torch.distributed.pipelining import (
    PipelineStage,
    Schedule1F1B,
    ScheduleGPipe,
    ScheduleInterleaved1F1B,
    ScheduleInterleavedZeroBubble,
    ScheduleZBVZeroBubble,
)

from runtime.model import Transformer

SCHEDULES = {"gpipe": ScheduleGPipe, "1f1b": Schedule1F1B,
             "interleaved_1f1b": ScheduleInterleaved1F1B,
             "interleaved_zb": ScheduleInterleavedZeroBubble, "zbv": ScheduleZBVZeroBubble}
MULTI_STAGE = ("interleaved_1f1b", "interleaved_zb", "zbv")


def lm_loss_sum(logits, labels):
    """Summed token cross-entropy in fp32; labels -100 are ignored (BERT's unmasked tokens)."""
    return F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten(0, 1),
                           ignore_index=-100, reduction="sum")


def chunk_layer_ids(layout, num_layers: int) -> list:
    """Global layer indices of every model chunk, in pipeline order."""
    ids, start = [], 0
    for n in layout.stage_layers(num_layers):
        ids.append(range(start, start + n))
        start += n
    return ids


def local_chunks(layout, pp_rank: int) -> list:
    return [c for c in range(layout.num_chunks) if layout.chunk_rank(c) == pp_rank]


def build_chunks(spec, layout, pp_rank: int, num_labels: int | None = None) -> list:
    """(chunk index, meta-device Transformer) for every chunk this pipeline rank runs (with
    `num_labels`, the last chunk's head is a classifier)."""
    ids = chunk_layer_ids(layout, spec.num_layers)
    last = layout.num_chunks - 1
    return [(c, Transformer(spec, layer_ids=ids[c], has_embed=c == 0, has_head=c == last,
                            num_labels=num_labels)) for c in local_chunks(layout, pp_rank)]


def build_schedule(modules: list, chunks: list, layout, ctx, loss_fn):
    """PipelineStages for this rank's chunks and the plan's schedule over them."""
    group = ctx.group("pp")
    stages = [PipelineStage(m, stage_index=c, num_stages=layout.num_chunks, device=ctx.device,
                            group=group) for m, c in zip(modules, chunks)]
    cls = SCHEDULES[layout.schedule]
    if layout.schedule in MULTI_STAGE:
        return cls(stages, n_microbatches=layout.num_microbatches, loss_fn=loss_fn)
    return cls(stages[0], n_microbatches=layout.num_microbatches, loss_fn=loss_fn)
