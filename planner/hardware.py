"""Hardware profiles (one JSON per profile in hardware_profiles/) and clusters (profile x nodes)."""

import dataclasses
import importlib.util
from dataclasses import dataclass, field
from pathlib import Path

from planner import limits
from planner.limits import check_int, check_range
from planner.schema import (check_keys, load_json_file, require_bool, require_choice,
                            require_number, require_str, short_repr, show_path)


def _profile_dir() -> Path:
    """hardware_profiles/ of the source tree, else the copy installed as package data
    (pyproject.toml maps it to planner.hardware_profiles)."""
    source = Path(__file__).resolve().parent.parent / "hardware_profiles"
    if source.is_dir():
        return source
    installed = importlib.util.find_spec("planner.hardware_profiles")
    locations = installed.submodule_search_locations if installed else None
    return Path(list(locations)[0]) if locations else source


PROFILE_DIR = _profile_dir()
# 2: every key is present (1 lacked the gpu keys below, which then meant {}, false and 0).
# 3: the one gpu.framework_overhead_bytes became the itemised memory outside tensors
#    (OUTSIDE_TENSOR_KEYS); a version 1/2 file loads with its figure as context_bytes, the
#    other items 0 (legacy_outside_tensors), so its totals are unchanged and its sources say so.
# 4: the host section (HostSpec: host memory, host-to-device bandwidth, CPU Adam rate, for CPU
#    offload); a version 1-3 file loads with HostSpec() - every figure 0, "not known" - and
#    offload plans are refused on it (planner/rules.py offload_host)
SCHEMA_VERSION = 4
V1_OPTIONAL_GPU_KEYS = {"host_layer_overhead_s": {}, "host_is_device": False, "shared_cores": 0}
OUTSIDE_TENSOR_KEYS = ("context_bytes", "blas_workspace_bytes", "comm_buffer_bytes_per_group",
                       "comm_buffer_bytes_per_peer", "allocator_fragmentation")
LEGACY_OVERHEAD_KEY = "framework_overhead_bytes"
MAX_FRAGMENTATION = 1.0  # reserved-but-free bytes as a fraction of the tensor bytes
INTRA_KINDS = ("nvswitch", "nvlink_mesh", "pcie", "shm")
# Keys only an nvlink_mesh fabric needs; documented as optional for the other kinds.
MESH_KEYS = ("link_bandwidth_bytes_per_s", "links", "fallback_bandwidth_bytes_per_s")
MAX_NAME_LEN = 256


