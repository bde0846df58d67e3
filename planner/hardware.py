"""Hardware profiles (one JSON per profile in hardware_profiles/) and clusters (profile x nodes)."""

import dataclasses
import importlib.util
from dataclasses import dataclass, field
from pathlib import Path

from planner.schema import (check_keys, load_json_file, require_bool, require_choice,
                            require_int, require_number, require_str)



def _profile_dir() -> Path:
    """hardware_profiles/ of the source tree, else the copy installed as package data
    (pyproject.toml maps it to planner.hardware_profiles)."""
    source = Path(__file__).resolve().parent.parent / "hardware_profiles"
    if source.is_dir():
        return source
    installed = importlib.util.find_spec("planner.hardware_profiles")
    return Path(list(installed.submodule_search_locations)[0]) if installed else source


PROFILE_DIR = _profile_dir()
SCHEMA_VERSION = 1
INTRA_KINDS = ("nvswitch", "nvlink_mesh", "pcie", "shm")


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
    framework_overhead_bytes: int  # CUDA context, allocator reserve, workspace
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
        require_str(self.name, "gpu.name")
        require_int(self.memory_bytes, "gpu.memory_bytes")
        if not isinstance(self.peak_flops, dict) or not self.peak_flops:
            raise ValueError("gpu.peak_flops must be a non-empty object of dtype -> FLOP/s")
        for dtype, value in self.peak_flops.items():
            require_choice(dtype, "gpu.peak_flops key", ("fp32", "bf16", "fp16", "fp8"))
            require_number(value, f"gpu.peak_flops.{dtype}", strict=True)
        require_number(self.hbm_bandwidth_bytes_per_s, "gpu.hbm_bandwidth_bytes_per_s", strict=True)
        for key in ("gemm_efficiency_max", "memory_efficiency", "attention_efficiency"):
            value = getattr(self, key)
            require_number(value, f"gpu.{key}", strict=True)
            if value > 1:
                raise ValueError(f"gpu.{key} must be <= 1, got {value}")
        require_number(self.gemm_half_dim, "gpu.gemm_half_dim")
        require_number(self.kernel_overhead_s, "gpu.kernel_overhead_s")
        require_int(self.framework_overhead_bytes, "gpu.framework_overhead_bytes", minimum=0)
        require_bool(self.host_is_device, "gpu.host_is_device")
        require_int(self.shared_cores, "gpu.shared_cores", minimum=0)
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
        if not (isinstance(key, str) and key.isdigit() and int(key) >= 1):
            raise ValueError(f"{name} key must be a TP degree such as \"2\", got {key!r}")
        if not isinstance(value, list) or len(value) != 2:
            raise ValueError(f"{name}[{key!r}] must be [forward_s, backward_s], got {value!r}")
        for v in value:
            require_number(v, f"{name}[{key!r}]")


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
        require_number(self.bandwidth_bytes_per_s, "intra_node.bandwidth_bytes_per_s", strict=True)
        require_number(self.latency_s, "intra_node.latency_s")
        require_number(self.efficiency, "intra_node.efficiency", strict=True)
        if self.kind == "nvlink_mesh":
            require_number(self.link_bandwidth_bytes_per_s,
                           "intra_node.link_bandwidth_bytes_per_s", strict=True)
            require_number(self.fallback_bandwidth_bytes_per_s,
                           "intra_node.fallback_bandwidth_bytes_per_s", strict=True)
            if not isinstance(self.links, list) or not self.links:
                raise ValueError("intra_node.links must list [gpu_a, gpu_b, num_links] triples")
            for link in self.links:
                if (not isinstance(link, list) or len(link) != 3
                        or not all(isinstance(x, int) and x >= 0 for x in link)):
                    raise ValueError(f"intra_node.links entry {link!r} is not "
                                     f"[gpu_a, gpu_b, num_links]")


@dataclass(frozen=True, kw_only=True)
class InterNode:
    """The network between nodes."""
    bandwidth_bytes_per_s: float  # all NICs of one node together, per direction
    latency_s: float
    efficiency: float

    def __post_init__(self):
        require_number(self.bandwidth_bytes_per_s, "inter_node.bandwidth_bytes_per_s")
        require_number(self.latency_s, "inter_node.latency_s")
        require_number(self.efficiency, "inter_node.efficiency", strict=True)


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

    def __post_init__(self):
        if self.schema_version != SCHEMA_VERSION:
            raise ValueError(f"profile schema_version {self.schema_version!r} is not supported "
                             f"(expected {SCHEMA_VERSION})")
        require_str(self.name, "profile name")
        require_int(self.gpus_per_node, "gpus_per_node")
        if not isinstance(self.sources, dict):
            raise ValueError("profile sources must be an object of field -> citation")
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
        check_keys(data, cls, "hardware profile")
        parts = {}
        for key, part_cls in (("gpu", GpuSpec), ("intra_node", IntraNode),
                              ("inter_node", InterNode)):
            check_keys(data[key], part_cls, f"hardware profile {key}")
            parts[key] = part_cls(**data[key])
        return cls(**{**data, **parts})


@dataclass(frozen=True, kw_only=True)
class Cluster:
    """A profile times a node count; `num_gpus` may use fewer GPUs than the nodes hold."""
    profile: HardwareProfile
    num_nodes: int
    num_gpus: int = 0  # 0 means all GPUs of all nodes

    def __post_init__(self):
        require_int(self.num_nodes, "nodes")
        require_int(self.num_gpus, "num_gpus", minimum=0)
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
                   num_nodes=data["num_nodes"], num_gpus=data.get("num_gpus", 0))


def list_profiles() -> list:
    return sorted(p.stem for p in PROFILE_DIR.glob("*.json"))


def load_profile(source: str) -> HardwareProfile:
    """A profile name from hardware_profiles/ or a path to a profile JSON."""
    path = PROFILE_DIR / f"{source}.json"
    if not path.is_file():
        if not source.endswith(".json"):
            raise ValueError(f"unknown cluster profile {source!r}; known: "
                             f"{', '.join(list_profiles())} (or a path to a profile JSON)")
        path = Path(source)
    try:
        return HardwareProfile.from_dict(load_json_file(path, "hardware profile"))
    except TypeError as exc:
        raise ValueError(f"hardware profile {source}: {exc}") from None


def load_cluster(source: str, nodes: int, num_gpus: int = 0) -> Cluster:
    return Cluster(profile=load_profile(source), num_nodes=nodes, num_gpus=num_gpus)
