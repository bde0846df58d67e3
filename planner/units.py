"""Byte sizes of dtypes, SI helpers and the named byte multipliers the cost model uses."""

GB = 1e9  # decimal gigabyte, as in ZeRO Table 1 (Rajbhandari et al. 2020)
GIB = 2**30

DTYPE_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2, "fp8": 1}

# Mixed-precision AdamW (Rajbhandari et al. 2020, Sec. 3.1): fp32 master weights, momentum and
# variance, K = 12 bytes per parameter.  Pure fp32 training keeps the weights themselves as the
# master copy, so only momentum and variance are extra: K = 8.
ADAM_STATE_BYTES_MIXED = 12
ADAM_STATE_BYTES_FP32 = 8

# A dropout mask is stored as one byte per element (Korthikanti et al. 2022, Sec. 4.1).
DROPOUT_MASK_BYTES = 1


def dtype_bytes(precision: str) -> int:
    """Bytes per element of a training precision name."""
    if precision not in DTYPE_BYTES:
        raise ValueError(f"unknown precision {precision!r}; expected one of {sorted(DTYPE_BYTES)}")
    return DTYPE_BYTES[precision]


def fmt_bytes(n: float) -> str:
    """Human-readable binary size, e.g. '12.3 GiB'."""
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(n) >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{n:.0f} B"


def fmt_seconds(s: float) -> str:
    """Human-readable duration."""
    if s >= 1:
        return f"{s:.3f} s"
    if s >= 1e-3:
        return f"{s * 1e3:.2f} ms"
    return f"{s * 1e6:.1f} us"
