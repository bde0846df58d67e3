"""Distributed checkpoints (torch.distributed.checkpoint) that survive crashes and re-plans.

- Names are the whole model's (`layers.<global index>...`; a tied copy is `embed.wte.weight`),
  optimizer state uses DCP's flattened form `state.<name>.<key>`, so a checkpoint written under
  one dp/tp/pp/ZeRO layout loads under any other: DCP reshards DTensors on load.
- Atomic: every rank writes into `.tmp-step_N`; after all ranks finished, rank 0 renames it to
  `step_N`. Only directories named `step_N` holding DCP's `.metadata` count as checkpoints.
- Resume is exact: the data position, learning rate and dropout seeds derive from the step."""

import os
import re
import shutil
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

from runtime.model import canonical_name

_STEP_DIR = re.compile(r"^step_(\d+)$")
_FLAT = StateDictOptions(flatten_optimizer_state_dict=True)


def latest(root) -> Path:
    """The newest complete checkpoint under `root`, or None."""
    root = Path(root)
    if not root.is_dir():
        return None
    found = [(int(m.group(1)), p) for p in root.iterdir()
             if (m := _STEP_DIR.match(p.name)) and (p / ".metadata").is_file()]
    return max(found)[1] if found else None


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
        model = {}
        for k, v in get_model_state_dict(module).items():
            model.setdefault(canonical_name(spec, k), v)
        names = {canonical_name(spec, n) for n, _ in engine.parts[i].named_parameters()}
        if zero1:
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
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        _fsync_dir(root)
    dist.barrier()
    return final


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def load(engine, path) -> int:
    """Load checkpoint `path` into the engine (any layout); returns the step to continue at."""
    path = Path(path)
    if not (path / ".metadata").is_file():
        raise ValueError(f"checkpoint {path} is incomplete or unreadable (no .metadata)")
    train = {"step": torch.tensor(0), **engine.scaler.state()}
    loaded_optim = {}
    for i, (model, optim) in enumerate(_part_states(engine)):
        state = {"model": model, "optim": optim, "train": train}
        try:
            dcp.load(state, checkpoint_id=str(path))
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