@dataclass(frozen=True, kw_only=True)
class GpuSpec:
    """One accelerator (or one CPU process for the `cpu` profile)."""
    name: str
    memory_bytes: int
    peak_flops: dict            # dtype -> dense FLOP/s; a dtype absent here is unsupported
    hbm_bandwidth_bytes_per_s: float
    gemm_efficiency_max: float  # fraction of peak a large, well-shaped GEMM sustains
    gemm_half_dim: float        # GEMM efficiency per dimension d is d / (d + gemm_half_dim)
    attention_efficiency: float  # fraction of peak a fused (flash) attention kernel sustains
    memory_efficiency: float    # fraction of HBM bandwidth that elementwise kernels reach
    kernel_overhead_s: float    # launch + tail cost per kernel
    # Memory outside the plan's tensors (planner/cost/outside.py; sources in each profile):
    context_bytes: int          # the CUDA context (CPU ranks: the process's torch runtime)
    blas_workspace_bytes: int   # one cuBLAS workspace (per handle and stream)
    comm_buffer_bytes_per_group: int  # one communicator's collective buffers (>= 2 ranks)
    comm_buffer_bytes_per_peer: int   # point-to-point buffers per pipeline peer
    allocator_fragmentation: float  # caching allocator: reserved-but-free / tensor bytes
    # Host (Python + framework dispatch) seconds per transformer layer and micro-batch of the
    # torch engine, by tensor-parallel degree: {"1": [forward_s, backward_s], "2": [...]};
    # measured by `planner profile`.  {} = not measured (no host term).
    host_layer_overhead_s: dict = field(default_factory=dict)
    # True where one processor is both host and device (CPU ranks): host time adds to kernel
    # time.  False on GPUs: the host queues kernels ahead, so a layer takes the longer of the two.
    host_is_device: bool = False
    # CPU ranks: the cores all ranks of a node share (their rates above are each rank's share
    # with every rank busy).  0: every rank has a device of its own (GPUs).
    shared_cores: int = 0

    def __post_init__(self):
        require_str(self.name, "gpu.name", MAX_NAME_LEN)
        check_int(self.memory_bytes, "gpu.memory_bytes", limits.MIN_MEMORY_BYTES,
                  limits.MAX_MEMORY_BYTES)
        if not isinstance(self.peak_flops, dict) or not self.peak_flops:
            raise ValueError("gpu.peak_flops must be a non-empty object of dtype -> FLOP/s")
        for dtype, value in self.peak_flops.items():
            require_choice(dtype, "gpu.peak_flops key", ("fp32", "bf16", "fp16", "fp8"))
            check_range(value, f"gpu.peak_flops.{dtype}", limits.MIN_FLOPS, limits.MAX_FLOPS)
        _check_bandwidth(self.hbm_bandwidth_bytes_per_s, "gpu.hbm_bandwidth_bytes_per_s")
        for key in ("gemm_efficiency_max", "memory_efficiency", "attention_efficiency"):
            _check_efficiency(getattr(self, key), f"gpu.{key}")
        check_range(self.gemm_half_dim, "gpu.gemm_half_dim", 0, limits.MAX_GEMM_HALF_DIM)
        check_range(self.kernel_overhead_s, "gpu.kernel_overhead_s", 0, limits.MAX_LATENCY_S)
        for key in OUTSIDE_TENSOR_KEYS[:-1]:
            check_int(getattr(self, key), f"gpu.{key}", 0, limits.MAX_MEMORY_BYTES)
        check_range(self.allocator_fragmentation, "gpu.allocator_fragmentation", 0.0,
                    MAX_FRAGMENTATION)
        require_bool(self.host_is_device, "gpu.host_is_device")
        check_int(self.shared_cores, "gpu.shared_cores", 0, limits.MAX_SHARED_CORES)
        _check_host_table(self.host_layer_overhead_s)

    def host_layer_s(self, tp: int) -> tuple:
        """(forward, backward) host seconds of one layer at TP degree `tp`: the entry for `tp`,
        else the largest measured degree below it; (0, 0) when nothing was measured."""
        known = {int(k): v for k, v in self.host_layer_overhead_s.items() if int(k) <= tp}
        return tuple(known[max(known)]) if known else (0.0, 0.0)


def _check_host_table(table) -> None:
    name = "gpu.host_layer_overhead_s"
    if not isinstance(table, dict):
        raise ValueError(f"{name} must be an object of TP degree -> [forward_s, backward_s], "
                         f"got {table!r}")
    for key, value in table.items():
        if not (isinstance(key, str) and 0 < len(key) <= 8 and key.isascii() and key.isdigit()
                and 1 <= int(key) <= limits.MAX_GPUS_PER_NODE):
            raise ValueError(f"{name} key must be a TP degree such as \"2\", "
                             f"got {short_repr(key)}")
        if not isinstance(value, list) or len(value) != 2:
            raise ValueError(f"{name}[{key!r}] must be [forward_s, backward_s], "
                             f"got {short_repr(value)}")
        for v in value:
            require_number(v, f"{name}[{key!r}]")  # finite and >= 0
            check_range(v, f"{name}[{key!r}]", 0, limits.MAX_HOST_LAYER_S)


def _check_bandwidth(value, name: str) -> None:
    check_range(value, name, limits.MIN_BANDWIDTH, limits.MAX_BANDWIDTH)


def _check_efficiency(value, name: str) -> None:
    check_range(value, name, 0.0, 1.0, lo_open=True)


def _check_links(links) -> None:
    """[gpu_a, gpu_b, num_links] triples of distinct GPUs; a GPU's links are bounded (18 per
    H100, the most of any NVLink generation), which also bounds the ring search."""
    if not isinstance(links, list) or not links:
        raise ValueError("intra_node.links must list [gpu_a, gpu_b, num_links] triples")
    per_gpu: dict = {}
    for link in links:
        if (not isinstance(link, list) or len(link) != 3
                or not all(isinstance(x, int) and not isinstance(x, bool) for x in link)
                or min(link[:2]) < 0 or link[0] == link[1]
                or not 1 <= link[2] <= limits.MAX_NVLINKS_PER_GPU):
            raise ValueError(f"intra_node.links entry {short_repr(link)} is not [gpu_a, gpu_b, "
                             f"num_links] with gpu_a != gpu_b and 1 <= num_links <= "
                             f"{limits.MAX_NVLINKS_PER_GPU}")
        for gpu in link[:2]:
            per_gpu[gpu] = per_gpu.get(gpu, 0) + link[2]
            if per_gpu[gpu] > limits.MAX_NVLINKS_PER_GPU:
                raise ValueError(f"intra_node.links give GPU {gpu} {per_gpu[gpu]} links; at "
                                 f"most {limits.MAX_NVLINKS_PER_GPU}")


