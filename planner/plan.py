"""Layout (the parallel configuration) and Plan (model + cluster + job + layout + estimate).

Validation happens once, at construction, with messages that name the offending numbers."""

import dataclasses
import json
import os
import tempfile
from dataclasses import dataclass

from planner import limits, rules
from planner.cost import pipeline
from planner.engines import (  # noqa: F401
    CP_COMMS,
    INTERLEAVED,
    OFFLOADS,
    RECOMPUTE,
    SCHEDULES,
    ZERO_BUBBLE,
)
from planner.hardware import Cluster
from planner.job import JOB_KEYS_SINCE_4, Job
from planner.limits import check_int
from planner.schema import check_keys, load_json_file, require_bool, require_choice, require_int
from planner.spec import ModelSpec

# the largest value of each layout field (planner/limits.py gives the sources)
LAYOUT_BOUNDS = {"dp": limits.MAX_DEGREE, "tp": limits.MAX_DEGREE, "pp": limits.MAX_DEGREE,
                 "ep": limits.MAX_DEGREE, "etp": limits.MAX_DEGREE, "cp": limits.MAX_DEGREE,
                 "dp_shard": limits.MAX_DEGREE,
                 "micro_batch": limits.MAX_GLOBAL_BATCH,
                 "num_microbatches": limits.MAX_GLOBAL_BATCH,
                 "virtual_stages": limits.MAX_LAYERS, "recompute_every": limits.MAX_LAYERS}
# 2: the attached estimate no longer repeats the plan; 3: layout recompute_every and compile;
# 4: model attention_head_dim, moe and mla (planner/moe_spec.py), layout LAYOUT_KEYS_SINCE_4
SCHEMA_VERSION = 4
READABLE_VERSIONS = (1, 2, 3, 4)
LAYOUT_KEYS_SINCE_3 = ("recompute_every", "compile")  # absent from older files: their defaults
LAYOUT_KEYS_SINCE_4 = ("ep", "etp", "cp", "cp_comm", "dp_shard", "offload")
# Mesh axes, outermost first.  cp sits inside dp and outside tp, as torchtitan's
# ["pp", "dp_replicate", "dp_shard", "cp", "tp"] mesh does (torchtitan parallel_dims.py): the cp
# ranks of one sequence are neighbours, within a node where tp*cp fits one.  A mesh_order of the
# three axes pp, dp, tp (plans before cp) gets cp right after dp.
AXES = ("pp", "dp", "cp", "tp")
LEGACY_AXES = ("pp", "dp", "tp")


def full_mesh_order(order) -> tuple:
    """The four-axis order of a mesh_order; a three-axis one (pp, dp, tp) gets cp after dp."""
    order = tuple(map(str, order))
    if sorted(order) == sorted(LEGACY_AXES):
        i = order.index("dp") + 1
        return order[:i] + ("cp",) + order[i:]
    if sorted(order) != sorted(AXES):
        raise ValueError(f"mesh_order must be a permutation of {list(AXES)} (or of "
                         f"{list(LEGACY_AXES)}), got {list(order)}")
    return order



def check_compile_flag(layout, flag: bool) -> None:
    """The runtime compiles the blocks the plan says (Layout.compile); a `--compile` flag that
    contradicts the plan (whose estimate is of eager blocks) is refused."""
    if flag and not layout.compile:
        raise ValueError("--compile, but the plan has compile off (its estimate is of eager "
                         "blocks): make the plan with `planner estimate|suggest --compile`")

@dataclass(frozen=True, kw_only=True)
class Mesh:
    """The device mesh: axis sizes and their order, outermost first (what the topology reads)."""
    mesh_order: tuple
    dp: int
    tp: int
    pp: int
    cp: int = 1
    dp_shard: int = 0   # Layout.dp_shard (0: the whole dp group shards)

    @property
    def shard_size(self) -> int:
        return self.dp_shard or self.dp


