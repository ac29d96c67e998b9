"""One blob download and its readers.

A `BlobDownload` is one upstream fetch of one digest into a temp file, observed by
any number of readers at their own pace. Its state changes only through its methods,
called by the download table (`mirror.downloads`) that drives it::

    starting -> streaming -> verified -> committed
        \\            \\
         `-----------`---> failed          (only before `verified`)

`verified`: every byte is written and the digest matched, so readers may send the
last byte; the fsync and the rename into the cache follow. A reader is a
`DownloadReader` (it holds a descriptor on the file and a cursor in the download)
and, once a byte range is chosen, a `DownloadBody` that owns both and releases them
in `aclose()`.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Literal

from mirror.errors import AbortResponse, RegistryError, UpstreamError
from mirror.filespan import FileSpan
from mirror.reference import Digest
from mirror.relay import Cursor, Relay
from mirror.store import READ_CHUNK, BlobSource, Chunk

State = Literal["starting", "streaming", "verified", "committed", "failed"]


class BlobDownload:
    def __init__(self, digest: Digest, path: Path, repo: str) -> None:
        self.digest = digest
        # Which repository was asked: a refusal there says nothing about the same
        # digest under another name.
        self.repo = repo
        self.path = path  # the temp file; the final path once committed
        self.state: State = "starting"
        self.size: int | None = None  # from Content-Length, known once streaming
        self.written = 0  # bytes readers may read: from the file, then from the relay
        self.on_disk = 0  # bytes readable from the file (frozen once spilled)
        self.spilled = False  # the cache refused the bytes; the rest comes from memory
        self.error: BaseException | None = None
        self.source: BlobSource | None = None  # given by the caller (a bucket read)
        self.started = time.time()  # wall clock, for the admin API's rates
        self.readers = 0  # readers attached now
        self._changed = asyncio.Event()
        self._relay = Relay()
        self._on_end: list[Callable[[], None]] = []

    # -- state changes (the download table's) -----------------------------------------

    def streaming(self, size: int | None) -> None:
        self.size = size
        self._set("streaming")

    def progressed(self, on_disk: int) -> None:
        self.written = self.on_disk = on_disk
        self._notify()

    def spill(self) -> None:
        """From now on the bytes come from memory; readers keep what the file has."""
        self.spilled = True
        self.on_disk = self.written
        self._relay.begin(self.written)
        self._notify()

    def relayed(self, chunk: bytes) -> None:
        self._relay.push(chunk)
        self.written += len(chunk)
        self._notify()

    async def room(self) -> None:
        """A spilled download moves at its readers' pace (relay.Relay.room)."""
        await self._relay.room(lambda: self.written, self._notify)

    def verified(self, size: int) -> None:
        self.size = size
        self._set("verified")

    def committed(self, path: Path) -> None:
        self.path = path
        self._set("committed")

    def failed(self, error: BaseException) -> None:
        self.error = error
        self._set("failed")

    def _set(self, state: State) -> None:
        self.state = state
        self._notify()
        if not self.running:
            callbacks, self._on_end = self._on_end, []
            for callback in callbacks:
                callback()

    @property
    def running(self) -> bool:
        """Still fetching from upstream (verified, committed and failed have ended)."""
        return self.state in ("starting", "streaming")

    def when_finished(self, callback: Callable[[], None]) -> None:
        """Call `callback` once the download has ended (at once if it has)."""
        if self.running:
            self._on_end.append(callback)
        else:
            callback()

    def _notify(self) -> None:
        # Replace-then-set: every waiter that grabbed the old event wakes once.
        event, self._changed = self._changed, asyncio.Event()
        event.set()

    # -- waiting ----------------------------------------------------------------------

    async def ready(self) -> None:
        """Wait for upstream's response headers; raise the upstream's error if any."""
        while self.state == "starting":
            await self._changed.wait()
        if self.state == "failed":
            if isinstance(self.error, RegistryError):
                raise self.error
            raise UpstreamError("UNAVAILABLE", "upstream download failed", status=502)

    async def finished(self) -> None:
        while self.running:
            await self._changed.wait()

    # -- readers ----------------------------------------------------------------------

    def reader(self) -> DownloadReader:
        """Attach a reader. Synchronous on purpose: the file is opened before any
        await, while its name is still the temp name (it may be renamed, or unlinked
        if the download spills)."""
        fd = None if self.spilled else os.open(self.path, os.O_RDONLY)
        reader = DownloadReader(self, fd, self._relay.attach())
        self.readers += 1
        return reader

    def _moved(self) -> None:
        if self.spilled:
            self._relay.moved(self.written)

    def _read_at(self, fd: int | None, pos: int, want: int) -> Chunk:
        """Up to `want` bytes at `pos`: a span of the file below `on_disk` (sent with
        sendfile where the server can), else bytes from the relay."""
        chunk: bytes | None
        if pos < self.on_disk:
            assert fd is not None
            return FileSpan(fd, pos, min(want, self.on_disk - pos))
        chunk = self._relay.read(pos, min(want, READ_CHUNK))
        if chunk is None:
            raise AbortResponse(f"client fell behind the uncached relay of {self.digest}")
        if not chunk:
            raise AbortResponse(f"download of {self.digest} shrank")
        return chunk


