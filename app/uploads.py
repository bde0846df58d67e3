"""Uploaded files -> planner inputs.  Bounded before parsing (MAX_UPLOAD_BYTES, then
planner.limits.MAX_JSON_DEPTH levels of nesting, scanned without parsing), parsed strictly with
`json` (no pickle, no code execution; NaN, Infinity and numbers that overflow a float refused),
then validated by the planner's own from_dict loaders.  Every failure is a ValueError with a
one-line message the page shows, never another exception."""

import json
import math

from planner.hardware import HardwareProfile
from planner.limits import MAX_JSON_DEPTH
from planner.measured import Measured, json_depth
from planner.spec import ModelSpec, from_hf_config

MAX_UPLOAD_BYTES = 1_000_000  # a spec, profile or measured.json is a few kB; 1 MB is generous
MAX_NAME_CHARS = 80


def shown_name(filename: str) -> str:
    """An upload's file name as it may appear in a one-line message."""
    name = str(filename) if str(filename).isprintable() else repr(str(filename))[1:-1]
    return name if len(name) <= MAX_NAME_CHARS else name[:MAX_NAME_CHARS - 3] + "..."


def parse_json_bytes(data: bytes, what: str, limit: int = MAX_UPLOAD_BYTES):
    """Bytes of an upload -> a JSON object (dict), or ValueError naming what is wrong."""
    what = shown_name(what)
    if len(data) > limit:
        raise ValueError(f"{what}: file is {len(data):,} bytes; the limit is {limit:,}")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise ValueError(f"{what}: not UTF-8 text") from None
    depth = json_depth(text)  # before json.loads, which recurses once per level
    if depth > MAX_JSON_DEPTH:
        raise ValueError(f"{what}: JSON nested {depth:,} levels deep; the limit is "
                         f"{MAX_JSON_DEPTH}")
    try:
        obj = json.loads(text, parse_constant=_reject_constant, parse_float=_finite_float)
    except json.JSONDecodeError as exc:
        raise ValueError(f"{what}: not valid JSON ({exc.msg} at line {exc.lineno})") from None
    except (ValueError, RecursionError) as exc:  # our refusals; ints over 4300 digits
        raise ValueError(f"{what}: not valid JSON ({_first_line(exc)})") from None
    if not isinstance(obj, dict):
        raise ValueError(f"{what}: expected a JSON object, got {type(obj).__name__}")
    return obj


def _reject_constant(name: str):
    raise ValueError(f"{name} is not a valid JSON number")


def _finite_float(token: str) -> float:
    value = float(token)
    if not math.isfinite(value):
        raise ValueError(f"{token[:40]} is not a valid JSON number (out of range)")
    return value


def _first_line(exc: Exception) -> str:
    text = str(exc).strip().splitlines()
    return text[0][:200] if text else type(exc).__name__


def _strict(fn, what: str):
    """Run a from_dict-style constructor; any failure becomes a one-line ValueError."""
    what = shown_name(what)
    try:
        return fn()
    except ValueError as exc:
        raise ValueError(f"{what}: {_first_line(exc)}") from None
    except Exception as exc:  # noqa: BLE001 - an upload must never show a traceback
        raise ValueError(f"{what}: bad value ({type(exc).__name__}: {_first_line(exc)})") \
            from None


def model_from_upload(data: bytes, filename: str = "model.json") -> ModelSpec:
    """Our spec JSON, or a Hugging Face config.json (recognised by its `model_type` key)."""
    obj = parse_json_bytes(data, filename)
    name = filename.rsplit("/", 1)[-1].removesuffix(".json") or "uploaded-model"
    if "model_type" in obj:
        return _strict(lambda: from_hf_config(obj, name=name), filename)
    return _strict(lambda: ModelSpec.from_dict(obj), filename)


def profile_from_upload(data: bytes, filename: str = "profile.json") -> HardwareProfile:
    obj = parse_json_bytes(data, filename)
    return _strict(lambda: HardwareProfile.from_dict(obj), filename)


def measured_from_upload(data: bytes, filename: str = "measured.json") -> dict:
    """A runtime measured.json, validated as a planner.measured.Measured (every key, numbers
    finite and non-negative, `peak_allocated_bytes` null on CPU runs); returned as that
    Measured's to_dict, which app/backend.py reads back into a Measured."""
    obj = parse_json_bytes(data, filename)
    return _strict(lambda: Measured.from_dict(obj).to_dict(), filename)
