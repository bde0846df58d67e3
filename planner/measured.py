"""Typed files that cross a process boundary, read and written through one set of classes.

- `measured.json` (`Measured`): written by runtime/train.py (per-rank figures from
  runtime/measure.py), read by `planner compare`, `planner run`, `planner calibrate` and the app.
- the measurements of `planner profile` (`ProfileMeasurements`, with the machine's load as
  `MachineLoad`): written by runtime/hwprofile.py, read by planner/calibration/profile_fit.py.

`relative_error` is the one sign convention of every predicted-vs-measured error (`planner
compare`, `planner calibrate`).

Strict, as every input of the planner: each key is required and no other is allowed; a number is
a finite int or float (a bool is not one), non-negative and, where it says so, positive; a
ValueError names the key and the value.  A key may be null only where the runtime writes null;
each class's docstring says which.  `json_depth` lets a reader of untrusted bytes (the app's
uploads) refuse deep nesting before it parses."""

import dataclasses
import json
import math
import re
from dataclasses import dataclass

import numpy as np

from planner.job import PRECISIONS
from planner.limits import MAX_OTHER_LOAD_CORES, MIN_CORE_SHARE
from planner.plan import Plan
from planner.schema import (check_keys, load_json_file, require_bool, require_choice,
                            require_int, require_number, require_str)

MEASURED_SCHEMA_VERSION = 1
# 2 added repeats, spread, load_before and load_during; version 1 files still load (with
# repeats 1, no spread and no load recorded).
PROFILE_SCHEMA_VERSION = 2
PROFILE_SCHEMA_VERSIONS = (1, 2)


def relative_error(predicted: float, measured: float) -> float:
    """(predicted - measured) / measured: +0.1 means the prediction is 10% above the
    measurement (a step time predicted too slow), -0.1 10% below."""
    return (predicted - measured) / measured


# --- field checks -------------------------------------------------------------------------------

def require_finite(value, name: str, positive: bool = False) -> None:
    """A finite number >= 0 (> 0 with `positive`); bools, null, NaN and inf are refused."""
    require_number(value, name, strict=positive)
    if not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value!r}")


def _optional_finite(value, name: str) -> None:
    if value is not None:
        require_finite(value, name)


def _list(value, name: str, length: int | None = None) -> list:
    if not isinstance(value, (list, tuple)):
        raise ValueError(f"{name} must be a list, got {_short(value)}")
    if length is not None and len(value) != length:
        raise ValueError(f"{name} must have {length} entries, got {len(value)}")
    return list(value)