@dataclass(frozen=True, kw_only=True)
class Layout:
    dp: int = 1
    tp: int = 1
    pp: int = 1
    ep: int = 1                       # expert parallel: routed experts split over ep ranks
    etp: int = 1                      # expert tensor parallel (folded over the dense group)
    cp: int = 1                       # context parallel: each sequence split over cp ranks
    cp_comm: str = "allgather"        # CP_COMMS: how attention sees the whole sequence
    # hybrid sharding (HSDP): ZeRO shards over groups of dp_shard consecutive dp ranks and
    # replicates across the dp / dp_shard groups; 0 = the whole dp group shards (plain ZeRO/FSDP)
    dp_shard: int = 0
    # CPU offload: "optimizer" states (ZeRO-Offload) or also the "params" (planner/cost/offload.py)
    offload: str = "none"
    sequence_parallel: bool = False
    zero_stage: int = 0
    micro_batch: int = 1
    num_microbatches: int = 1
    schedule: str = "1f1b"
    virtual_stages: int = 1
    recompute: str = "none"
    recompute_every: int = 1          # the policy applies to every K-th block, the others none
    compile: bool = False             # torch.compile each block
    mesh_order: tuple = AXES          # outermost -> innermost; TP innermost by default
    layers_per_stage: tuple = ()      # one entry per (virtual) stage; () = even split

    def __post_init__(self):
        for key in ("dp", "tp", "pp", "ep", "etp", "cp", "micro_batch", "num_microbatches",
                    "virtual_stages", "recompute_every"):
            require_int(getattr(self, key), key)
            check_int(getattr(self, key), key, 1, LAYOUT_BOUNDS[key])
        require_int(self.dp_shard, "dp_shard", minimum=0)
        check_int(self.dp_shard, "dp_shard", 0, LAYOUT_BOUNDS["dp_shard"])
        require_bool(self.sequence_parallel, "sequence_parallel")
        require_bool(self.compile, "compile")
        require_int(self.zero_stage, "zero_stage", minimum=0)
        if self.zero_stage > 3:
            raise ValueError(f"zero_stage must be 0, 1, 2 or 3, got {self.zero_stage}")
        require_choice(self.schedule, "schedule", SCHEDULES)
        require_choice(self.recompute, "recompute", RECOMPUTE)
        require_choice(self.cp_comm, "cp_comm", CP_COMMS)
        require_choice(self.offload, "offload", OFFLOADS)
        for key in ("mesh_order", "layers_per_stage"):
            if not isinstance(getattr(self, key), (list, tuple)):
                raise ValueError(f"{key} must be a list, got {getattr(self, key)!r}")
        object.__setattr__(self, "mesh_order", full_mesh_order(self.mesh_order))
        if len(self.layers_per_stage) > limits.MAX_LAYERS:
            raise ValueError(f"layers_per_stage has {len(self.layers_per_stage):,} entries; at "
                             f"most {limits.MAX_LAYERS:,}")
        for n in self.layers_per_stage:
            require_int(n, "layers_per_stage entry")
            check_int(n, "layers_per_stage entry", 1, limits.MAX_LAYERS)
        object.__setattr__(self, "layers_per_stage", tuple(self.layers_per_stage))

    @property
    def world_size(self) -> int:
        return self.dp * self.tp * self.pp * self.cp

    @property
    def shard_size(self) -> int:
        """Ranks one ZeRO/FSDP shard group spans (dp unless hybrid sharding splits it)."""
        return self.dp_shard or self.dp

    @property
    def dp_replicate(self) -> int:
        """Copies of the sharded model states (1 unless hybrid sharding); dp / shard_size."""
        return self.dp // self.shard_size if self.dp % self.shard_size == 0 else 0

    @property
    def hybrid(self) -> bool:
        """Hybrid sharding: a shard group smaller than dp."""
        return 0 < self.dp_shard < self.dp

    @property
    def num_chunks(self) -> int:
        """Model chunks in the pipeline: pp stages times virtual stages per rank."""
        return self.pp * self.virtual_stages

    @property
    def mesh(self) -> "Mesh":
        return Mesh(mesh_order=self.mesh_order, dp=self.dp, tp=self.tp, pp=self.pp, cp=self.cp,
                    dp_shard=self.dp_shard)

    def stage_layers(self, num_layers: int) -> tuple:
        """Layers of each model chunk, in pipeline order (chunk c lives on rank c % pp)."""
        return pipeline.stage_layers(num_layers, pp=self.pp, virtual_stages=self.virtual_stages,
                                     layers_per_stage=self.layers_per_stage)

    def chunk_rank(self, chunk: int) -> int:
        """Pipeline rank that runs model chunk `chunk` (looped placement; V shape for zbv)."""
        return pipeline.chunk_rank(chunk, pp=self.pp, schedule=self.schedule)

    def rank_chunk_layers(self, num_layers: int) -> tuple:
        """For each pipeline rank, the layer counts of the chunks it runs."""
        return pipeline.rank_chunk_layers(num_layers, pp=self.pp,
                                          virtual_stages=self.virtual_stages,
                                          schedule=self.schedule,
                                          layers_per_stage=self.layers_per_stage)

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["mesh_order"] = list(self.mesh_order)
        d["layers_per_stage"] = list(self.layers_per_stage)
        return d

    @classmethod
    def from_dict(cls, data: dict, optional=()) -> "Layout":
        """Every key is required; `optional` names keys an older plan schema_version lacked."""
        return cls(**check_keys(data, cls, "layout", optional))


