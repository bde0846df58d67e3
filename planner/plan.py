"""Layout (the parallel configuration) and Plan (model + cluster + job + layout + estimate).

Validation happens once, at construction, with messages that name the offending numbers."""

import dataclasses
import json
from dataclasses import dataclass

from planner.hardware import Cluster
from planner.job import Job
from planner.schema import (check_keys, load_json_file, require_bool, require_choice,
                            require_int)
from planner.spec import ModelSpec

SCHEMA_VERSION = 1
SCHEDULES = ("gpipe", "1f1b", "interleaved_1f1b", "interleaved_zb", "zbv")
INTERLEAVED = ("interleaved_1f1b", "interleaved_zb", "zbv")
ZERO_BUBBLE = ("interleaved_zb", "zbv")
RECOMPUTE = ("none", "selective", "full")
AXES = ("pp", "dp", "tp")


@dataclass(frozen=True, kw_only=True)
class Layout:
    dp: int = 1
    tp: int = 1
    pp: int = 1
    sequence_parallel: bool = False
    zero_stage: int = 0
    micro_batch: int = 1
    num_microbatches: int = 1
    schedule: str = "1f1b"
    virtual_stages: int = 1
    recompute: str = "none"
    mesh_order: tuple = AXES          # outermost -> innermost; TP innermost by default
    layers_per_stage: tuple = ()      # one entry per (virtual) stage; () = even split

    def __post_init__(self):
        for key in ("dp", "tp", "pp", "micro_batch", "num_microbatches", "virtual_stages"):
            require_int(getattr(self, key), key)
        require_bool(self.sequence_parallel, "sequence_parallel")
        require_int(self.zero_stage, "zero_stage", minimum=0)
        if self.zero_stage > 3:
            raise ValueError(f"zero_stage must be 0, 1, 2 or 3, got {self.zero_stage}")
        require_choice(self.schedule, "schedule", SCHEDULES)
        require_choice(self.recompute, "recompute", RECOMPUTE)
        for key in ("mesh_order", "layers_per_stage"):
            if not isinstance(getattr(self, key), (list, tuple)):
                raise ValueError(f"{key} must be a list, got {getattr(self, key)!r}")
        if sorted(map(str, self.mesh_order)) != sorted(AXES):
            raise ValueError(f"mesh_order must be a permutation of {list(AXES)}, "
                             f"got {list(self.mesh_order)}")
        for n in self.layers_per_stage:
            require_int(n, "layers_per_stage entry")
        object.__setattr__(self, "mesh_order", tuple(self.mesh_order))
        object.__setattr__(self, "layers_per_stage", tuple(self.layers_per_stage))

    @property
    def world_size(self) -> int:
        return self.dp * self.tp * self.pp

    @property
    def num_chunks(self) -> int:
        """Model chunks in the pipeline: pp stages times virtual stages per rank."""
        return self.pp * self.virtual_stages

    def stage_layers(self, num_layers: int) -> tuple:
        """Layers of each model chunk, in pipeline order (chunk c lives on rank c % pp)."""
        if self.layers_per_stage:
            return self.layers_per_stage
        base, extra = divmod(num_layers, self.num_chunks)
        return tuple(base + (1 if c < extra else 0) for c in range(self.num_chunks))

    def chunk_rank(self, chunk: int) -> int:
        """Pipeline rank that runs model chunk `chunk` (looped placement; V shape for zbv)."""
        if self.schedule == "zbv":
            return chunk if chunk < self.pp else 2 * self.pp - 1 - chunk
        return chunk % self.pp

    def rank_chunk_layers(self, num_layers: int) -> list:
        """For each pipeline rank, the layer counts of the chunks it runs."""
        per_rank = [[] for _ in range(self.pp)]
        for chunk, n in enumerate(self.stage_layers(num_layers)):
            per_rank[self.chunk_rank(chunk)].append(n)
        return per_rank

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["mesh_order"] = list(self.mesh_order)
        d["layers_per_stage"] = list(self.layers_per_stage)
        return d

    @classmethod
    def from_dict(cls, data: dict) -> "Layout":
        check_keys(data, cls, "layout")
        return cls(**data)