def _short(value, width: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= width else text[:width - 3] + "..."


# --- JSON nesting, before parsing ---------------------------------------------------------

# A JSON string, escapes included; an unterminated one runs to the end of the text.  Possessive,
# so that no input makes the scan backtrack (it is linear in the text).
_JSON_STRING = re.compile(r'"(?:[^"\\]|\\.)*+(?:"|\\?\Z)', re.DOTALL)
_OPEN, _CLOSE = np.frombuffer(b"[{", np.uint8), np.frombuffer(b"]}", np.uint8)


def json_depth(text: str) -> int:
    """Deepest nesting of arrays and objects in JSON text, without parsing it (brackets inside
    strings do not count), so that a deeply nested file is refused before json.loads recurses."""
    skeleton = np.frombuffer(_JSON_STRING.sub("", text).encode("utf-8", "replace"), np.uint8)
    steps = np.isin(skeleton, _OPEN).astype(np.int64) - np.isin(skeleton, _CLOSE)
    return int(np.cumsum(steps).max(initial=0))


def _load(cls, path, what: str):
    try:
        data = load_json_file(path, what)  # bounded: size, depth, no NaN (planner/schema.py)
    except RecursionError:
        raise ValueError(f"{what} file {path} is nested too deeply") from None
    try:
        return cls.from_dict(data)
    except ValueError as exc:
        raise ValueError(f"{path}: {exc}") from None
    except (TypeError, KeyError, AttributeError) as exc:  # a nested loader's unchecked type
        raise ValueError(f"{path}: bad value ({exc})") from None


# --- measured.json ------------------------------------------------------------------------------

@dataclass(frozen=True, kw_only=True)
class RankCoords:
    """Where a rank sits in the plan's mesh."""
    pp: int
    dp: int
    tp: int
    cp: int = 0  # context-parallel rank (absent from files written before cp: 0)

    def __post_init__(self):
        for axis in ("pp", "dp", "tp", "cp"):
            require_int(getattr(self, axis), axis, minimum=0)

    def to_dict(self) -> dict:
        """cp rank 0 is left out, as files written before cp have it."""
        d = dataclasses.asdict(self)
        if d["cp"] == 0:
            del d["cp"]
        return d

    @classmethod
    def from_dict(cls, data, context: str = "coords") -> "RankCoords":
        check_keys(data, cls, context, ("cp",))
        return _build(cls, data, context)


@dataclass(frozen=True, kw_only=True)
class RankMeasurement:
    """One rank's memory by component, on the measured step (bytes).

    `peak_allocated_bytes` is torch.cuda.max_memory_allocated, null on CPU ranks (no allocator
    to ask); every other figure is a number."""
    rank: int
    coords: RankCoords
    weights_bytes: float
    gradients_bytes: float
    optimizer_bytes: float
    activation_bytes_per_microbatch: float
    activation_peak_bytes: float
    peak_allocated_bytes: float | None
    max_rss_bytes: float

    def __post_init__(self):
        require_int(self.rank, "rank", minimum=0)
        if not isinstance(self.coords, RankCoords):
            raise ValueError(f"coords must be RankCoords, got {_short(self.coords)}")
        for name in ("weights_bytes", "gradients_bytes", "optimizer_bytes",
                     "activation_bytes_per_microbatch", "activation_peak_bytes", "max_rss_bytes"):
            require_finite(getattr(self, name), name)
        _optional_finite(self.peak_allocated_bytes, "peak_allocated_bytes")

    def to_dict(self) -> dict:
        return {**dataclasses.asdict(self), "coords": self.coords.to_dict()}

    @classmethod
    def from_dict(cls, data, context: str = "rank") -> "RankMeasurement":
        check_keys(data, cls, context)
        coords = RankCoords.from_dict(data["coords"], f"{context}.coords")
        return _build(cls, {**data, "coords": coords}, context)


@dataclass(frozen=True, kw_only=True)
class StepMeasurement:
    """One optimizer step of the run (rank 0's clock)."""
    step: int
    loss: float
    step_time_s: float
    tokens_per_s: float
    lr: float

    def __post_init__(self):
        require_int(self.step, "step", minimum=0)
        require_finite(self.loss, "loss")
        require_finite(self.step_time_s, "step_time_s", positive=True)
        require_finite(self.tokens_per_s, "tokens_per_s", positive=True)
        require_finite(self.lr, "lr")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data, context: str = "step") -> "StepMeasurement":
        check_keys(data, cls, context)
        return _build(cls, data, context)


