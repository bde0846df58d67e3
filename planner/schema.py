"""Strict dict <-> dataclass helpers shared by every input type (house rule: unknown or missing
keys are a ValueError naming the key), and the one reader of JSON input files."""

import dataclasses
import json
import math
import os
import stat

from planner.limits import MAX_JSON_BYTES, MAX_JSON_DEPTH


def check_keys(data, cls, context: str, optional=()):
    """Reject non-dicts, unknown keys and missing keys of dataclass `cls`; return `data`.

    Every field is required, defaults or not: a dropped key must not silently become its
    default.  `optional` names the keys a caller documents as optional (e.g. keys an older
    schema_version lacks); only those may be absent."""
    if not isinstance(data, dict):
        raise ValueError(f"{context}: expected a JSON object, got {type(data).__name__}")
    fields = [f.name for f in dataclasses.fields(cls)]
    assert set(optional) <= set(fields), f"{cls.__name__}: optional keys {optional} not fields"
    unknown = sorted(set(data) - set(fields), key=str)
    if unknown:
        raise ValueError(f"{context}: unknown key {unknown[0]!r}")
    for name in fields:
        if name not in data and name not in optional:
            raise ValueError(f"{context}: missing key {name!r}")
    return data


def require_int(value, name: str, minimum: int = 1) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{name} must be an integer, got {short_repr(value)}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {short_repr(value)}")


def require_number(value, name: str, minimum: float = 0.0, strict: bool = False) -> None:
    if (isinstance(value, bool) or not isinstance(value, (int, float))
            or (isinstance(value, float) and not math.isfinite(value))):
        raise ValueError(f"{name} must be a finite number, got {short_repr(value)}")
    if value < minimum or (strict and value == minimum):
        op = ">" if strict else ">="
        raise ValueError(f"{name} must be {op} {minimum}, got {short_repr(value)}")


def require_choice(value, name: str, choices) -> None:
    if isinstance(value, (list, dict)) or value not in choices:
        raise ValueError(f"{name} must be one of {list(choices)}, got {short_repr(value)}")


def require_bool(value, name: str) -> None:
    if not isinstance(value, bool):
        raise ValueError(f"{name} must be true or false, got {short_repr(value)}")


def require_str(value, name: str, max_len: int = 0) -> None:
    """A non-empty string; with max_len, also at most that long and free of control characters
    (names end up in one-line messages, tables and launcher scripts)."""
    if not isinstance(value, str) or not value:
        raise ValueError(f"{name} must be a non-empty string, got {short_repr(value)}")
    if max_len and (len(value) > max_len or not value.isprintable()):
        raise ValueError(f"{name} must be at most {max_len} printable characters, "
                         f"got {short_repr(value)}")


def short_repr(value, limit: int = 60) -> str:
    """repr of a user's value, cut to one short line (huge integers by their size)."""
    if isinstance(value, int) and not isinstance(value, bool) and value.bit_length() > 64:
        return f"an integer of {value.bit_length()} bits"
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "..."


def show_path(path, limit: int = 120) -> str:
    """A user's path for a one-line message: control characters escaped, long paths cut."""
    text = str(path)
    if not text.isprintable():
        text = repr(text)[1:-1]
    return text if len(text) <= limit else text[:limit // 2] + "..." + text[-limit // 2:]


def _refuse_constant(token: str):
    raise ValueError(f"{token} is not a JSON number (only finite numbers are accepted)")


def _finite_float(token: str) -> float:
    value = float(token)
    if not math.isfinite(value):
        raise ValueError(f"number {token[:40]} is out of range")
    return value


def parse_json(text: str):
    """json.loads that refuses NaN/Infinity tokens, numbers that overflow a float, and nesting
    deeper than MAX_JSON_DEPTH (ValueError; never RecursionError)."""
    try:
        data = json.loads(text, parse_constant=_refuse_constant, parse_float=_finite_float)
    except RecursionError:
        raise ValueError(f"nested deeper than {MAX_JSON_DEPTH} levels") from None
    if _depth(data) > MAX_JSON_DEPTH:
        raise ValueError(f"nested deeper than {MAX_JSON_DEPTH} levels")
    return data


def _depth(data) -> int:
    """Nesting depth of parsed JSON, without recursion."""
    deepest, stack = 0, [(data, 1)]
    while stack:
        node, level = stack.pop()
        if isinstance(node, (dict, list)):
            deepest = max(deepest, level)
            if level > MAX_JSON_DEPTH:
                break
            items = node.values() if isinstance(node, dict) else node
            stack.extend((child, level + 1) for child in items)
    return deepest


def read_input_file(path, what: str, limit: int = MAX_JSON_BYTES) -> bytes:
    """Bytes of a regular file of at most `limit` bytes; ValueError otherwise.  Opened
    non-blocking and checked with fstat before reading, so a FIFO, a terminal or a device
    (/dev/zero) is refused instead of blocking or filling memory."""
    shown = show_path(path)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    except FileNotFoundError:
        raise ValueError(f"{what} file not found: {shown}") from None
    except (OSError, ValueError, TypeError) as exc:  # ValueError: NUL byte in the path
        raise ValueError(f"cannot open {what} file {shown}: {_reason(exc)}") from None
    try:
        info = os.fstat(fd)
        if stat.S_ISDIR(info.st_mode):
            raise ValueError(f"{what} file {shown} is a directory")
        if not stat.S_ISREG(info.st_mode):
            raise ValueError(f"{what} file {shown} is not a regular file")
        if info.st_size > limit:
            raise ValueError(f"{what} file {shown} is {info.st_size:,} bytes; at most "
                             f"{limit:,} are read")
        os.set_blocking(fd, True)
        chunks, size = [], 0
        while size <= limit:  # /proc files report size 0: read up to the limit, no further
            chunk = os.read(fd, min(1 << 20, limit + 1 - size))
            if not chunk:
                break
            chunks.append(chunk)
            size += len(chunk)
        if size > limit:
            raise ValueError(f"{what} file {shown} is over {limit:,} bytes")
        return b"".join(chunks)
    except OSError as exc:
        raise ValueError(f"cannot read {what} file {shown}: {_reason(exc)}") from None
    finally:
        os.close(fd)


def _reason(exc) -> str:
    return exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)


def load_json_file(path, what: str):
    """Read a JSON input file: a regular file of bounded size, strict UTF-8 JSON (no NaN or
    Infinity, no overflowing numbers, bounded nesting), with one-line errors."""
    raw = read_input_file(path, what)
    try:
        return parse_json(raw.decode("utf-8"))
    except (ValueError, UnicodeDecodeError) as exc:  # JSONDecodeError is a ValueError
        raise ValueError(f"{what} file {show_path(path)} is not valid JSON: "
                         f"{show_path(exc, 200)}") from None
