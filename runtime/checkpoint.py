"""Distributed checkpoints (torch.distributed.checkpoint) that survive crashes and re-plans.

- Names are the whole model's (`layers.<global index>...`; a tied copy is `embed.wte.weight`),
  optimizer state uses DCP's flattened form `state.<name>.<key>`, so a checkpoint written under
  one dp/tp/pp/ZeRO layout loads under any other: DCP reshards DTensors on load.
- Atomic: every rank writes into `.tmp-step_N`; rank 0 adds the plan and, last, `manifest.json`
  (sha256 and size of every file), then renames the directory to `step_N`. Only `step_N`
  directories holding a manifest count as checkpoints.
- Safe to load: every file must match the manifest, `.metadata` is unpickled with only DCP's own
  metadata types allowed, and entries stored as pickled bytes are refused.
- One run per directory: rank 0 holds an flock on `<dir>/.lock` for the whole run.
- Resume is exact: the data position, learning rate and dropout seeds derive from the step."""

import contextlib
import errno
import fcntl
import hashlib
import json
import logging
import os
import pickle
import re
import shutil
import socket
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.filesystem import _StorageInfo
from torch.distributed.checkpoint.metadata import Metadata, StorageMeta, TensorStorageMetadata
from torch.distributed.checkpoint.planner import LoadItemType
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

from runtime.model import canonical_name

log = logging.getLogger("runtime")
MANIFEST, METADATA, LOCK = "manifest.json", ".metadata", ".lock"
_STEP_DIR = re.compile(r"^step_(\d+)$")
_FILE_NAME = re.compile(r"^[\w.-]+$")   # a plain name directly inside the step directory
_FLAT = StateDictOptions(flatten_optimizer_state_dict=True)
_NO_MANIFEST = f"no {MANIFEST} (an incomplete save, or saved without checksums)"
# Everything DCP 2.13's FileSystemWriter pickles into `.metadata` (recorded with a find_class
# hook while loading real checkpoints of DDP, ZeRO-1 and TP x FSDP2 runs): its metadata
# dataclasses, torch.Size, torch dtypes, layouts (rebuilt by torch.serialization._get_layout from
# their name) and the save's pathlib path. BytesStorageMetadata is left out on purpose: the
# runtime saves tensors only, and DCP would torch.load(weights_only=False) a bytes entry
# (DefaultLoadPlanner.load_bytes).
_METADATA_GLOBALS = {
    "torch.distributed.checkpoint.metadata": {
        "Metadata", "TensorStorageMetadata", "TensorProperties", "ChunkStorageMetadata",
        "MetadataIndex", "StorageMeta", "_MEM_FORMAT_ENCODING"},
    "torch.distributed.checkpoint.filesystem": {"_StorageInfo"},
    "torch.serialization": {"_get_layout"},
    "torch": {"Size"},
    "pathlib": {"PosixPath"},
}


# --- finding checkpoints --------------------------------------------------------------------

def latest(root) -> Path | None:
    """The newest complete checkpoint under `root` (a `step_N` with a manifest), or None."""
    root = Path(root)
    complete = [p for p in _step_dirs(root) if (p / MANIFEST).is_file()] if root.is_dir() else []
    return complete[-1] if complete else None


def resume_path(root) -> Path:
    """The checkpoint `--resume` continues from; a ValueError when there is nothing to resume."""
    root = Path(root)
    if not root.is_dir():
        what = "is not a directory" if root.exists() else "does not exist"
        raise ValueError(f"--resume: checkpoint directory {root} {what}")
    steps, path = _step_dirs(root), latest(root)
    if not steps:
        raise ValueError(f"--resume: nothing to resume in {root} (no step_N directory)")
    if path is None:
        raise ValueError(f"--resume: checkpoint {steps[-1]} is unreadable: {_NO_MANIFEST}")
    if steps[-1] != path:
        log.info(f"skipping {steps[-1]}: {_NO_MANIFEST}; resuming from {path}")
    return path


def _step_dirs(root: Path) -> list:
    """The `step_N` directories in `root`, oldest first."""
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := _STEP_DIR.match(p.name))]
    return [p for _, p in sorted(found)]


# --- one run per directory ------------------------------------------------------------------