def _structure_errors(model: ModelSpec, cluster: Cluster, job: Job, lay: Layout):
    """Yield every reason this layout cannot run this job on this cluster."""
    world = cluster.world_size
    if lay.world_size != world:
        yield (f"dp*tp*pp = {lay.dp}*{lay.tp}*{lay.pp} = {lay.world_size} does not equal the "
               f"cluster's {world} GPUs")
    if model.num_heads % lay.tp or model.num_kv_heads % lay.tp:
        yield (f"tp={lay.tp} must divide num_heads {model.num_heads} and "
               f"num_kv_heads {model.num_kv_heads}")
    if model.ffn_hidden_size % lay.tp:
        yield f"tp={lay.tp} must divide ffn_hidden_size {model.ffn_hidden_size}"
    gpn = cluster.profile.gpus_per_node
    if lay.tp > gpn:
        yield f"TP={lay.tp} needs {lay.tp} GPUs per node; a node has {gpn}"
    if lay.sequence_parallel and lay.tp == 1:
        yield "sequence_parallel needs tp > 1"
    if lay.sequence_parallel and job.seq_len % lay.tp:
        yield f"sequence parallel: tp={lay.tp} must divide seq len {job.seq_len}"
    if lay.zero_stage and lay.dp == 1:
        yield f"ZeRO-{lay.zero_stage} shards over data parallel ranks; it needs dp > 1 (dp = 1)"
    samples = lay.micro_batch * lay.num_microbatches * lay.dp
    if samples != job.global_batch:
        yield (f"global batch {job.global_batch} != micro batch {lay.micro_batch} x "
               f"{lay.num_microbatches} micro-batches x dp {lay.dp} = {samples}")
    if not cluster.profile.supports(job.precision):
        yield (f"precision {job.precision} is not supported by profile "
               f"{cluster.profile.name} ({cluster.profile.gpu.name} supports "
               f"{', '.join(sorted(cluster.profile.gpu.peak_flops))})")
    if model.learned_positions and job.seq_len > model.max_seq_len:
        yield (f"seq len {job.seq_len} exceeds {model.name}'s {model.max_seq_len} "
               f"learned positions")
    yield from _pipeline_errors(model, job, lay)


def _pipeline_errors(model: ModelSpec, job: Job, lay: Layout):
    v, pp, m = lay.virtual_stages, lay.pp, lay.num_microbatches
    if lay.schedule in INTERLEAVED and pp == 1:
        yield f"schedule {lay.schedule} needs pp > 1"
    if lay.schedule == "zbv" and v != 2:
        yield f"schedule zbv runs exactly 2 virtual stages per rank, got {v}"
    elif lay.schedule in INTERLEAVED and pp > 1 and v < 2:
        yield f"schedule {lay.schedule} needs virtual_stages >= 2, got {v}"
    if lay.schedule not in INTERLEAVED and v != 1:
        yield f"schedule {lay.schedule} runs one stage per rank; virtual_stages is {v}"
    if lay.schedule in INTERLEAVED and pp > 1 and m % pp:
        yield (f"interleaved schedule needs micro-batches ({m}) divisible by pp ({pp})")
    if lay.num_chunks > model.num_layers:
        yield (f"pp*virtual_stages = {lay.num_chunks} model chunks exceed "
               f"{model.num_layers} layers")
    if lay.layers_per_stage:
        n = len(lay.layers_per_stage)
        if n != lay.num_chunks:
            yield f"layers_per_stage has {n} entries; pp*virtual_stages is {lay.num_chunks}"
        elif sum(lay.layers_per_stage) != model.num_layers:
            yield (f"layers_per_stage sums to {sum(lay.layers_per_stage)}; the model has "
                   f"{model.num_layers} layers")
    yield from _engine_errors(job, lay)


