"""Rank grid from the plan's mesh axis order, the process groups of each axis, and the link
each group's collectives run over (NVSwitch, hybrid cube-mesh NVLink, PCIe, or the node NICs).

Bandwidths returned here are effective per-rank bus bandwidths: what a ring collective moves per
rank per second, already multiplied by the fabric's collective efficiency."""

import itertools
from dataclasses import dataclass

import numpy as np

from planner.hardware import HardwareProfile, IntraNode


@dataclass(frozen=True)
class GroupLink:
    axis: str
    size: int
    num_nodes: int          # nodes one group spans
    ranks_per_node: int     # group members on one node (at most)
    tier: str               # 'none' (size 1), 'intra' (one node) or 'inter' (crosses nodes)
    bandwidth_bytes_per_s: float
    latency_s: float


def rank_grid(mesh_order: tuple, sizes: dict) -> np.ndarray:
    """Global rank of every mesh coordinate; axes in mesh_order (outermost first, row-major)."""
    shape = tuple(sizes[a] for a in mesh_order)
    return np.arange(int(np.prod(shape))).reshape(shape)


# groups over more than one mesh axis: FSDP/ZeRO shard and gradients reduce over dp x cp
# (torchtitan's "dp_shard_cp" flattened mesh, parallel_dims.py)
JOINT_AXES = {"dp_cp": ("dp", "cp")}


def _axis_names(axis: str) -> tuple:
    return JOINT_AXES.get(axis, (axis,))


def axis_groups(mesh_order: tuple, sizes: dict, axis: str) -> np.ndarray:
    """Rows of ranks that form the process groups of `axis` (one row per group); a joint axis
    (JOINT_AXES) groups the ranks of its axes together, in mesh order."""
    order = tuple(mesh_order)
    if "cp" not in order and "dp" in order:
        order = order[:order.index("dp") + 1] + ("cp",) + order[order.index("dp") + 1:]
    names = [a for a in order if a in _axis_names(axis)]
    grid = rank_grid(order, {"cp": 1, **sizes})
    moved = np.moveaxis(grid, [order.index(a) for a in names],
                        list(range(-len(names), 0)))
    return moved.reshape(-1, int(np.prod([sizes.get(a, 1) for a in names])))


_RING_CACHE: dict = {}


def mesh_ring_bandwidth(intra: IntraNode, local_ids: tuple) -> float:
    """Cached _mesh_ring_bandwidth (the search asks for the same GPU sets many times)."""
    key = (tuple(map(tuple, intra.links)), intra.link_bandwidth_bytes_per_s,
           intra.fallback_bandwidth_bytes_per_s, tuple(sorted(set(local_ids))))
    if key not in _RING_CACHE:
        _RING_CACHE[key] = _mesh_ring_bandwidth(intra, local_ids)
    return _RING_CACHE[key]


def _mesh_ring_bandwidth(intra: IntraNode, local_ids: tuple) -> float:
    """Per-rank ring bandwidth among GPUs `local_ids` of an NVLink mesh (e.g. DGX-1 cube mesh).

    NCCL runs one ring per direction of each edge-disjoint Hamiltonian cycle it finds over the
    NVLink graph, so a rank sends on 2 links per cycle; with no NVLink cycle the ring falls back
    to PCIe/QPI.  Two GPUs use every link between them."""
    import networkx as nx  # here, not at the top: only NVLink-mesh profiles need the graph
    graph = nx.Graph()
    for a, b, n in intra.links:
        graph.add_edge(a, b, links=n)
    ids = sorted(set(local_ids))
    if len(ids) == 2:
        data = graph.get_edge_data(*ids)
        return data["links"] * intra.link_bandwidth_bytes_per_s if data else \
            intra.fallback_bandwidth_bytes_per_s
    capacity = {frozenset(e): graph.edges[e]["links"] for e in graph.subgraph(ids).edges}
    cycles = _max_disjoint_cycles(_hamiltonian_cycles(ids, capacity), capacity)
    if cycles == 0:
        return intra.fallback_bandwidth_bytes_per_s
    return 2 * cycles * intra.link_bandwidth_bytes_per_s