@dataclass(frozen=True, kw_only=True)
class IntraNode:
    """The GPU-to-GPU fabric inside one node."""
    kind: str                         # nvswitch | nvlink_mesh | pcie | shm
    bandwidth_bytes_per_s: float      # per GPU, per direction (nvswitch/pcie/shm)
    latency_s: float
    efficiency: float                 # fraction of link bandwidth collectives reach (NCCL busbw)
    link_bandwidth_bytes_per_s: float = 0.0  # nvlink_mesh: one link, one direction
    links: list = field(default_factory=list)  # nvlink_mesh: [gpu_a, gpu_b, num_links]
    fallback_bandwidth_bytes_per_s: float = 0.0  # nvlink_mesh: pairs without a link (PCIe/QPI)

    def __post_init__(self):
        require_choice(self.kind, "intra_node.kind", INTRA_KINDS)
        _check_bandwidth(self.bandwidth_bytes_per_s, "intra_node.bandwidth_bytes_per_s")
        check_range(self.latency_s, "intra_node.latency_s", 0, limits.MAX_LATENCY_S)
        _check_efficiency(self.efficiency, "intra_node.efficiency")
        if self.kind == "nvlink_mesh":
            _check_bandwidth(self.link_bandwidth_bytes_per_s,
                             "intra_node.link_bandwidth_bytes_per_s")
            _check_bandwidth(self.fallback_bandwidth_bytes_per_s,
                             "intra_node.fallback_bandwidth_bytes_per_s")
            _check_links(self.links)
        else:  # unused by the other kinds, but a file must still hold numbers and a list
            for key in ("link_bandwidth_bytes_per_s", "fallback_bandwidth_bytes_per_s"):
                check_range(getattr(self, key), f"intra_node.{key}", 0, limits.MAX_BANDWIDTH)
            if not isinstance(self.links, list):
                raise ValueError(f"intra_node.links must be a list, got {short_repr(self.links)}")


@dataclass(frozen=True, kw_only=True)
class InterNode:
    """The network between nodes."""
    bandwidth_bytes_per_s: float  # all NICs of one node together, per direction
    latency_s: float
    efficiency: float

    def __post_init__(self):
        _check_bandwidth(self.bandwidth_bytes_per_s, "inter_node.bandwidth_bytes_per_s")
        check_range(self.latency_s, "inter_node.latency_s", 0, limits.MAX_LATENCY_S)
        _check_efficiency(self.efficiency, "inter_node.efficiency")


@dataclass(frozen=True, kw_only=True)
class HostSpec:
    """The host side of one node, what CPU offload reads (planner/cost/offload.py).  0 = not
    known (a schema 1-3 profile, or a figure nobody measured): offload is refused there."""
    memory_bytes_per_node: int = 0        # host DRAM of one node, shared by its GPUs
    h2d_bandwidth_bytes_per_s: float = 0.0  # one GPU's host link, per direction (PCIe / C2C)
    cpu_adam_params_per_s: float = 0.0    # AdamW parameter updates per second, whole node

    def __post_init__(self):
        check_int(self.memory_bytes_per_node, "host.memory_bytes_per_node", 0,
                  limits.MAX_MEMORY_BYTES * limits.MAX_GPUS_PER_NODE)
        check_range(self.h2d_bandwidth_bytes_per_s, "host.h2d_bandwidth_bytes_per_s", 0,
                    limits.MAX_BANDWIDTH)
        check_range(self.cpu_adam_params_per_s, "host.cpu_adam_params_per_s", 0,
                    limits.MAX_FLOPS)

    @property
    def known(self) -> bool:
        return min(self.memory_bytes_per_node, self.h2d_bandwidth_bytes_per_s,
                   self.cpu_adam_params_per_s) > 0


