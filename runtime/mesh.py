"""Process group and named DeviceMesh from a plan's layout (gloo on CPU, NCCL on CUDA).

The launched world size is checked against the plan before any collective, so a wrong launch
fails on every rank with one line instead of hanging (RUNTIME_NOTES item 5: short timeouts)."""

import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

DEFAULT_TIMEOUT_S = 60


@dataclass(frozen=True, kw_only=True)
class DistContext:
    """This rank's place in the job: the world mesh and its coordinates on it."""
    mesh: DeviceMesh
    device: torch.device
    rank: int
    world_size: int
    coords: dict  # {"pp": i, "dp": j, "cp": c, "tp": k}
    data_mesh: DeviceMesh  # 1-D: dp, or dp x cp flattened (FSDP/DDP shard and reduce)
    # ("edp", "ep") over this rank's dp group when layout.ep > 1
    expert_mesh: DeviceMesh | None = None
    hsdp_mesh: DeviceMesh | None = None  # hybrid sharding: the 2-D (dp_replicate, dp_shard) mesh

    @property
    def pp_rank(self) -> int:
        return self.coords["pp"]

    @property
    def dp_rank(self) -> int:
        return self.coords["dp"]

    @property
    def tp_rank(self) -> int:
        return self.coords["tp"]

    @property
    def cp_rank(self) -> int:
        return self.coords.get("cp", 0)

    @property
    def data_rank(self) -> int:
        """Index in the dp x cp group (the FSDP shard a rank holds)."""
        return self.data_mesh.get_local_rank()

    def data_group(self):
        return self.data_mesh.get_group()

    def size(self, axis: str) -> int:
        if axis in ("edp", "ep"):
            assert self.expert_mesh is not None, axis
            return self.expert_mesh.size(("edp", "ep").index(axis))
        return self.mesh.size((self.mesh.mesh_dim_names or ()).index(axis))

    def group(self, axis: str):
        if axis in ("edp", "ep"):
            assert self.expert_mesh is not None, axis
            return self.expert_mesh.get_group(axis)
        return self.mesh.get_group(axis)

    @property
    def ep(self) -> int:
        return 1 if self.expert_mesh is None else self.expert_mesh.size(1)

    @property
    def ep_rank(self) -> int:
        return 0 if self.expert_mesh is None else self.expert_mesh.get_local_rank("ep")

    def rank_at(self, **coords) -> int:
        """Global rank at the given coordinates (axes not given: this rank's own)."""
        full = {**self.coords, **coords}
        index = tuple(full[name] for name in self.mesh.mesh_dim_names or ())
        return int(self.mesh.mesh[index])


def check_world_size(layout) -> int:
    """The launched world size (WORLD_SIZE, 1 without torchrun); ValueError if the plan differs."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world != layout.world_size:
        raise ValueError(f"the plan needs {layout.world_size} processes "
                         f"(dp {layout.dp} x tp {layout.tp} x pp {layout.pp} x cp "
                         f"{layout.cp}) but "
                         f"{world} were launched; use --nproc-per-node {layout.world_size}")
    return world


def _device() -> torch.device:
    if torch.cuda.is_available():
        local = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local)
        return torch.device("cuda", local)
    return torch.device("cpu")


def init_distributed(layout, timeout_s: float = DEFAULT_TIMEOUT_S) -> DistContext:
    """Start (or reuse) the default process group and build the mesh in layout.mesh_order."""
    world = check_world_size(layout)
    device = _device()
    if not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        timeout = timedelta(seconds=timeout_s)
        if "MASTER_ADDR" in os.environ:
            dist.init_process_group(backend, timeout=timeout)
        else:  # a single process started without torchrun
            dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1,
                                    timeout=timeout)
    order = tuple(layout.mesh_order)
    shape = tuple(getattr(layout, axis) for axis in order)
    mesh = init_device_mesh(device.type, shape, mesh_dim_names=order)
    coord = mesh.get_coordinate()
    assert coord is not None  # every rank is in the world's mesh
    return DistContext(mesh=mesh, device=device, rank=dist.get_rank(), world_size=world,
                       coords=dict(zip(order, coord)), data_mesh=_data_mesh(mesh, layout),
                       expert_mesh=expert_mesh(mesh, layout), hsdp_mesh=hsdp_mesh(mesh, layout))


def _data_mesh(mesh: DeviceMesh, layout) -> DeviceMesh:
    """The dp x cp ranks as one mesh dimension (torchtitan's dp_shard_cp): ZeRO/FSDP shard and
    gradients reduce over every rank that holds other tokens of the batch."""
    if layout.cp == 1:
        return mesh["dp"]
    names = tuple(a for a in mesh.mesh_dim_names or () if a in ("dp", "cp"))
    return mesh[names]._flatten("dp_cp")


def expert_mesh(mesh: DeviceMesh, layout):
    """The data-parallel group split into expert-data-parallel x expert-parallel (ep inner:
    dp rank d is ep rank d % ep, Megatron-Core's adjacent EP ranks), or None when ep is 1."""
    if layout.ep == 1:
        return None
    if layout.dp % layout.ep:
        raise ValueError(f"ep={layout.ep} does not divide dp={layout.dp}: the runtime splits "
                         f"experts over the data-parallel group")
    return mesh["dp"]._unflatten(0, (layout.dp // layout.ep, layout.ep), ("edp", "ep"))


def hsdp_mesh(mesh: DeviceMesh, layout):
    """Hybrid sharding's 2-D (dp_replicate, dp_shard) mesh, the dp axis unflattened replicate
    outer and shard inner (a shard group is dp_shard consecutive dp ranks, as
    planner/topology.py places it); None without hybrid sharding."""
    if not 0 < layout.dp_shard < layout.dp:
        return None
    split = mesh._unflatten("dp", (layout.dp // layout.dp_shard, layout.dp_shard),
                            ("dp_replicate", "dp_shard"))
    return split["dp_replicate", "dp_shard"]


def pair_group(ctx: DistContext, pp_a: int, pp_b: int):
    """The group of ranks at pipeline ranks pp_a and pp_b with this rank's dp/tp coordinates.

    Every rank must call this (new_subgroups_by_enumeration is collective)."""
    pairs, seen = [], set()
    for rank in range(ctx.world_size):
        index = (ctx.mesh.mesh == rank).nonzero()[0].tolist()
        coords = dict(zip(ctx.mesh.mesh_dim_names or (), index))
        a = ctx.rank_at(**{**coords, "pp": pp_a})
        b = ctx.rank_at(**{**coords, "pp": pp_b})
        if (a, b) not in seen:
            seen.add((a, b))
            pairs.append([a, b])
    group, _ = dist.new_subgroups_by_enumeration(pairs)
    return group