class DownloadReader:
    """A reader of a download: a descriptor on its file (None once spilled) and a
    cursor in it. One body may be taken; otherwise `aclose()` releases both."""

    def __init__(self, dl: BlobDownload, fd: int | None, cursor: Cursor) -> None:
        self._dl = dl
        self._fd = fd
        self._cursor = cursor
        self._attached = True  # counted in dl.readers until closed

    @property
    def size(self) -> int | None:
        return self._dl.size

    def when_finished(self, callback: Callable[[], None]) -> None:
        """Call `callback` once the download being read has ended."""
        self._dl.when_finished(callback)

    async def wait_size(self, first: int | None) -> int | None:
        """The size, for a range request; a chunked upstream makes it wait for the end.

        While waiting, the reader holds a spilled relay only from `first`, where it
        will start reading; a suffix range (`first` None) cannot, and may find its
        bytes gone.
        """
        dl = self._dl
        if dl.size is None:
            if first is None:
                self._cursor.closed = True
            else:
                self._cursor.pos = first
            await dl.finished()
            await dl.ready()
        return dl.size

    def body(self, start: int, end: int | None) -> DownloadBody:
        """The bytes [start, end); closing the body closes this reader."""
        return DownloadBody(self, start, end)

    def download(self) -> None:
        return None  # already a download

    async def aclose(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
        if self._attached:
            self._attached = False
            self._dl.readers -= 1
        self._cursor.closed = True
        self._dl._moved()


class DownloadBody:
    """Bytes [start, end) of a download (end None: to the blob's end), as they arrive.

    The last byte of the response is held back until the download has verified its
    digest: a client that has every byte may hang up at once, and must never have
    received a complete body whose digest failed (docs/design.md, "Blob path").
    """

    def __init__(self, reader: DownloadReader, start: int, end: int | None) -> None:
        self._reader = reader
        self._start = start
        self._end = end

    async def __aiter__(self) -> AsyncIterator[Chunk]:
        dl, cursor, end = self._reader._dl, self._reader._cursor, self._end
        pos = cursor.pos = self._start
        while True:
            event = dl._changed  # taken before reading state: no lost wake-ups
            if dl.state == "failed":
                raise AbortResponse(f"download of {dl.digest} failed")
            if cursor.lagged:
                raise AbortResponse(f"client fell behind the uncached relay of {dl.digest}")
            # Verified is enough to finish: the bytes are final, only the commit is left.
            final = dl.state in ("verified", "committed")
            stop = end if end is not None else dl.size
            if final:
                assert dl.size is not None
                stop = dl.size if stop is None else min(stop, dl.size)
                readable = stop
            else:
                readable = dl.written if stop is None else min(dl.written, stop)
                if stop is None or readable >= stop:
                    readable -= 1
            if pos < readable:
                chunk = dl._read_at(self._reader._fd, pos, readable - pos)
                pos = cursor.pos = pos + (
                    chunk.count if isinstance(chunk, FileSpan) else len(chunk)
                )
                dl._moved()
                yield chunk
                continue
            if final and stop is not None and pos >= stop:
                return
            await event.wait()

    async def aclose(self) -> None:
        await self._reader.aclose()
