"""Pipeline schedules: in-flight micro-batches per rank (activation memory) and step time with
the bubble.  Chunk = the layers of one virtual stage on one rank.

Sources: GPipe (Huang et al. 2019) holds all m micro-batches; 1F1B (Narayanan et al. 2021,
Sec. 2.2) holds p - r on rank r; interleaved 1F1B warms up 2(p-r-1) + (v-1)p chunks
(Megatron-LM and torch.distributed.pipelining agree) so rank 0 holds L/p layers x p micro-batches
x (1 + (p-1)/(pv)) (Korthikanti et al. 2022, Sec. 4.2.3); zero-bubble schedules (Qi et al. 2023)
split the backward into input-gradient B and weight-gradient W and fill the bubble with W."""

from planner.plan import Layout


def inflight_chunks(layout: Layout, pp_rank: int) -> int:
    """Chunk forward passes whose activations rank `pp_rank` holds at its peak."""
    p, m, v = layout.pp, layout.num_microbatches, layout.virtual_stages
    if p == 1:
        return 1
    if layout.schedule == "gpipe":
        return m * v
    if layout.schedule == "1f1b":
        return min(m, p - pp_rank)
    if layout.schedule == "zbv":
        return min(v * m, 2 * p)  # V placement balances memory: every rank as 1F1B's first stage
    if layout.schedule == "interleaved_zb":
        # PyTorch's ZB1P warms up one forward per hop, not two (its pipeline_order)
        return min(v * m, (v - 1) * p + p - pp_rank)
    return min(v * m, 2 * (p - pp_rank - 1) + (v - 1) * p + 1)


def head_inflight(layout: Layout) -> int:
    """Micro-batches of output-layer activations held at once on the last stage."""
    return layout.num_microbatches if layout.schedule == "gpipe" and layout.pp > 1 else 1


def bubble_chunks(layout: Layout, fwd_s: float, bwd_s: float, wgrad_s: float) -> float:
    """Idle time of a stage, in units of one micro-batch's full (all-chunk) time on a rank.

    Returns the bubble as a multiple of (fwd_s + bwd_s), the per-micro-batch stage time:
    GPipe and 1F1B (p-1); interleaved (p-1)/v; zero-bubble (p-1)(F+B-2W)/(F+B) / v (ZB-H2-like
    fill of the warm-up and cool-down with deferred weight gradients)."""
    p, v = layout.pp, layout.virtual_stages
    if p == 1:
        return 0.0
    if layout.schedule in ("interleaved_zb", "zbv"):
        fill = max(0.0, fwd_s + bwd_s - 2 * wgrad_s) / (fwd_s + bwd_s)
        return (p - 1) * fill / v
    return (p - 1) / v


def pipeline_time(layout: Layout, rank_microbatch_s: list, fwd_s: float, bwd_s: float,
                  wgrad_s: float) -> tuple:
    """(step time of the pipeline part, bubble time) from each rank's time per micro-batch.

    The slowest rank sets the steady-state pace; the fill/drain costs the bubble multiple of the
    average rank time.  Uniform stages: (m + (p-1)/v) * t, i.e. bubble fraction
    (p-1)/(v*m + p-1) of the step (Narayanan et al. 2021, Eq. 1 and Sec. 2.2)."""
    m = layout.num_microbatches
    slowest = max(rank_microbatch_s)
    mean = sum(rank_microbatch_s) / len(rank_microbatch_s)
    bubble = bubble_chunks(layout, fwd_s, bwd_s, wgrad_s) * mean
    return m * slowest + bubble, bubble
