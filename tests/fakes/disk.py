"""A cache disk that fills up: blob writes fail with ENOSPC past a capacity."""

from __future__ import annotations

import errno

import pytest


def fill_disk_after(monkeypatch: pytest.MonkeyPatch, capacity: int) -> None:
    """Writes fail with ENOSPC once `capacity` bytes (of any download) are on disk."""
    from mirror.hashing import HashingWriter

    real_write_all = HashingWriter._write_all
    used = 0

    def fill_disk(self: HashingWriter, chunk: bytes) -> None:
        nonlocal used
        if used + len(chunk) > capacity:
            raise OSError(errno.ENOSPC, "No space left on device")
        used += len(chunk)
        real_write_all(self, chunk)

    monkeypatch.setattr(HashingWriter, "_write_all", fill_disk)
