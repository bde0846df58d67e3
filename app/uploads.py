"""Uploaded files -> planner inputs.  Size-capped and parsed strictly with `json` (no pickle, no
code execution); every failure is a ValueError with a one-line message the page shows."""

import json

from planner.hardware import HardwareProfile
from planner.spec import ModelSpec, from_hf_config

MAX_UPLOAD_BYTES = 1_000_000  # a spec, profile or measured.json is a few kB; 1 MB is generous


def parse_json_bytes(data: bytes, what: str, limit: int = MAX_UPLOAD_BYTES):
    """Bytes of an upload -> a JSON object (dict), or ValueError naming what is wrong."""
    if len(data) > limit:
        raise ValueError(f"{what}: file is {len(data):,} bytes; the limit is {limit:,}")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise ValueError(f"{what}: not UTF-8 text") from None
    try:
        obj = json.loads(text, parse_constant=_reject_constant)
    except json.JSONDecodeError as exc:
        raise ValueError(f"{what}: not valid JSON ({exc.msg} at line {exc.lineno})") from None
    if not isinstance(obj, dict):
        raise ValueError(f"{what}: expected a JSON object, got {type(obj).__name__}")
    return obj


def _reject_constant(name: str):
    raise ValueError(f"{name} is not a valid JSON number")


def _strict(fn, what: str):
    """Run a from_dict-style constructor; TypeError/KeyError become one-line ValueErrors."""
    try:
        return fn()
    except ValueError as exc:
        raise ValueError(f"{what}: {exc}") from None
    except (TypeError, KeyError, AttributeError) as exc:
        raise ValueError(f"{what}: bad value ({exc})") from None


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


MEASURED_RANK_KEYS = ("weights_bytes", "gradients_bytes", "optimizer_bytes",
                      "activation_bytes_per_microbatch", "peak_allocated_bytes")


def measured_from_upload(data: bytes, filename: str = "measured.json") -> dict:
    """A runtime measured.json (schema_version 1), checked for the fields the page reads."""
    obj = parse_json_bytes(data, filename)
    if obj.get("schema_version") != 1:
        raise ValueError(f"{filename}: schema_version must be 1, got "
                         f"{obj.get('schema_version')!r}")
    for key in ("step_time_s", "tokens_per_s"):
        if not _is_number(obj.get(key)):
            raise ValueError(f"{filename}: {key} must be a number, got {obj.get(key)!r}")
    ranks = obj.get("ranks", [])
    if not isinstance(ranks, list) or not all(isinstance(r, dict) for r in ranks):
        raise ValueError(f"{filename}: ranks must be a list of objects")
    for r in ranks:
        for key in MEASURED_RANK_KEYS:
            if key in r and not _is_number(r[key]):
                raise ValueError(f"{filename}: rank {r.get('rank')!r} {key} must be a number")
    if obj.get("plan") is not None and not isinstance(obj["plan"], dict):
        raise ValueError(f"{filename}: plan must be an object")
    return obj


def _is_number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and x == x
