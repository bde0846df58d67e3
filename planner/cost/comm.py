"""Alpha-beta time of each collective over a group's bottleneck link.

Ring algorithms (Patarasuk & Yuan 2009; NCCL): all-reduce moves 2(n-1)/n of the buffer per rank,
all-gather and reduce-scatter (n-1)/n of the full (gathered) buffer, point-to-point all of it.
Latency: a ring pays one hop per step; NCCL switches to trees for large groups, so the hop count is
capped at 2*ceil(log2 n) per phase (double binary tree, Sanders et al. 2009)."""

import math
from dataclasses import dataclass

from planner.topology import GroupLink

FACTORS = {"all_reduce": lambda n: 2 * (n - 1) / n, "all_gather": lambda n: (n - 1) / n,
           "reduce_scatter": lambda n: (n - 1) / n, "p2p": lambda n: 1.0,
           # each rank keeps 1/n of its buffer and sends the rest (Jacobs et al. 2023, Sec. 3.2)
           "all_to_all": lambda n: (n - 1) / n}
PHASES = {"all_reduce": 2, "all_gather": 1, "reduce_scatter": 1, "p2p": 1, "all_to_all": 1}


@dataclass(frozen=True)
class Collective:
    """One kind of collective as the most loaded rank runs it during a step."""
    name: str            # e.g. 'tp_all_reduce', 'dp_reduce_scatter'
    kind: str            # all_reduce | all_gather | reduce_scatter | p2p | all_to_all
    axis: str            # tp | dp | pp | cp | ep | etp | edp
    tier: str            # intra | inter
    count: int           # how many times per step
    bytes_each: float    # full buffer size of one call
    time_each_s: float
    group_size: int      # ranks in the group

    @property
    def volume_bytes(self) -> float:
        """Bytes this rank sends over the step."""
        return self.count * self.bytes_each * FACTORS[self.kind](self.group_size)

    @property
    def time_s(self) -> float:
        return self.count * self.time_each_s


def collective_time(kind: str, nbytes: float, link: GroupLink) -> float:
    """Seconds for one collective of `nbytes` (full buffer) over `link`; 0 for a group of one."""
    n = link.size
    if n == 1 or nbytes == 0:
        return 0.0
    return FACTORS[kind](n) * nbytes / link.bandwidth_bytes_per_s + \
        collective_latency(kind, n, link.latency_s)


def collective_latency(kind: str, n: int, latency_s: float) -> float:
    """The size-independent part of one collective among n ranks: latency x hops x phases."""
    hops = min(n - 1, 2 * math.ceil(math.log2(n))) if kind != "p2p" else 1
    return PHASES[kind] * hops * latency_s


def make_collective(name: str, kind: str, link: GroupLink, count: int,
                    nbytes: float) -> Collective:
    return Collective(name=name, kind=kind, axis=link.axis, tier=link.tier, count=count,
                      bytes_each=nbytes, time_each_s=collective_time(kind, nbytes, link),
                      group_size=link.size)
