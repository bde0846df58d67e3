"""Strict dict <-> dataclass helpers shared by every input type (house rule: unknown or missing
keys are a ValueError naming the key)."""

import dataclasses
import json
from pathlib import Path


def check_keys(data, cls, context: str) -> None:
    """Reject non-dicts, unknown keys and missing required keys of dataclass `cls`."""
    if not isinstance(data, dict):
        raise ValueError(f"{context}: expected a JSON object, got {type(data).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ValueError(f"{context}: unknown key {unknown[0]!r}")
    for name, field in fields.items():
        has_default = (field.default is not dataclasses.MISSING
                       or field.default_factory is not dataclasses.MISSING)
        if name not in data and not has_default:
            raise ValueError(f"{context}: missing key {name!r}")


def require_int(value, name: str, minimum: int = 1) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{name} must be an integer, got {value!r}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")


def require_number(value, name: str, minimum: float = 0.0, strict: bool = False) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value != value:
        raise ValueError(f"{name} must be a number, got {value!r}")
    if value < minimum or (strict and value == minimum):
        op = ">" if strict else ">="
        raise ValueError(f"{name} must be {op} {minimum}, got {value}")


def require_choice(value, name: str, choices) -> None:
    if isinstance(value, (list, dict)) or value not in choices:
        raise ValueError(f"{name} must be one of {list(choices)}, got {value!r}")


def require_bool(value, name: str) -> None:
    if not isinstance(value, bool):
        raise ValueError(f"{name} must be true or false, got {value!r}")


def require_str(value, name: str) -> None:
    if not isinstance(value, str) or not value:
        raise ValueError(f"{name} must be a non-empty string, got {value!r}")


def load_json_file(path, what: str):
    """Read a JSON file with one-line errors for missing files and bad JSON."""
    p = Path(path)
    if not p.is_file():
        raise ValueError(f"{what} file not found: {path}")
    try:
        return json.loads(p.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"{what} file {path} is not valid JSON: {exc}") from None