@dataclass(frozen=True, kw_only=True)
class Measured:
    """A training run under `plan`: `planner run` / runtime.train's measured.json.

    `step_time_s` (the median step without the first) and `tokens_per_s` are positive numbers:
    the runtime writes null there only for a run that did no step (resumed at its last step),
    and such a file is refused.  `steps` may be empty (a measurement made by other tools);
    `ranks` holds each measured rank once, with coordinates inside the plan's layout."""
    plan: Plan
    steps: tuple
    val_loss: float
    step_time_s: float
    tokens_per_s: float
    ranks: tuple
    schema_version: int = MEASURED_SCHEMA_VERSION

    def __post_init__(self):
        if self.schema_version != MEASURED_SCHEMA_VERSION:
            raise ValueError(f"schema_version must be {MEASURED_SCHEMA_VERSION}, "
                             f"got {self.schema_version!r}")
        if not isinstance(self.plan, Plan):
            raise ValueError(f"plan must be a Plan, got {_short(self.plan)}")
        if not all(isinstance(s, StepMeasurement) for s in self.steps):
            raise ValueError("steps must be StepMeasurements")
        require_finite(self.val_loss, "val_loss")
        require_finite(self.step_time_s, "step_time_s", positive=True)
        require_finite(self.tokens_per_s, "tokens_per_s", positive=True)
        self._check_ranks()

    def _check_ranks(self) -> None:
        if not self.ranks or not all(isinstance(r, RankMeasurement) for r in self.ranks):
            raise ValueError("ranks must be a non-empty list of rank measurements")
        lay, seen = self.plan.layout, set()
        for r in self.ranks:
            if r.rank in seen:
                raise ValueError(f"ranks: rank {r.rank} appears twice")
            seen.add(r.rank)
            if r.rank >= lay.world_size:
                raise ValueError(f"ranks: rank {r.rank} is outside the plan's "
                                 f"{lay.world_size} ranks")
            c = r.coords
            if c.pp >= lay.pp or c.dp >= lay.dp or c.tp >= lay.tp or c.cp >= lay.cp:
                raise ValueError(f"ranks: rank {r.rank} coords {c.to_dict()} are outside the "
                                 f"plan's pp={lay.pp} dp={lay.dp} tp={lay.tp} cp={lay.cp}")

    def to_dict(self) -> dict:
        return {"schema_version": self.schema_version, "plan": self.plan.to_dict(),
                "steps": [s.to_dict() for s in self.steps], "val_loss": self.val_loss,
                "step_time_s": self.step_time_s, "tokens_per_s": self.tokens_per_s,
                "ranks": [r.to_dict() for r in self.ranks]}

    @classmethod
    def from_dict(cls, data, context: str = "measured.json") -> "Measured":
        _check_version(data, MEASURED_SCHEMA_VERSION, context)
        check_keys(data, cls, context)
        if data["step_time_s"] is None and data["steps"] == []:
            raise ValueError(f"{context}: the run measured no step (step_time_s is null)")
        try:
            plan = Plan.from_dict(data["plan"])
        except (ValueError, TypeError, KeyError, AttributeError) as exc:
            raise ValueError(f"{context}: plan: {exc}") from None
        steps = tuple(StepMeasurement.from_dict(s, f"{context} steps[{i}]")
                      for i, s in enumerate(_list(data["steps"], f"{context} steps")))
        ranks = tuple(RankMeasurement.from_dict(r, f"{context} ranks[{i}]")
                      for i, r in enumerate(_list(data["ranks"], f"{context} ranks")))
        return _build(cls, {**data, "plan": plan, "steps": steps, "ranks": ranks}, context)

    @classmethod
    def load(cls, path) -> "Measured":
        return _load(cls, path, "measured.json")

    def save(self, path) -> None:
        _save(self.to_dict(), path)

    def check_plan(self, plan: Plan, what: str = "measured.json") -> None:
        """ValueError naming the first difference when `plan` is not the plan this run used
        (model, cluster, job and layout; the estimate does not count)."""
        for part in ("model", "cluster", "job", "layout"):
            diff = _first_difference(getattr(self.plan, part).to_dict(),
                                     getattr(plan, part).to_dict(), part)
            if diff:
                path, theirs, ours = diff
                raise ValueError(f"{what} was measured under another plan: {path} is "
                                 f"{_short(theirs)} there and {_short(ours)} in the given plan")


def _first_difference(theirs, ours, path: str):
    """(dotted path, their value, our value) of the first difference, or None."""
    if isinstance(theirs, dict) and isinstance(ours, dict):
        for key in list(theirs) + [k for k in ours if k not in theirs]:
            diff = _first_difference(theirs.get(key), ours.get(key), f"{path}.{key}")
            if diff:
                return diff
        return None
    if isinstance(theirs, (list, tuple)) and isinstance(ours, (list, tuple)) \
            and len(theirs) == len(ours):
        for i, (a, b) in enumerate(zip(theirs, ours)):
            diff = _first_difference(a, b, f"{path}[{i}]")
            if diff:
                return diff
        return None
    if theirs == ours and type(theirs) is type(ours) or (
            _is_plain_number(theirs) and _is_plain_number(ours) and theirs == ours):
        return None
    return path, theirs, ours


def _is_plain_number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


# --- planner profile's measurements -------------------------------------------------------------