@dataclass(frozen=True, kw_only=True)
class HardwareProfile:
    schema_version: int
    name: str
    description: str
    gpus_per_node: int
    gpu: GpuSpec
    intra_node: IntraNode
    inter_node: InterNode
    sources: dict
    host: HostSpec = HostSpec()

    def __post_init__(self):
        if self.schema_version != SCHEMA_VERSION:
            raise ValueError(f"profile schema_version {self.schema_version!r} is not supported "
                             f"(expected {SCHEMA_VERSION})")
        require_str(self.name, "profile name", MAX_NAME_LEN)
        if not isinstance(self.description, str):
            raise ValueError(f"profile description must be a string, "
                             f"got {short_repr(self.description)}")
        check_int(self.gpus_per_node, "gpus_per_node", 1, limits.MAX_GPUS_PER_NODE)
        if not isinstance(self.sources, dict) or not all(
                isinstance(v, str) for v in self.sources.values()):
            raise ValueError("profile sources must be an object of field -> citation")
        for part, cls in (("gpu", GpuSpec), ("intra_node", IntraNode),
                          ("inter_node", InterNode), ("host", HostSpec)):
            if not isinstance(getattr(self, part), cls):
                raise ValueError(f"profile {part} must be an object")
        if self.intra_node.kind == "nvlink_mesh":
            check_int(self.gpus_per_node, "gpus_per_node of an nvlink_mesh profile", 1,
                      limits.MAX_MESH_GPUS)
        for link in self.intra_node.links:
            if max(link[0], link[1]) >= self.gpus_per_node:
                raise ValueError(f"intra_node.links entry {link} names a GPU beyond "
                                 f"gpus_per_node {self.gpus_per_node}")

    def supports(self, precision: str) -> bool:
        return precision in self.gpu.peak_flops

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "HardwareProfile":
        """Every key is required, except: the nvlink_mesh keys of intra_node for other fabrics,
        and in a schema_version 1 file the gpu keys it lacked (read as {}, false and 0).  A
        version 1 or 2 profile loads as the current version (legacy_outside_tensors); a version
        1-3 file has no host section (HostSpec(): not known)."""
        version = data.get("schema_version") if isinstance(data, dict) else None
        check_keys(data, cls, "hardware profile",
                   ("host",) if version in (1, 2, 3) else ())
        if isinstance(version, bool) or version not in (1, 2, 3, SCHEMA_VERSION):
            raise ValueError(f"profile schema_version {short_repr(version)} is not supported "
                             f"(expected 1, 2, 3 or {SCHEMA_VERSION})")
        gpu, sources = data["gpu"], data["sources"]
        host = HostSpec(**check_keys(data.get("host", {}), HostSpec, "hardware profile host",
                                     () if "host" in data else
                                     tuple(f.name for f in dataclasses.fields(HostSpec))))
        if version < 3:
            gpu, sources = legacy_outside_tensors(gpu, sources)
        gpu = check_keys(gpu, GpuSpec, "hardware profile gpu",
                         tuple(V1_OPTIONAL_GPU_KEYS) if version == 1 else ())
        if version == 1:
            gpu = {**V1_OPTIONAL_GPU_KEYS, **gpu}
        intra = data["intra_node"]
        mesh = isinstance(intra, dict) and intra.get("kind") == "nvlink_mesh"
        check_keys(intra, IntraNode, "hardware profile intra_node", () if mesh else MESH_KEYS)
        inter = check_keys(data["inter_node"], InterNode, "hardware profile inter_node")
        return cls(**{**data, "schema_version": SCHEMA_VERSION, "gpu": GpuSpec(**gpu),
                      "sources": sources, "host": host,
                      "intra_node": IntraNode(**intra), "inter_node": InterNode(**inter)})


def legacy_outside_tensors(gpu, sources) -> tuple:
    """(gpu, sources) of a schema 1/2 file in schema 3 terms: its one framework_overhead_bytes
    (CUDA context, NCCL buffers, allocator reserve and workspace together) is kept whole as
    context_bytes and the other items are 0, so the file's totals are what its author meant;
    its sources say the figure is not itemised.  A file that lacks the key, or that already
    has schema 3 keys, is refused (never half-read)."""
    if not isinstance(gpu, dict):
        return gpu, sources  # check_keys names the error
    present = [k for k in OUTSIDE_TENSOR_KEYS if k in gpu]
    if present:
        raise ValueError(f"hardware profile gpu: {present[0]!r} is a schema 3 key; set "
                         f"schema_version 3 (and drop {LEGACY_OVERHEAD_KEY!r})")
    if LEGACY_OVERHEAD_KEY not in gpu:
        raise ValueError(f"hardware profile gpu: missing key {LEGACY_OVERHEAD_KEY!r} "
                         f"(schema 1/2 files carry it; schema 3 itemises it)")
    rest = {k: v for k, v in gpu.items() if k != LEGACY_OVERHEAD_KEY}
    items = {"context_bytes": gpu[LEGACY_OVERHEAD_KEY], "blas_workspace_bytes": 0,
             "comm_buffer_bytes_per_group": 0, "comm_buffer_bytes_per_peer": 0,
             "allocator_fragmentation": 0.0}
    note = (f"schema 1/2 {LEGACY_OVERHEAD_KEY} (CUDA context, communication buffers, allocator "
            f"reserve and workspace together; not itemised, the other items read as 0)")
    old = sources.get(f"gpu.{LEGACY_OVERHEAD_KEY}") if isinstance(sources, dict) else None
    if isinstance(sources, dict):
        sources = {k: v for k, v in sources.items() if k != f"gpu.{LEGACY_OVERHEAD_KEY}"}
        sources["gpu.context_bytes"] = note + (f": {old}" if isinstance(old, str) else "")
    return {**rest, **items}, sources