@contextlib.contextmanager
def exclusive(root):
    """Rank 0 holds an flock on `<root>/.lock` while the block runs; a second run on the same
    directory gets a ValueError on every rank. The kernel drops an flock when its process dies
    (flock(2)), so a crashed run never leaves a lock behind. `root` None: no lock."""
    fd, error = None, None
    if root is not None and _rank_world()[0] == 0:
        try:
            fd = _lock(Path(root))
        except (ValueError, OSError) as exc:
            error = str(exc)
    if root is not None:
        error = _from_rank0(error)
    if error:
        raise ValueError(error)
    try:
        yield
    finally:
        if fd is not None:
            os.close(fd)  # releases the flock


def _lock(root: Path):
    """Take `<root>/.lock` (creating `root`); the open descriptor, or None where the filesystem
    has no flock."""
    if root.exists() and not root.is_dir():
        raise ValueError(f"--checkpoint-dir {root} is not a directory")
    root.mkdir(parents=True, exist_ok=True)
    fd = os.open(root / LOCK, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = " ".join(os.pread(fd, 200, 0).decode(errors="replace").split()) or "pid unknown"
        os.close(fd)
        raise ValueError(f"checkpoint directory {root} is in use by another run ({holder} "
                         f"holds {root / LOCK}); wait for it or use another --checkpoint-dir") \
            from None
    except OSError as exc:  # e.g. Lustre mounted without -o flock
        os.close(fd)
        if exc.errno not in (errno.ENOLCK, errno.ENOSYS, errno.EOPNOTSUPP, errno.EINVAL):
            raise ValueError(f"cannot lock {root / LOCK}: {exc.strerror}") from None
        log.warning(f"cannot lock {root / LOCK} ({exc.strerror}); not guarding {root}")
        return None
    os.ftruncate(fd, 0)
    os.write(fd, f"pid {os.getpid()} on {socket.gethostname()}\n".encode())
    return fd


# --- saving ---------------------------------------------------------------------------------

def _rename_optim_key(spec, key: str) -> str:
    kind, rest = key.split(".", 1)
    for fqn in ("head.output.weight",):
        if rest.startswith(fqn + "."):
            return f"{kind}.{canonical_name(spec, fqn)}{rest[len(fqn):]}"
    return key


def _part_states(engine) -> list:
    """(model, optimizer-state) dicts of each of this rank's chunks, under canonical names."""
    spec, states = engine.plan.model, []
    zero1 = engine.optimizers[0] if len(engine.optimizers) == 1 and hasattr(
        engine.optimizers[0], "flat_state_dict") else None
    flat1 = zero1.flat_state_dict() if zero1 else None
    for i, module in enumerate(engine.modules):
        model: dict = {}
        for k, v in get_model_state_dict(module).items():
            model.setdefault(canonical_name(spec, k), v)
        names = {canonical_name(spec, n) for n, _ in engine.parts[i].named_parameters()}
        if flat1 is not None:
            optim = {k: v for k, v in flat1.items()
                     if k.startswith("state.") and k[6:].rsplit(".", 1)[0] in names}
        else:
            osd = get_optimizer_state_dict(module, engine.optimizers[i], options=_FLAT)
            optim = {_rename_optim_key(spec, k): v for k, v in osd.items()
                     if k.startswith("state.")}
        states.append((model, optim))
    return states


def save(engine, root, step: int) -> Path:
    """Write checkpoint `root/step_<step>` from every rank; returns its path."""
    root = Path(root)
    tmp, final = root / f".tmp-step_{step:08d}", root / f"step_{step:08d}"
    if dist.get_rank() == 0:
        root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
    dist.barrier()
    model, optim = {}, {}
    for m, o in _part_states(engine):
        model.update(m)
        optim.update(o)
    train = {"step": torch.tensor(step), **engine.scaler.state()}
    dcp.save({"model": model, "optim": optim, "train": train}, checkpoint_id=str(tmp))
    dist.barrier()
    if dist.get_rank() == 0:
        engine.plan.save(tmp / "plan.json")
    files = _hash_shares(tmp)
    if dist.get_rank() == 0:
        _write_manifest(tmp, step, files)
        _swap_in(tmp, final)
    dist.barrier()
    return final


def _hash_shares(tmp: Path) -> dict:
    """{name: {sha256, bytes}} of every file in `tmp`, each rank hashing (and fsyncing) a share."""
    names = _from_rank0(sorted(p.name for p in tmp.iterdir()) if _rank_world()[0] == 0 else None)
    rank, world = _rank_world()
    mine = {n: _digest(tmp / n, sync=True) for n in names[rank::world]}
    return {n: d for part in _gather(mine) for n, d in part.items()}


def _digest(path: Path, sync: bool = False) -> dict:
    h, size = hashlib.sha256(), 0
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            h.update(block)
            size += len(block)
        if sync:
            os.fsync(f.fileno())  # durable before the manifest that vouches for it
    return {"sha256": h.hexdigest(), "bytes": size}


def _write_manifest(tmp: Path, step: int, files: dict) -> None:
    part = tmp / f"{MANIFEST}.part"
    with open(part, "w") as f:
        json.dump({"format": 1, "step": step, "files": files}, f, indent=1, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())
    os.replace(part, tmp / MANIFEST)


def _swap_in(tmp: Path, final: Path) -> None:
    """Rename `tmp` to `final`; an older `final` (a re-run step) is moved aside first, so a
    `step_N` directory is always complete."""
    old = final.with_name(f".old-{final.name}")
    shutil.rmtree(old, ignore_errors=True)
    if final.exists():
        os.replace(final, old)
    os.replace(tmp, final)
    _fsync_dir(final.parent)
    shutil.rmtree(old, ignore_errors=True)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# --- verifying ------------------------------------------------------------------------------

def verify(path) -> dict:
    """Check checkpoint `path` before anything of it is loaded: its manifest, every file's size
    and sha256 (each rank checks a share), and its DCP metadata (restricted unpickling).
    Returns the manifest's files; a one-line ValueError names the first bad file."""
    path = Path(path)
    files = _read_manifest(path)
    rank, world = _rank_world()
    names = sorted(files)[rank::world]
    mine = [e for n in names if (e := _file_error(path / n, files[n]))]
    errors = sorted(e for part in _gather(mine) for e in part)
    if errors:
        more = f" (and {len(errors) - 1} more bad files)" if len(errors) > 1 else ""
        raise ValueError(f"checkpoint {path} is corrupt: {errors[0]}{more}")
    read_metadata(path, files)
    return files


def _read_manifest(path: Path) -> dict:
    try:
        files = json.loads((path / MANIFEST).read_text())["files"]
        ok = isinstance(files, dict) and METADATA in files and all(
            _FILE_NAME.match(n) and n not in (".", "..", MANIFEST) and
            isinstance(d["sha256"], str) and isinstance(d["bytes"], int)
            for n, d in files.items())
    except FileNotFoundError:
        raise ValueError(f"checkpoint {path} is unreadable: {_NO_MANIFEST}") from None
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ValueError(f"checkpoint {path} is unreadable: bad {MANIFEST} ({exc})") from None
    if not ok:
        raise ValueError(f"checkpoint {path} is unreadable: {MANIFEST} is not a list of plain "
                         f"file names with sha256 and size, including {METADATA}")
    return files


def _file_error(file: Path, want: dict):
    if not file.is_file():
        return f"{file} is missing"
    if file.stat().st_size != want["bytes"] or _digest(file)["sha256"] != want["sha256"]:
        return f"{file} does not match its sha256 in {MANIFEST} (damaged or modified)"
    return None


class _Forbidden(pickle.UnpicklingError):
    pass


class _MetadataUnpickler(pickle.Unpickler):
    """Resolves only the globals in _METADATA_GLOBALS and torch dtypes (pickle's documented way
    to restrict globals: override find_class). Nothing else can be called while unpickling."""

    def find_class(self, module, name):
        dtype = module == "torch" and isinstance(torch.__dict__.get(name), torch.dtype)
        if dtype or name in _METADATA_GLOBALS.get(module, ()):
            return super().find_class(module, name)
        raise _Forbidden(" ".join(f"{module}.{name}".split())[:120])  # kept on one line


def read_metadata(path, files: dict) -> Metadata:
    """`path/.metadata` unpickled with _MetadataUnpickler, checked to describe only tensors stored
    in files of the manifest `files` (no transforms); a one-line ValueError otherwise."""
    file = Path(path) / METADATA
    try:
        with open(file, "rb") as f:
            meta = _MetadataUnpickler(f).load()
    except _Forbidden as exc:
        raise ValueError(f"checkpoint file {file} is refused: it names the global {exc}, which "
                         f"is not one of DCP's metadata types (unpickling it could run code)") \
            from None
    except (OSError, pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError,
            LookupError, RecursionError, OverflowError) as exc:  # malformed pickle data
        raise ValueError(f"checkpoint file {file} is unreadable: {type(exc).__name__}: "
                         f"{str(exc)[:120]}") from None
    bad = _metadata_problem(meta, files)
    if bad:
        raise ValueError(f"checkpoint file {file} is refused: {bad}")
    return meta


def _metadata_problem(meta, files: dict):
    if not isinstance(meta, Metadata) or not isinstance(meta.state_dict_metadata, dict) \
            or not isinstance(meta.storage_data, dict):
        return "not DCP metadata"
    for key, entry in meta.state_dict_metadata.items():
        if not isinstance(entry, TensorStorageMetadata):
            return f"entry {key!r} is not a tensor"
    for index, info in meta.storage_data.items():
        if not (isinstance(info, _StorageInfo) and isinstance(info.relative_path, str)
                and info.relative_path in files and info.relative_path != METADATA):
            where = getattr(info, "relative_path", None)
            return f"entry {getattr(index, 'fqn', index)!r} points to {where!r}, not a data " \
                   f"file listed in {MANIFEST}"
        if info.transform_descriptors:
            return f"entry {index.fqn!r} needs stream transforms {info.transform_descriptors}"
    return None


class _SafeReader(FileSystemReader):
    """DCP's FileSystemReader, with `.metadata` read by read_metadata above instead of
    pickle.load, and bytes entries refused (tensors are read with torch.load(weights_only=True)
    in FileSystemReader.read_data). read_metadata takes no **kwargs, so DCP's loader does not
    fall back to per-rank `__<rank>.metadata` files (state_dict_loader._load_state_dict)."""

    def __init__(self, path, files: dict):
        super().__init__(path)
        self._files = files

    def read_metadata(self) -> Metadata:
        meta = read_metadata(self.path, self._files)
        meta.storage_meta = meta.storage_meta or StorageMeta()
        meta.storage_meta.load_id = self.load_id  # as FileSystemReader.read_metadata does
        return meta

    def read_data(self, plan, planner):
        if any(item.type == LoadItemType.BYTE_IO for item in plan.items):
            raise ValueError(f"checkpoint {self.path} holds pickled bytes entries; refused")
        return super().read_data(plan, planner)


# --- loading --------------------------------------------------------------------------------

def load(engine, path) -> int:
    """Load checkpoint `path` into the engine (any layout); returns the step to continue at."""
    path = Path(path)
    files = verify(path)
    train = {"step": torch.tensor(0), **engine.scaler.state()}
    loaded_optim = {}
    for i, (model, optim) in enumerate(_part_states(engine)):
        state = {"model": model, "optim": optim, "train": train}
        try:
            dcp.load(state, storage_reader=_SafeReader(path, files))
        except (Exception, CheckpointException) as exc:  # the latter is a BaseException
            raise ValueError(f"checkpoint {path} is unreadable: {_reason(exc)}") from None
        set_model_state_dict(engine.modules[i], _local_names(engine.parts[i], state["model"]))
        loaded_optim[i] = state["optim"]
    _set_optimizers(engine, loaded_optim)
    engine.scaler.load(train)
    return int(train["step"])


def _reason(exc) -> str:
    """The last line of DCP's per-rank traceback text: the actual error, shortened."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    return (lines[-1] if lines else type(exc).__name__)[:160]


def _local_names(part, canonical: dict) -> dict:
    """Canonical-name state dict -> this chunk's own parameter names."""
    spec = part.spec
    return {n: canonical[canonical_name(spec, n)] for n in part.state_dict()
            if canonical_name(spec, n) in canonical}


def _set_optimizers(engine, loaded: dict) -> None:
    opts = engine.optimizers
    if len(opts) == 1 and hasattr(opts[0], "load_flat_state_dict"):
        merged = {}
        for optim in loaded.values():
            merged.update(optim)
        opts[0].load_flat_state_dict(merged)
        return
    spec = engine.plan.model
    for i, module in enumerate(engine.modules):
        current = get_optimizer_state_dict(module, opts[i], options=_FLAT)
        flat = {k: (loaded[i][_rename_optim_key(spec, k)] if k.startswith("state.") else v)
                for k, v in current.items()}
        set_optimizer_state_dict(module, opts[i], flat, options=_FLAT)


# --- collectives (a single process without a process group counts as world 1) ----------------

def _rank_world() -> tuple:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _gather(obj) -> list:
    world = _rank_world()[1]
    if world == 1:
        return [obj]
    out = [None] * world
    dist.all_gather_object(out, obj)
    return out


def _from_rank0(obj):
    if _rank_world()[1] == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]