def _hamiltonian_cycles(ids: list, capacity: dict) -> list:
    """Every Hamiltonian cycle over NVLink edges among `ids`, as edge lists (one per cycle)."""
    found = []
    for perm in itertools.permutations(ids[1:]):
        if perm[0] > perm[-1]:
            continue  # each cycle once, not once per direction
        ring = (ids[0],) + perm
        edges = [frozenset((ring[i], ring[(i + 1) % len(ring)])) for i in range(len(ring))]
        if all(capacity.get(e, 0) >= 1 for e in edges):
            found.append(edges)
    return found


# Cycles examined by the disjoint-cycle search below: DGX-1's cube mesh needs a few dozen; a
# fully connected 8-GPU mesh (2,520 cycles) would need billions, so the search stops here with
# the best packing found so far (a lower bound: the modelled bandwidth errs on the slow side).
CYCLE_SEARCH_STEPS = 200_000


def _max_disjoint_cycles(cycles: list, capacity: dict, start: int = 0, steps=None,
                         chosen: int = 0) -> int:
    """Most cycles that fit in the link multiplicities together (depth-first, small graphs,
    at most CYCLE_SEARCH_STEPS cycles examined)."""
    steps = [CYCLE_SEARCH_STEPS, _cycle_bound(capacity)] if steps is None else steps
    best = 0
    for i in range(start, len(cycles)):
        steps[0] -= 1
        if steps[0] < 0:
            break
        edges = cycles[i]
        if all(capacity[e] >= 1 for e in edges):
            for e in edges:
                capacity[e] -= 1
            best = max(best, 1 + _max_disjoint_cycles(cycles, capacity, i, steps, chosen + 1))
            for e in edges:
                capacity[e] += 1
            if best * len(edges) * 2 >= sum(capacity.values()) * 2 or chosen + best >= steps[1]:
                break  # no link left unused, or a GPU's links all used: cannot do better
    return best


def _cycle_bound(capacity: dict) -> int:
    """Each cycle takes two link ends of every GPU: no more cycles than the GPU with the fewest
    links can carry."""
    ends: dict = {}
    for edge, n in capacity.items():
        for gpu in edge:
            ends[gpu] = ends.get(gpu, 0) + n
    return min(ends.values()) // 2 if ends else 0


def _intra_bandwidth(profile: HardwareProfile, local_ids: tuple) -> float:
    intra = profile.intra_node
    raw = (mesh_ring_bandwidth(intra, local_ids) if intra.kind == "nvlink_mesh"
           else intra.bandwidth_bytes_per_s)
    return raw * intra.efficiency


def _nic_share(profile: HardwareProfile, ranks_per_node: int) -> float:
    """Bandwidth one group gets across nodes: all groups of an axis communicate at once, so the
    node's NICs are split among the gpus_per_node / ranks_per_node groups that cross them."""
    inter = profile.inter_node
    gpn = profile.gpus_per_node
    return inter.bandwidth_bytes_per_s * inter.efficiency * min(ranks_per_node, gpn) / gpn