@dataclass(frozen=True, kw_only=True)
class Cluster:
    """A profile times a node count; `num_gpus` may use fewer GPUs than the nodes hold."""
    profile: HardwareProfile
    num_nodes: int
    num_gpus: int = 0  # 0 means all GPUs of all nodes

    def __post_init__(self):
        check_int(self.num_nodes, "nodes", 1, limits.MAX_NODES)
        check_int(self.num_gpus, "num_gpus", 0, limits.MAX_GPUS)
        if self.num_nodes * self.profile.gpus_per_node > limits.MAX_GPUS:
            raise ValueError(f"{self.num_nodes} node(s) x {self.profile.gpus_per_node} GPUs = "
                             f"{self.num_nodes * self.profile.gpus_per_node:,} GPUs; at most "
                             f"{limits.MAX_GPUS:,} are planned for")
        if self.num_gpus > self.num_nodes * self.profile.gpus_per_node:
            raise ValueError(f"num_gpus {self.num_gpus} exceeds {self.num_nodes} node(s) x "
                             f"{self.profile.gpus_per_node} GPUs")

    @property
    def world_size(self) -> int:
        return self.num_gpus or self.num_nodes * self.profile.gpus_per_node

    def to_dict(self) -> dict:
        return {"profile": self.profile.to_dict(), "num_nodes": self.num_nodes,
                "num_gpus": self.num_gpus}

    @classmethod
    def from_dict(cls, data: dict) -> "Cluster":
        check_keys(data, cls, "cluster")
        return cls(profile=HardwareProfile.from_dict(data["profile"]),
                   num_nodes=data["num_nodes"], num_gpus=data["num_gpus"])


def list_profiles() -> list:
    return sorted(p.stem for p in PROFILE_DIR.glob("*.json"))


def load_profile(source: str) -> HardwareProfile:
    """A profile name from hardware_profiles/ or a path to a profile JSON."""
    if not isinstance(source, str) or not source:
        raise ValueError(f"cluster profile must be a name or a path, got {short_repr(source)}")
    path = PROFILE_DIR / f"{source}.json"
    if not _is_file(path):
        if not source.endswith(".json"):
            raise ValueError(f"unknown cluster profile {short_repr(source)}; known: "
                             f"{', '.join(list_profiles())} (or a path to a profile JSON)")
        path = Path(source)
    try:
        return HardwareProfile.from_dict(load_json_file(path, "hardware profile"))
    except TypeError as exc:
        raise ValueError(f"hardware profile {show_path(source)}: {exc}") from None


def _is_file(path: Path) -> bool:
    try:
        return path.is_file()
    except (OSError, ValueError):  # a name too long for the file system, a NUL byte
        return False


def load_cluster(source: str, nodes: int, num_gpus: int = 0) -> Cluster:
    return Cluster(profile=load_profile(source), num_nodes=nodes, num_gpus=num_gpus)


def with_gpus(cluster: Cluster, num_gpus: int) -> Cluster:
    """`cluster` using only `num_gpus` of its GPUs (0: all): the CLI's --gpus, one GPU of a
    DGX or 4 of its 8.  Ranks fill nodes in order, so a count that leaves a whole node idle
    names more nodes than the job has: refused rather than read as fewer nodes."""
    if not num_gpus:
        return cluster
    part = Cluster(profile=cluster.profile, num_nodes=cluster.num_nodes, num_gpus=num_gpus)
    gpn = cluster.profile.gpus_per_node
    used = -(-num_gpus // gpn)
    if used < cluster.num_nodes:
        raise ValueError(f"num_gpus {num_gpus} fills {used} node(s) of {gpn} GPUs but "
                         f"{cluster.num_nodes} were given; give {used} node(s)")
    return part
