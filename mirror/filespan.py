"""Bytes of an open file, handed to the response instead of being read into memory.

A blob body yields `FileSpan`s for what is on disk (a cached blob, the part of a
download already written) and `bytes` for what is only in memory (a relay). The
response sends a span with sendfile(2) where the server offers it (`mirror.zerocopy`),
so hits and download followers cost no copy through Python; elsewhere (TLS, an ASGI
test client) it is read in `READ_CHUNK` pieces.

Either way the event loop never waits for the disk: before a window of a span is
sent, two non-blocking probes (`preadv2(RWF_NOWAIT)` of its first and last byte) ask
whether it is in the page cache. A window that is not is read into the page cache by a
worker thread first (all of it asked for at once, `POSIX_FADV_WILLNEED`); a warm window
costs the two probes and nothing else. A cached blob's descriptor has readahead off
(`POSIX_FADV_RANDOM`), so the loop's own reads never start disk I/O either. The name is
opened by a worker thread too (`open_read`): its directory and inode may be on disk.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import threading
from collections.abc import AsyncIterable, AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from mirror.errors import AbortResponse

log = logging.getLogger(__name__)

# Bytes per read where there is no zero-copy (TLS): each stream holds about two chunks
# in memory (ours, plus the transport's copy of what the socket did not take yet), so
# 64 streams of 1 GiB peaked at ~111 MiB RSS with 256 KiB vs ~265 MiB with 1 MiB, at
# the same throughput (docs/benchmarks.md).
READ_CHUNK = 256 << 10
# Bytes per sendfile message: the residency probes and the byte counters run once
# per window. Larger windows cost nothing in memory (the kernel moves the bytes).
SEND_WINDOW = 8 << 20
# Cold windows are faulted in by these threads, so a slow disk holds threads, never
# the loop. Reads of one cold window each: enough for 16 cold streams at once.
DISK_THREADS = 16
FAULT_CHUNK = 1 << 20


@dataclass(frozen=True, slots=True)
class FileSpan:
    """`count` bytes of the open file `fd` from `offset`. The descriptor stays open
    for as long as the body that yielded the span (its owner closes it)."""

    fd: int
    offset: int
    count: int

    def fileno(self) -> int:
        return self.fd  # the ASGI zerocopysend message's "file" needs a fileno()

    async def windows(self) -> AsyncIterator[FileSpan]:
        """The span in windows of at most SEND_WINDOW bytes, each resident when given."""
        pos, end = self.offset, self.offset + self.count
        while pos < end:
            window = FileSpan(self.fd, pos, min(SEND_WINDOW, end - pos))
            await window.resident()
            yield window
            pos += window.count

    async def pieces(self) -> AsyncIterator[bytes]:
        """The span's bytes, read in READ_CHUNK pieces (no zero-copy available)."""
        async for window in self.windows():
            pos, end = window.offset, window.offset + window.count
            while pos < end:
                chunk = os.pread(self.fd, min(READ_CHUNK, end - pos), pos)
                if not chunk:
                    raise AbortResponse(f"file shorter than expected ({pos} < {end})")
                pos += len(chunk)
                yield chunk

    async def resident(self) -> None:
        """Return once the span's bytes are (very likely) in the page cache."""
        if _cached(self.fd, self.offset) and _cached(self.fd, self.offset + self.count - 1):
            return
        await asyncio.get_running_loop().run_in_executor(
            disk_threads(), _fault_in, self.fd, self.offset, self.count
        )


_probe = bytearray(1)  # the loop's thread only
_probing = True  # False once the kernel or filesystem refused RWF_NOWAIT


def _cached(fd: int, pos: int) -> bool:
    """Whether the page holding byte `pos` is in the page cache, without blocking."""
    global _probing
    if not _probing:
        return True
    try:
        os.preadv(fd, [_probe], pos, os.RWF_NOWAIT)
    except BlockingIOError:
        return False
    except OSError as exc:
        # EOPNOTSUPP/EINVAL (a filesystem without it, an old kernel): read in the loop
        # as before; a bad descriptor shows up in the read itself.
        _probing = False
        log.info("page cache probes unavailable (%s): cold reads run in the event loop", exc)
    return True


_local = threading.local()


def _fault_in(fd: int, offset: int, count: int) -> None:
    """Read [offset, offset+count) once, so the loop's sendfile (or pread) finds it
    in the page cache. The copy into a scratch buffer is the price of a cold page."""
    with contextlib.suppress(OSError):
        os.posix_fadvise(fd, offset, count, os.POSIX_FADV_WILLNEED)  # all of it at once
    buf: bytearray | None = getattr(_local, "buf", None)
    if buf is None:
        buf = _local.buf = bytearray(FAULT_CHUNK)
    view = memoryview(buf)
    pos, end = offset, offset + count
    while pos < end:
        n = os.preadv(fd, [view[: min(FAULT_CHUNK, end - pos)]], pos)
        if n <= 0:
            return  # shorter than expected: the send itself reports it
        pos += n


_executor: ThreadPoolExecutor | None = None


async def open_read(path: Path) -> int:
    """A descriptor for reading `path`, opened by a disk thread: a name whose directory
    and inode are not in memory (after a restart, or under memory pressure) is looked
    up on the disk, which must not hold the loop."""
    opening = asyncio.get_running_loop().run_in_executor(disk_threads(), os.open, path, os.O_RDONLY)
    try:
        fd = await asyncio.shield(opening)
    except asyncio.CancelledError:
        # The open goes on in its thread: the descriptor it returns is nobody's.
        opening.add_done_callback(_close_opened)
        raise
    # No readahead from this descriptor's own reads: the loop's sendfile would start it
    # when it reaches a readahead mark, and submitting that I/O waits for room in the
    # disk's queue (76 ms stalls of the loop with 8 cold streams). Cold windows are
    # asked for whole by the disk threads instead (`_fault_in`).
    with contextlib.suppress(OSError):
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_RANDOM)
    return fd


def _close_opened(opening: asyncio.Future[int]) -> None:
    if not opening.cancelled() and opening.exception() is None:
        os.close(opening.result())


def disk_threads() -> ThreadPoolExecutor:
    global _executor
    if _executor is None:
        _executor = ThreadPoolExecutor(DISK_THREADS, thread_name_prefix="disk-read")
    return _executor


async def as_bytes(chunks: AsyncIterable[bytes | FileSpan]) -> AsyncIterator[bytes]:
    """A body's chunks as bytes: spans read in READ_CHUNK pieces."""
    async for chunk in chunks:
        if isinstance(chunk, FileSpan):
            async for piece in chunk.pieces():
                yield piece
        else:
            yield chunk