def _group_bandwidth(profile: HardwareProfile, group: np.ndarray) -> tuple:
    gpn = profile.gpus_per_node
    nodes, counts = np.unique(group // gpn, return_counts=True)
    per_node = int(counts.max())
    if len(nodes) == 1:
        return 1, per_node, _intra_bandwidth(profile, tuple(int(r) % gpn for r in group))
    bw = _nic_share(profile, per_node)
    if per_node > 1:
        local = tuple(int(r) % gpn for r in group[group // gpn == nodes[0]])
        bw = min(bw, _intra_bandwidth(profile, local))
    return len(nodes), per_node, bw


_LINK_CACHE: dict = {}


def _distinct_groups(groups: np.ndarray, gpn: int) -> np.ndarray:
    """Index of one group per distinct (local GPU ids, nodes spanned) pattern: groups with the
    same pattern see the same links."""
    nodes = np.sort(groups // gpn, axis=1)
    spans = 1 + (np.diff(nodes, axis=1) != 0).sum(axis=1)
    keys = np.column_stack([groups % gpn, spans])
    if keys.shape[1] <= 64:
        return np.unique(keys, axis=0, return_index=True)[1]
    # Long rows (a group of thousands of ranks): np.unique(axis=0) compares them as structured
    # records with one field per rank, which takes seconds; few rows, so a dict is quick.
    # Same result: first index of each distinct row, in the rows' lexicographic order.
    first: dict = {}
    for i, row in enumerate(keys):
        first.setdefault(row.tobytes(), i)
    return np.array(sorted(first.values(), key=lambda i: tuple(keys[i].tolist())))


HSDP_AXES = ("dp_replicate", "dp_shard")  # dp split outer x inner: dp rank = r * S + s


def _split_dp(mesh_order: tuple, sizes: dict, dp_shard: int) -> tuple:
    """Mesh order and sizes with dp split into (dp_replicate, dp_shard): a shard group is
    dp_shard consecutive dp ranks (FSDP2's 2-D mesh and Megatron's intra-partial groups), so it
    stays inside a node where the node holds it."""
    shard = dp_shard or sizes["dp"]
    order = tuple(a for axis in mesh_order for a in (HSDP_AXES if axis == "dp" else (axis,)))
    split = {**sizes, "dp_replicate": sizes["dp"] // shard, "dp_shard": shard}
    return order, split


def _axis_link_cached(profile: HardwareProfile, mesh_order: tuple, dp: int, tp: int, pp: int,
                      cp: int, dp_shard: int, axis: str) -> GroupLink:
    sizes = {"dp": dp, "tp": tp, "pp": pp, "cp": cp}
    if axis in HSDP_AXES:
        mesh_order, sizes = _split_dp(mesh_order, sizes, dp_shard)
    n = int(np.prod([sizes[a] for a in _axis_names(axis)]))
    if n == 1:
        return GroupLink(axis, 1, 1, 1, "none", float("inf"), 0.0)
    groups = axis_groups(mesh_order, sizes, axis)
    num_nodes, per_node, bw = min((_group_bandwidth(profile, groups[i])
                                   for i in _distinct_groups(groups, profile.gpus_per_node)),
                                  key=lambda found: found[2])
    tier = "intra" if num_nodes == 1 else "inter"
    latency = profile.intra_node.latency_s if tier == "intra" else profile.inter_node.latency_s
    return GroupLink(axis, n, num_nodes, per_node, tier, bw, latency)


def axis_link(profile: HardwareProfile, layout, axis: str) -> GroupLink:
    """The slowest group of `axis` (pp, dp, tp, cp, dp_cp, or under hybrid sharding dp_shard
    and dp_replicate) under this layout (the most loaded rank waits for it)."""
    key = (id(profile), tuple(layout.mesh_order), layout.dp, layout.tp, layout.pp,
           getattr(layout, "cp", 1), getattr(layout, "dp_shard", 0), axis)
    hit = _LINK_CACHE.get(key)
    if hit is None or hit[0] is not profile:
        hit = (profile, _axis_link_cached(profile, *key[1:]))
        _LINK_CACHE[key] = hit
    return hit[1]


def pipeline_p2p_link(profile: HardwareProfile, layout) -> GroupLink:
    """Point-to-point link between adjacent pipeline stages (worst pair)."""
    if layout.pp == 1:
        return GroupLink("pp", 1, 1, 1, "none", float("inf"), 0.0)
    group = axis_link(profile, layout, "pp")
    gpn = profile.gpus_per_node
    if group.tier == "inter":
        inter = profile.inter_node
        # every GPU of a node sends its stage boundary at once: one NIC share each
        bw = inter.bandwidth_bytes_per_s * inter.efficiency / gpn
        return GroupLink("pp", layout.pp, group.num_nodes, group.ranks_per_node, "inter", bw,
                         inter.latency_s)
    intra = profile.intra_node
    if intra.kind == "nvlink_mesh":
        pairs = axis_groups(tuple(layout.mesh_order),
                            {"dp": layout.dp, "tp": layout.tp, "pp": layout.pp,
                             "cp": getattr(layout, "cp", 1)}, "pp")
        bw = min(mesh_ring_bandwidth(intra, (int(a) % gpn, int(b) % gpn))
                 for row in pairs for a, b in zip(row[:-1], row[1:]))
    else:
        bw = intra.bandwidth_bytes_per_s
    return GroupLink("pp", layout.pp, 1, group.ranks_per_node, "intra", bw * intra.efficiency,
                     intra.latency_s)
