"""Sizes and durations as people write them in settings: `50GiB`, `500MB`, `5m`, `7d`."""

from __future__ import annotations

import re
from typing import Any

_DURATION_RE = re.compile(r"(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)?")
_UNITS = {"ms": 0.001, "s": 1, None: 1, "m": 60, "h": 3600, "d": 86400}

_SIZE_RE = re.compile(r"(\d+(?:\.\d+)?)\s*([KMGT]i?B|B)?", re.IGNORECASE)
_SIZE_UNITS = {
    "b": 1,
    "kb": 10**3,
    "mb": 10**6,
    "gb": 10**9,
    "tb": 10**12,
    "kib": 2**10,
    "mib": 2**20,
    "gib": 2**30,
    "tib": 2**40,
}


def parse_size(value: Any) -> int | None:
    """Bytes from a number or `50GiB`, `500MB`, `1.5TiB`; none/unlimited/0 -> no cap."""
    if value is None or value == 0:
        return None
    if isinstance(value, int):
        return value
    text = str(value).strip()
    if text.lower() in ("", "none", "unlimited", "0"):
        return None
    m = _SIZE_RE.fullmatch(text)
    if m is None:
        raise ValueError(f"invalid size {value!r}: use bytes or e.g. 50GiB, 500MB")
    return int(float(m[1]) * _SIZE_UNITS[(m[2] or "b").lower()])


def parse_duration(value: Any) -> float:
    """Seconds from a number or a string like `300`, `5m`, `7d`, `1.5h`."""
    if isinstance(value, int | float):
        return float(value)
    m = _DURATION_RE.fullmatch(str(value).strip())
    if m is None:
        raise ValueError(f"invalid duration {value!r}: use a number of seconds or e.g. 5m, 7d")
    return float(m[1]) * _UNITS[m[2]]


def human_bytes(n: int | float) -> str:
    """1536 -> "1.5 KiB": sizes for people (tables, the status page's twin)."""
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(value) < 1024 or unit == "TiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")