def layout_errors(model: ModelSpec, cluster: Cluster, job: Job, layout: Layout) -> list:
    """Every reason this layout cannot run this job on this cluster (planner.rules)."""
    ctx = rules.Context(model=model, profile=cluster.profile, job=job)
    return rules.messages(ctx, rules.layout_columns(layout, cluster.world_size))


@dataclass(frozen=True, kw_only=True)
class Plan:
    model: ModelSpec
    cluster: Cluster
    job: Job
    layout: Layout
    estimate: dict | None = None
    schema_version: int = SCHEMA_VERSION

    def __post_init__(self):
        if self.schema_version != SCHEMA_VERSION:
            raise ValueError(f"plan schema_version {self.schema_version!r} is not supported "
                             f"(expected {SCHEMA_VERSION})")
        errors = layout_errors(self.model, self.cluster, self.job, self.layout)
        if errors:
            raise ValueError(errors[0])

    def with_estimate(self, estimate: dict | None) -> "Plan":
        """The plan with an estimate attached (Estimate.to_dict(); its copy of the plan is
        dropped: the plan is the file)."""
        if estimate is not None:
            estimate = {k: v for k, v in estimate.items() if k != "plan"}
        return dataclasses.replace(self, estimate=estimate)

    def to_dict(self) -> dict:
        return {"schema_version": self.schema_version, "model": self.model.to_dict(),
                "cluster": self.cluster.to_dict(), "job": self.job.to_dict(),
                "layout": self.layout.to_dict(), "estimate": self.estimate}

    @classmethod
    def from_dict(cls, data: dict) -> "Plan":
        """Every key is required; a version-1 file's estimate loses its copy of the plan, a
        version 1 or 2 layout lacks LAYOUT_KEYS_SINCE_3, a version 1-3 layout lacks
        LAYOUT_KEYS_SINCE_4, its job JOB_KEYS_SINCE_4 (pre-training, no LoRA) and its model the
        MoE/MLA keys (they take their defaults: dense)."""
        check_keys(data, cls, "plan")
        version = data["schema_version"]
        if isinstance(version, bool) or version not in READABLE_VERSIONS:
            raise ValueError(f"plan schema_version {version!r} is not supported "
                             f"(this planner reads {', '.join(map(str, READABLE_VERSIONS))})")
        if data["estimate"] is not None and not isinstance(data["estimate"], dict):
            raise ValueError("plan estimate must be an object or null")
        optional = (LAYOUT_KEYS_SINCE_3 if version < 3 else ()) + \
            (LAYOUT_KEYS_SINCE_4 if version < 4 else ())
        job_optional = JOB_KEYS_SINCE_4 if version < 4 else ()
        plan = cls(model=ModelSpec.from_dict(data["model"], strict=version >= 4),
                   cluster=Cluster.from_dict(data["cluster"]),
                   job=Job.from_dict(data["job"], job_optional),
                   layout=Layout.from_dict(data["layout"], optional))
        return plan.with_estimate(data["estimate"])

    def save(self, path) -> None:
        """Strict JSON (no NaN/Infinity), written to a temporary file and renamed into place:
        a failed write never leaves half a plan."""
        text = json.dumps(self.to_dict(), indent=1, allow_nan=False) + "\n"
        target = os.path.realpath(path)
        fd, tmp = tempfile.mkstemp(dir=os.path.dirname(target), prefix=".plan.")
        try:
            with os.fdopen(fd, "w") as f:
                f.write(text)
            os.replace(tmp, target)
        except BaseException:
            if os.path.exists(tmp):
                os.unlink(tmp)
            raise

    @classmethod
    def load(cls, path) -> "Plan":
        try:
            return cls.from_dict(load_json_file(path, "plan"))
        except TypeError as exc:
            raise ValueError(f"plan {path}: {exc}") from None