def _engine_errors(job: Job, lay: Layout):
    """Combinations PyTorch 2.13's building blocks refuse or get wrong (runtime notes 1-3)."""
    if job.engine != "torch" or lay.pp == 1:
        return
    if lay.schedule in ZERO_BUBBLE and lay.dp > 1 and lay.zero_stage in (0, 1):
        yield (f"schedule {lay.schedule} with DDP (ZeRO-{lay.zero_stage}, dp={lay.dp}) gives "
               f"wrong gradients in PyTorch; use ZeRO-2")
    if lay.schedule in ZERO_BUBBLE and lay.zero_stage == 3:
        yield f"schedule {lay.schedule} with ZeRO-3 gives wrong gradients in PyTorch; use ZeRO-2"
    if lay.dp > 1 and lay.zero_stage in (0, 1) and lay.num_microbatches <= lay.pp:
        yield (f"DDP under pipelining needs more micro-batches ({lay.num_microbatches}) "
               f"than stages (pp={lay.pp})")
    yield from _ddp_pipeline_errors(lay)
    if lay.schedule == "1f1b" and lay.num_microbatches < lay.pp:
        yield (f"PyTorch's 1F1B schedule needs at least as many micro-batches "
               f"({lay.num_microbatches}) as stages (pp={lay.pp})")


def _ddp_pipeline_errors(lay: Layout):
    """DDP proper (ZeRO-0/1 without TP; with TP the runtime uses FSDP2's replicate) under
    PyTorch 2.13's pipeline schedules: checked on 4 gloo ranks (dp=2, pp=2)."""
    if not (lay.dp > 1 and lay.zero_stage in (0, 1) and lay.tp == 1):
        return
    if lay.schedule == "gpipe":
        yield (f"schedule gpipe with DDP (ZeRO-{lay.zero_stage}, dp={lay.dp}) fails in PyTorch "
               f"(DDP reducer assert at the second step); use 1f1b or ZeRO-2")
    elif lay.virtual_stages > 1 and lay.num_microbatches <= lay.num_chunks:
        yield (f"DDP under an interleaved schedule needs more micro-batches "
               f"({lay.num_microbatches}) than chunks (pp x virtual_stages = {lay.num_chunks})")


def layout_errors(model: ModelSpec, cluster: Cluster, job: Job, layout: Layout) -> list:
    return list(_structure_errors(model, cluster, job, layout))


@dataclass(frozen=True, kw_only=True)
class Plan:
    model: ModelSpec
    cluster: Cluster
    job: Job
    layout: Layout
    estimate: dict = None
    schema_version: int = SCHEMA_VERSION

    def __post_init__(self):
        if self.schema_version != SCHEMA_VERSION:
            raise ValueError(f"plan schema_version {self.schema_version!r} is not supported "
                             f"(expected {SCHEMA_VERSION})")
        errors = layout_errors(self.model, self.cluster, self.job, self.layout)
        if errors:
            raise ValueError(errors[0])

    def with_estimate(self, estimate: dict) -> "Plan":
        return dataclasses.replace(self, estimate=estimate)

    def to_dict(self) -> dict:
        return {"schema_version": self.schema_version, "model": self.model.to_dict(),
                "cluster": self.cluster.to_dict(), "job": self.job.to_dict(),
                "layout": self.layout.to_dict(), "estimate": self.estimate}

    @classmethod
    def from_dict(cls, data: dict) -> "Plan":
        check_keys(data, cls, "plan")
        if data.get("estimate") is not None and not isinstance(data["estimate"], dict):
            raise ValueError("plan estimate must be an object or null")
        return cls(schema_version=data.get("schema_version", SCHEMA_VERSION),
                   model=ModelSpec.from_dict(data["model"]),
                   cluster=Cluster.from_dict(data["cluster"]), job=Job.from_dict(data["job"]),
                   layout=Layout.from_dict(data["layout"]), estimate=data.get("estimate"))

    def save(self, path) -> None:
        with open(path, "w") as f:
            json.dump(self.to_dict(), f, indent=1)
            f.write("\n")

    @classmethod
    def load(cls, path) -> "Plan":
        try:
            return cls.from_dict(load_json_file(path, "plan"))
        except TypeError as exc:
            raise ValueError(f"plan {path}: {exc}") from None
