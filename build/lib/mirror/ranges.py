"""HTTP `Range` for blobs: one `bytes=` range; anything else is refused clearly."""

from __future__ import annotations

import re
from dataclasses import dataclass

from mirror.errors import RegistryError

# ASCII digits only, at most 18 of them: `\d` admits other scripts' digits, and int() of
# thousands of digits raises instead of parsing (a 500 where a 416 belongs).
_RANGE_RE = re.compile(r"bytes=([0-9]{0,18})-([0-9]{0,18})")
_LENGTH_RE = re.compile(r"[0-9]{1,18}")


def parse_length(value: str | None) -> int | None:
    """A Content-Length (or similar count) from a peer; None if absent or malformed."""
    if value is None or _LENGTH_RE.fullmatch(value.strip()) is None:
        return None
    return int(value)


@dataclass(frozen=True, slots=True)
class ByteRange:
    """Inclusive first byte, exclusive end, like a slice."""

    start: int
    end: int

    @property
    def length(self) -> int:
        return self.end - self.start

    def content_range(self, size: int) -> str:
        return f"bytes {self.start}-{self.end - 1}/{size}"


@dataclass(frozen=True, slots=True)
class RangeSpec:
    """A parsed but not yet size-checked range: `first` or a suffix length."""

    first: int | None
    last: int | None

    def resolve(self, size: int) -> ByteRange:
        if self.first is None:  # suffix range: the last N bytes
            assert self.last is not None
            if self.last == 0 or size == 0:
                raise _unsatisfiable(size)
            return ByteRange(max(0, size - self.last), size)
        if self.first >= size:
            raise _unsatisfiable(size)
        end = size if self.last is None else min(self.last + 1, size)
        return ByteRange(self.first, end)


def _unsatisfiable(size: int) -> RegistryError:
    return RegistryError(
        "RANGE_INVALID",
        "requested range not satisfiable",
        detail={"size": size},
        headers={"Content-Range": f"bytes */{size}"},
    )


def parse_range(header: str | None) -> RangeSpec | None:
    """Parse a Range header; None when absent. Multiple ranges are refused (416)."""
    if header is None:
        return None
    m = _RANGE_RE.fullmatch(header.strip().replace(" ", ""))
    if m is None or (not m[1] and not m[2]):
        raise RegistryError(
            "RANGE_INVALID",
            "only a single bytes=first-last range is supported",
            detail={"range": header[:100]},
        )
    first = int(m[1]) if m[1] else None
    last = int(m[2]) if m[2] else None
    if first is not None and last is not None and last < first:
        raise RegistryError(
            "RANGE_INVALID", "range end before start", detail={"range": header[:100]}
        )
    return RangeSpec(first, last)