@dataclass(frozen=True, kw_only=True)
class MachineLoad:
    """The machine's load at one moment of `planner profile` (runtime/hwprofile.py).

    - `loadavg_1min`: os.getloadavg()[0], the host's runnable processes over the last minute;
      `own_load`: how much of it may be the profile's own processes (0 before they start);
    - `host_cpus`: os.cpu_count(); `cores`: how many cores the profile's processes use;
    - `core_share`: CPU time over wall time of CPU-bound processes on those cores, per core
      (1 = the cores were free, 0.5 = other work held half of them); null where not probed."""
    loadavg_1min: float
    own_load: float
    host_cpus: int
    cores: int
    core_share: float | None

    def __post_init__(self):
        require_finite(self.loadavg_1min, "loadavg_1min")
        require_finite(self.own_load, "own_load")
        require_int(self.host_cpus, "host_cpus", minimum=1)
        require_int(self.cores, "cores", minimum=1)
        _optional_finite(self.core_share, "core_share")

    def busy_reason(self) -> str | None:
        """Why the cores were not free (one line), or None when they were: other work's load
        average above MAX_OTHER_LOAD_CORES of spare cores, or a core share below MIN_CORE_SHARE
        (planner/limits.py)."""
        others = max(0.0, self.loadavg_1min - self.own_load)
        spare = self.host_cpus - self.cores
        if others > spare + MAX_OTHER_LOAD_CORES:
            return (f"load average {self.loadavg_1min:.2f} over the last minute on "
                    f"{self.host_cpus} cores, {others:.2f} of it other work, while the profile "
                    f"needs {self.cores} free core(s) (at most {MAX_OTHER_LOAD_CORES} busy)")
        if self.core_share is not None and self.core_share < MIN_CORE_SHARE:
            return (f"busy processes got {100 * self.core_share:.0f}% of {self.cores} core(s) "
                    f"(at least {100 * MIN_CORE_SHARE:.0f}% on free cores)")
        return None

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data, context: str = "load") -> "MachineLoad":
        check_keys(data, cls, context)
        return _build(cls, data, context)


# keys version 1 files lack, with the values they stand for
_PROFILE_V2_DEFAULTS = {"repeats": 1, "spread": {}, "load_before": None, "load_during": None}
_OPTIONAL = ("outside_tensors", "host_offload")  # documented on ProfileMeasurements


@dataclass(frozen=True, kw_only=True)
class ProfileMeasurements:
    """What runtime/hwprofile.py measured on this machine, for planner/calibration/profile_fit.py.

    - `gemms`: (m, n, k, FLOP/s) rows, at least two; `copy_bytes_per_s`: read + write bandwidth.
    - `peak_flops`: the datasheet dense peak of a known GPU; null on CPU and for a GPU the
      runtime has no datasheet figure for (the best measured GEMM is the peak then).
    - `allreduce_bytes` / `allreduce_s`: one time per size; empty with one rank (nothing to
      measure), at least two sizes otherwise.
    - `layer_host_s`: TP degree (a string, as in profiles) -> [forward_s, backward_s] of the
      host-time probe layer; `host_is_device`: the ranks are CPU processes; `shared_cores`: the
      cores those processes share (0 on GPUs).
    - `repeats`: how often each figure above was measured (it is the median of them);
      `spread`: measurement ("gemms", "copy", "allreduce", "layer_host") -> the largest
      (max - min) / median of its repeats; `load_before` / `load_during`: the machine's load
      before the measuring and while it ran.  Since schema_version 2; a version 1 file has
      repeats 1, an empty spread and null loads."""
    device_name: str
    host: str
    ranks: int
    precision: str
    peak_flops: float | None
    gemms: tuple
    copy_bytes_per_s: float
    memory_bytes: int
    allreduce_bytes: tuple
    allreduce_s: tuple
    layer_host_s: dict
    host_is_device: bool
    shared_cores: int
    repeats: int = 1
    spread: dict = dataclasses.field(default_factory=dict)
    load_before: MachineLoad | None = None
    load_during: MachineLoad | None = None
    # the memory-outside-tensors items measured (hardware profile gpu keys -> value); optional,
    # absent in files written before it: nothing measured, the base profile's items are kept
    outside_tensors: dict = dataclasses.field(default_factory=dict)
    # the host terms of CPU offload measured (hardware profile host keys -> value); optional,
    # absent in older files: the base profile's host figures are kept
    host_offload: dict = dataclasses.field(default_factory=dict)
    schema_version: int = PROFILE_SCHEMA_VERSION

    def __post_init__(self):
        if self.schema_version not in PROFILE_SCHEMA_VERSIONS or \
                isinstance(self.schema_version, bool):
            raise ValueError(f"schema_version must be 1 or 2, got {self.schema_version!r}")
        require_str(self.device_name, "device_name")
        require_str(self.host, "host")
        require_int(self.ranks, "ranks", minimum=1)
        require_choice(self.precision, "precision", PRECISIONS)
        if self.peak_flops is not None:
            require_finite(self.peak_flops, "peak_flops", positive=True)
        require_finite(self.copy_bytes_per_s, "copy_bytes_per_s", positive=True)
        require_int(self.memory_bytes, "memory_bytes", minimum=1)
        require_bool(self.host_is_device, "host_is_device")
        require_int(self.shared_cores, "shared_cores", minimum=0)
        self._check_gemms()
        self._check_allreduce()
        self._check_layer_host()
        self._check_repeats()
        self._check_outside_tensors()
        self._check_host_offload()

    def _check_host_offload(self) -> None:
        from planner.hardware import HostSpec
        if not isinstance(self.host_offload, dict):
            raise ValueError(f"host_offload must be an object, got {_short(self.host_offload)}")
        keys = [f.name for f in dataclasses.fields(HostSpec)]
        for key, value in self.host_offload.items():
            require_choice(key, "host_offload key", keys)
            require_finite(value, f"host_offload[{key!r}]")
            if value <= 0:
                raise ValueError(f"host_offload[{key!r}] must be > 0, got {value!r}")

    def _check_outside_tensors(self) -> None:
        from planner.hardware import OUTSIDE_TENSOR_KEYS
        if not isinstance(self.outside_tensors, dict):
            raise ValueError(f"outside_tensors must be an object, "
                             f"got {_short(self.outside_tensors)}")
        for key, value in self.outside_tensors.items():
            require_choice(key, "outside_tensors key", OUTSIDE_TENSOR_KEYS)
            require_finite(value, f"outside_tensors[{key!r}]")
            if value < 0:
                raise ValueError(f"outside_tensors[{key!r}] must be >= 0, got {value!r}")

    def _check_repeats(self) -> None:
        if self.schema_version == 1:
            for key, value in _PROFILE_V2_DEFAULTS.items():
                if getattr(self, key) != value:
                    raise ValueError(f"{key} needs schema_version 2")
            return
        require_int(self.repeats, "repeats", minimum=1)
        if not isinstance(self.spread, dict):
            raise ValueError(f"spread must be an object, got {_short(self.spread)}")
        for name, value in self.spread.items():
            require_str(name, "spread key")
            require_finite(value, f"spread[{name!r}]")
        for key in ("load_before", "load_during"):
            if not isinstance(getattr(self, key), MachineLoad):
                raise ValueError(f"{key} must be a load record, "
                                 f"got {_short(getattr(self, key))}")

    def _check_gemms(self) -> None:
        if len(self.gemms) < 2:
            raise ValueError(f"gemms: need at least 2 GEMM measurements, got {len(self.gemms)}")
        for i, row in enumerate(self.gemms):
            m, n, k, rate = _list(row, f"gemms[{i}]", length=4)
            for name, d in (("m", m), ("n", n), ("k", k)):
                require_int(d, f"gemms[{i}].{name}")
            require_finite(rate, f"gemms[{i}] FLOP/s", positive=True)

    def _check_allreduce(self) -> None:
        sizes, times = self.allreduce_bytes, self.allreduce_s
        if len(sizes) != len(times):
            raise ValueError(f"allreduce_bytes has {len(sizes)} sizes but allreduce_s "
                             f"{len(times)} times")
        if self.ranks > 1 and len(sizes) < 2:
            raise ValueError(f"{self.ranks} ranks need all-reduce times at 2 sizes or more, "
                             f"got {len(sizes)}")
        if self.ranks == 1 and sizes:
            raise ValueError("one rank measures no all-reduce; allreduce_bytes must be empty")
        for i, (size, t) in enumerate(zip(sizes, times)):
            require_int(size, f"allreduce_bytes[{i}]")
            require_finite(t, f"allreduce_s[{i}]", positive=True)

    def _check_layer_host(self) -> None:
        if not isinstance(self.layer_host_s, dict) or not self.layer_host_s:
            raise ValueError(f"layer_host_s must be a non-empty object, "
                             f"got {_short(self.layer_host_s)}")
        for tp, pair in self.layer_host_s.items():
            if not (isinstance(tp, str) and tp.isdecimal() and int(tp) >= 1):
                raise ValueError(f"layer_host_s: key {tp!r} must be a TP degree such as '2'")
            for name, t in zip(("forward_s", "backward_s"),
                               _list(pair, f"layer_host_s[{tp!r}]", length=2)):
                require_finite(t, f"layer_host_s[{tp!r}] {name}")

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d.update(gemms=[list(g) for g in self.gemms], allreduce_bytes=list(self.allreduce_bytes),
                 allreduce_s=list(self.allreduce_s),
                 layer_host_s={tp: list(p) for tp, p in self.layer_host_s.items()})
        if self.schema_version == 1:
            for key in _PROFILE_V2_DEFAULTS:
                del d[key]
        else:
            before, during = self.load_before, self.load_during
            assert before is not None and during is not None  # checked: schema 2 has both
            d.update(spread=dict(self.spread), load_before=before.to_dict(),
                     load_during=during.to_dict())
        return d

    @classmethod
    def from_dict(cls, data, context: str = "profile measurements") -> "ProfileMeasurements":
        version = data.get("schema_version") if isinstance(data, dict) else None
        if type(version) is int and version == 1:
            check_keys({**_PROFILE_V2_DEFAULTS, **data}, cls, context, _OPTIONAL)
            unknown = sorted(set(data) & set(_PROFILE_V2_DEFAULTS))
            if unknown:
                raise ValueError(f"{context}: unknown key {unknown[0]!r} (schema_version 1)")
            data = {**_PROFILE_V2_DEFAULTS, **data}
        else:
            if version is not None and (type(version) is not int or version != 2):
                raise ValueError(f"{context}: schema_version must be 1 or 2, "
                                 f"got {_short(version)}")
            check_keys(data, cls, context, _OPTIONAL)
            data = {**data, **{key: MachineLoad.from_dict(data[key], f"{context} {key}")
                               for key in ("load_before", "load_during")}}
        lists = {key: tuple(_list(data[key], f"{context} {key}"))
                 for key in ("gemms", "allreduce_bytes", "allreduce_s")}
        lists["gemms"] = tuple(tuple(_list(g, f"{context} gemms[{i}]", length=4))
                               for i, g in enumerate(lists["gemms"]))
        host = data["layer_host_s"]
        if isinstance(host, dict):
            host = {tp: tuple(_list(p, f"{context} layer_host_s[{tp!r}]", length=2))
                    for tp, p in host.items()}
        return _build(cls, {"outside_tensors": {}, **data, **lists, "layer_host_s": host},
                      context)

    @classmethod
    def load(cls, path) -> "ProfileMeasurements":
        return _load(cls, path, "profile measurements")

    def save(self, path) -> None:
        _save(self.to_dict(), path)


def _check_version(data, version: int, context: str) -> None:
    """Another schema_version is named as such, before its keys are judged by this one's."""
    if isinstance(data, dict) and "schema_version" in data and (
            data["schema_version"] != version or isinstance(data["schema_version"], bool)):
        raise ValueError(f"{context}: schema_version must be {version}, "
                         f"got {_short(data['schema_version'])}")


def _build(cls, data: dict, context: str):
    """cls(**data) with the context prefixed to a field's ValueError."""
    try:
        return cls(**data)
    except ValueError as exc:
        raise ValueError(f"{context}: {exc}") from None


def _save(data: dict, path) -> None:
    with open(path, "w") as f:
        json.dump(data, f, indent=1, allow_nan=False)
        f.write("\n")
