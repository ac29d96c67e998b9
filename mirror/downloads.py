"""Blob downloads owned by the app, not by any one response.

A miss starts a `BlobDownload` task that streams the upstream body into a temp file
(hashing as it goes) and commits it when the digest verifies. Responses only *read*
the growing file at their own pace, so a client that disconnects, or reads slowly,
never affects the download, and every byte is fetched from upstream once.

Hashing and writing run in one worker thread per download, fed by a bounded queue:
measured faster than a thread hop per chunk or hashing in the event loop, and it
keeps the loop free for other requests (docs/design.md, "Blob path").

When the cache cannot take the bytes (ENOSPC, a read-only file system, EIO), the
download *spills*: it leaves the cache behind, keeps hashing, and relays the rest of
the body from memory to the clients already attached, so they still get every byte
(and the digest check) while the mirror stays up. New requests start their own
download. The relay is a bounded window that moves at the pace of the slowest
attached reader; a reader that stalls it for `RELAY_STALL` seconds is cut (it can
resume with Range) rather than holding everyone back.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import os
import queue
import threading
import weakref
from collections import deque
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any, Literal

import httpx

from mirror.errors import RegistryError, UpstreamError
from mirror.metrics import Metrics
from mirror.ranges import parse_length
from mirror.reference import Digest
from mirror.storage import Storage
from mirror.upstream import Upstream

log = logging.getLogger(__name__)

# Chunks queued between the event loop and a download's writer thread: bounds memory
# per download to QUEUE_DEPTH x chunk size (1 MiB reads) whatever the blob size.
QUEUE_DEPTH = 8

# A spilled download relays from memory: this many bytes may wait for the slowest
# reader, and a reader that holds the window full this long is cut.
RELAY_WINDOW = 32 << 20
RELAY_STALL = 30.0

# starting -> streaming -> verified -> committed, or -> failed before `verified`.
# `verified`: every byte is on disk and the digest matched, so readers may send the
# last byte; the fsync and the rename into the cache follow.
State = Literal["starting", "streaming", "verified", "committed", "failed"]


class DigestMismatch(Exception):
    pass


class Abandoned(Exception):
    """A spilled download lost its last reader: with no cache to fill, it stops."""


class _HashingWriter:
    """Writes and hashes chunks in a dedicated thread; reports progress to the loop.

    `fd` None means there is no cache file to write (it could not be created): every
    chunk is only hashed and relayed. The same happens from the first write that
    fails with an OSError: `on_spill` is called once, then `on_relay` for that chunk
    and each one after it, in order.
    """

    def __init__(
        self,
        fd: int | None,
        algorithm: str,
        on_progress: Callable[[int], None],
        on_spill: Callable[[OSError | None], None],
        on_relay: Callable[[bytes], None],
    ) -> None:
        self._loop = asyncio.get_running_loop()
        self._fd = fd
        self._hash = hashlib.new(algorithm)
        self._queue: queue.SimpleQueue[bytes | None] = queue.SimpleQueue()
        self._slots = asyncio.Semaphore(QUEUE_DEPTH)
        self._on_progress = on_progress
        self._on_spill = on_spill
        self._on_relay = on_relay
        self._hashed: asyncio.Future[str] = self._loop.create_future()
        self._synced: asyncio.Future[None] = self._loop.create_future()
        self.submitted = 0  # bytes handed to the thread; the offset to resume from
        self._aborted = False
        self._thread = threading.Thread(target=self._run, name="blob-writer", daemon=True)
        self._thread.start()

    async def write(self, chunk: bytes) -> None:
        await self._slots.acquire()
        if self._hashed.done():
            # The thread has stopped (an unexpected error): raise it instead of
            # queueing into a queue nobody drains.
            self._hashed.result()
            raise RuntimeError("blob writer stopped early")
        self.submitted += len(chunk)
        self._queue.put(chunk)

    async def finish(self) -> str:
        """The hex digest of everything written, once it is all on disk (not yet synced)."""
        self._queue.put(None)
        return await self._hashed

    async def synced(self) -> None:
        """Wait for the fsync that must precede publishing the file."""
        await self._synced

    def abort(self) -> None:
        self._aborted = True
        self._queue.put(None)

    def _run(self) -> None:
        written = 0
        spilled = self._fd is None
        try:
            try:
                while (chunk := self._queue.get()) is not None and not self._aborted:
                    if not spilled:
                        try:
                            self._write_all(chunk)
                        except OSError as exc:
                            spilled = True
                            self._call_in_loop(self._on_spill, exc)
                    self._hash.update(chunk)
                    written += len(chunk)
                    if spilled:
                        self._call_in_loop(self._relay, chunk)
                    else:
                        self._call_in_loop(self._progress, written)
            except BaseException as exc:  # reported to the loop, never lost in the thread
                self._call_in_loop(self._fail, exc)
                return
            self._call_in_loop(self._settle, (self._hashed, self._hash.hexdigest()))
            # Durable before the rename that publishes it: a crash must never leave a
            # committed name pointing at unwritten pages.
            try:
                if not self._aborted and not spilled and self._fd is not None:
                    os.fsync(self._fd)
            except OSError as exc:
                self._call_in_loop(self._settle, (self._synced, exc))
                return
            self._call_in_loop(self._settle, (self._synced, None))
        finally:
            if self._fd is not None:
                os.close(self._fd)

    def _write_all(self, chunk: bytes) -> None:
        assert self._fd is not None
        view = memoryview(chunk)
        while view:
            n = os.write(self._fd, view)
            view = view[n:]

    def _call_in_loop(self, callback: Callable[[Any], None], arg: Any) -> None:
        # RuntimeError: the loop closed (shutdown), nobody is waiting for this download.
        with contextlib.suppress(RuntimeError):
            self._loop.call_soon_threadsafe(callback, arg)

    def _progress(self, written: int) -> None:
        self._slots.release()
        self._on_progress(written)

    def _relay(self, chunk: bytes) -> None:
        self._slots.release()
        self._on_relay(chunk)

    def _settle(self, pair: tuple[asyncio.Future[Any], Any]) -> None:
        future, result = pair
        if future.done():
            return
        if isinstance(result, BaseException):
            future.set_exception(result)
            future.add_done_callback(lambda f: f.exception())  # retrieved: no noise
        else:
            future.set_result(result)

    def _fail(self, exc: BaseException) -> None:
        self._settle((self._hashed, exc))
        self._settle((self._synced, exc))
        # Wake a producer blocked on a full queue so write() can raise.
        for _ in range(QUEUE_DEPTH):
            self._slots.release()


class Cursor:
    """One reader's position in a download: what a spilled relay may let go of."""

    __slots__ = ("__weakref__", "closed", "lagged", "pos")

    def __init__(self) -> None:
        self.pos = 0
        self.closed = False
        self.lagged = False


class BlobDownload:
    """One upstream fetch of one digest, observed by any number of readers."""

    def __init__(self, digest: Digest, path: Path, upstream: str, repo: str) -> None:
        self.digest = digest
        # Which upstream and repository were asked: a refusal there says nothing
        # about the same digest under another name.
        self.source = (upstream, repo)
        self.path = path  # the temp file; the final path once committed
        self.state: State = "starting"
        self.size: int | None = None  # from Content-Length, known once streaming
        self.written = 0  # bytes readers may read: from the file, then from the relay
        self.on_disk = 0  # bytes readable from the file (frozen once spilled)
        self.spilled = False  # the cache refused the bytes; the rest comes from memory
        self.write_error: OSError | None = None  # why the temp file could not be created
        self.error: BaseException | None = None
        self._changed = asyncio.Event()
        self._relay: deque[bytes] = deque()
        self._relay_start = 0  # offset of the first byte in `_relay`
        self._relay_bytes = 0
        self._cursors: weakref.WeakSet[Cursor] = weakref.WeakSet()
        self._room = asyncio.Event()

    def _notify(self) -> None:
        # Replace-then-set: every waiter that grabbed the old event wakes once.
        event, self._changed = self._changed, asyncio.Event()
        event.set()

    async def changed(self) -> None:
        await self._changed.wait()

    def current_event(self) -> asyncio.Event:
        return self._changed

    async def ready(self) -> None:
        """Wait for upstream's response headers; raise the upstream's error if any."""
        while self.state == "starting":
            await self.changed()
        if self.state == "failed":
            if isinstance(self.error, RegistryError):
                raise self.error
            raise UpstreamError("UNAVAILABLE", "upstream download failed", status=502)

    async def finished(self) -> None:
        while self.state in ("starting", "streaming"):
            await self.changed()

    # -- readers ----------------------------------------------------------------------

    def attach(self) -> Cursor:
        """Register a reader. Weakly held: a reader that vanishes never pins the relay."""
        cursor = Cursor()
        self._cursors.add(cursor)
        return cursor

    def moved(self) -> None:
        """A reader advanced or left: the relay may drop what everyone has read."""
        if not self.spilled:
            return
        floor = min((c.pos for c in self._live()), default=self.written)
        while self._relay and self._relay_start + len(self._relay[0]) <= floor:
            chunk = self._relay.popleft()
            self._relay_start += len(chunk)
            self._relay_bytes -= len(chunk)
        self._room.set()

    def relay_read(self, pos: int, limit: int) -> bytes | None:
        """Up to `limit` bytes at `pos` from the relay; None if they were let go."""
        if pos < self._relay_start:
            return None
        offset = self._relay_start
        for chunk in self._relay:
            if pos < offset + len(chunk):
                return chunk[pos - offset : pos - offset + limit]
            offset += len(chunk)
        return b""

    def _live(self) -> list[Cursor]:
        return [c for c in self._cursors if not c.closed and not c.lagged]

    # -- the producer side of a spilled download --------------------------------------

    def spill(self) -> None:
        self.spilled = True
        self._relay_start = self.on_disk = self.written

    def push(self, chunk: bytes) -> None:
        self._relay.append(chunk)
        self._relay_bytes += len(chunk)
        self.written += len(chunk)
        self._notify()

    async def room(self) -> None:
        """Wait until the relay has room; cut readers that stall it for RELAY_STALL."""
        while True:
            live = self._live()
            if not live:
                raise Abandoned(str(self.digest))
            if self._relay_bytes <= RELAY_WINDOW:
                return
            self._room.clear()
            try:
                await asyncio.wait_for(self._room.wait(), RELAY_STALL)
            except TimeoutError:
                keep_from = self.written - RELAY_WINDOW
                if self._relay:
                    # A reader stalled inside the oldest chunk must go too, or nothing
                    # is freed and the producer waits forever.
                    keep_from = max(keep_from, self._relay_start + len(self._relay[0]))
                for cursor in live:
                    if cursor.pos < keep_from:
                        cursor.lagged = True
                self.moved()
                self._notify()  # a lagged reader waiting for bytes learns it was cut


class Downloads:
    """The app's in-flight blob downloads, at most one per digest."""

    def __init__(self, storage: Storage, metrics: Metrics, *, resume_attempts: int) -> None:
        self._storage = storage
        self._metrics = metrics
        self._resume_attempts = resume_attempts
        self._active: dict[str, BlobDownload] = {}
        self._tasks: set[asyncio.Task[None]] = set()

    def get_or_start(self, upstream: Upstream, repo: str, digest: Digest) -> BlobDownload:
        """The download of `digest` from `upstream` in flight, or a new one.

        Per upstream: one registry's failure (or wrong bytes) must never break pulls
        through another. Committed blobs are shared across upstreams all the same.
        """
        key = _key(upstream.name, digest)
        download = self._active.get(key)
        if download is not None:
            self._metrics.coalesced.labels("blob").inc()
        else:
            download = BlobDownload(digest, self._storage.temp_path(), upstream.name, repo)
            try:
                # Created now, so a reader can open it before the first byte arrives.
                download.path.touch()
            except OSError as exc:
                # No cache file (full or read-only disk): relay-only from byte 0, and
                # not shared, since a relay cannot serve readers who join late.
                # Counted once the upstream answers: a 404 lost nothing.
                download.spill()
                download.write_error = exc
            else:
                self._active[key] = download
            self._background(self._run(upstream, repo, download))
        return download

    def active(self, upstream: Upstream, digest: Digest) -> BlobDownload | None:
        return self._active.get(_key(upstream.name, digest))

    async def aclose(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    def _cache_write_failed(self, dl: BlobDownload, exc: OSError | None) -> None:
        """The cache refused a blob: stream it on, uncached, and free what it took."""
        self._metrics.cache_write_failures.labels("blob").inc()
        log.error(
            "cannot write blob %s to the cache (%s); streaming it to its clients uncached",
            dl.digest,
            exc,
        )
        self._forget(dl)  # later requests start their own download
        self._background(asyncio.to_thread(_unlink, dl.path))

    def _spill(self, dl: BlobDownload, exc: OSError | None) -> None:
        if dl.state == "failed":
            return  # a chunk still queued when the download failed: nobody to relay to
        dl.spill()
        self._cache_write_failed(dl, exc)
        dl._notify()

    def _forget(self, dl: BlobDownload) -> None:
        """Drop `dl` from the table, but never a newer download of the same digest."""
        key = _key(dl.source[0], dl.digest)
        if self._active.get(key) is dl:
            del self._active[key]

    def _background(self, coro: Coroutine[Any, Any, None]) -> None:
        """Run `coro` as a task owned by this object (cancelled by aclose)."""
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _open_for_write(self, dl: BlobDownload) -> int | None:
        if dl.spilled:
            return None
        try:
            return os.open(dl.path, os.O_WRONLY | os.O_TRUNC)
        except OSError as exc:
            self._spill(dl, exc)
            return None

    async def _run(self, upstream: Upstream, repo: str, dl: BlobDownload) -> None:
        path = f"/v2/{repo}/blobs/{dl.digest}"
        writer: _HashingWriter | None = None
        self._metrics.downloads_in_flight.inc()
        try:
            resp = await upstream.get(path, repo=repo, kind="blob")
            await upstream.raise_for_status(resp, "blob")
            dl.size = parse_length(resp.headers.get("content-length"))
            if dl.write_error is not None:
                self._cache_write_failed(dl, dl.write_error)

            def progress(written: int) -> None:
                dl.written = dl.on_disk = written
                dl._notify()

            try:
                writer = _HashingWriter(
                    self._open_for_write(dl),
                    dl.digest.algorithm,
                    progress,
                    lambda exc: self._spill(dl, exc),
                    dl.push,
                )
            except BaseException:
                await resp.aclose()
                raise
            dl.state = "streaming"
            dl._notify()
            await self._copy(upstream, resp, writer, dl, path, repo)
            hexdigest = await writer.finish()
            total = writer.submitted
            if hexdigest != dl.digest.hex or (dl.size is not None and total != dl.size):
                self._metrics.digest_mismatches.labels("blob").inc()
                log.error(
                    "blob %s from %s failed verification (got %s:%s, %d bytes); discarded",
                    dl.digest,
                    repo,
                    dl.digest.algorithm,
                    hexdigest,
                    total,
                )
                raise DigestMismatch(str(dl.digest))
            dl.size = total
            dl.state = "verified"  # readers may finish now; the disk catches up below
            dl._notify()
            if dl.spilled:
                log.info("blob %s verified and served uncached", dl.digest)
                return
            await writer.synced()
            dl.path = self._storage.commit_blob(dl.digest, dl.path, total)
            dl.state = "committed"
            dl._notify()
        except BaseException as exc:
            if writer is not None:
                writer.abort()
            if dl.state == "verified":
                # Clients have (or are reading) verified bytes from the temp file; only
                # the cache lost this blob. Their open descriptors survive the unlink.
                log.error("could not commit verified blob %s: %r", dl.digest, exc)
                if not isinstance(exc, asyncio.CancelledError):
                    self._metrics.cache_write_failures.labels("blob").inc()
                self._forget(dl)
                _unlink(dl.path)
                if isinstance(exc, asyncio.CancelledError):
                    raise
                return
            dl.error = exc
            dl.state = "failed"
            # Forget it before anything else: the next request must start afresh,
            # never join a failed download whose file is being removed.
            self._forget(dl)
            dl._notify()
            if isinstance(exc, Abandoned):
                log.info("uncached download of %s stopped: no client left", dl.digest)
            elif not isinstance(exc, RegistryError | DigestMismatch):
                log.warning("download of %s from %s failed: %r", dl.digest, repo, exc)
            if isinstance(exc, asyncio.CancelledError):
                _unlink(dl.path)
                raise
            # Unlinking a multi-GB file can take a while: not in the event loop.
            await asyncio.to_thread(_unlink, dl.path)
        finally:
            self._metrics.downloads_in_flight.dec()
            self._forget(dl)

    async def _copy(
        self,
        upstream: Upstream,
        resp: httpx.Response,
        writer: _HashingWriter,
        dl: BlobDownload,
        path: str,
        repo: str,
    ) -> None:
        """Stream the body into the writer; resume with Range after a broken read."""
        attempts = 0
        fetched = self._metrics.upstream_bytes.labels(upstream.name)
        while True:
            try:
                async for chunk in resp.aiter_raw():
                    await writer.write(chunk)
                    fetched.inc(len(chunk))
                    if dl.spilled:
                        await dl.room()  # the relay moves at its readers' pace
                return
            except httpx.TransportError as exc:
                if attempts >= self._resume_attempts:
                    raise
                attempts += 1
                offset = writer.submitted
                log.warning(
                    "upstream body of %s broke at %d bytes (%r); resuming (%d/%d)",
                    path,
                    offset,
                    exc,
                    attempts,
                    self._resume_attempts,
                )
                self._metrics.resumes.inc()
            finally:
                await resp.aclose()
            resp = await upstream.get(
                path, repo=repo, kind="blob", headers={"Range": f"bytes={offset}-"}
            )
            await upstream.raise_for_status(resp, "blob")
            if resp.status_code != 206 or not resp.headers.get("content-range", "").startswith(
                f"bytes {offset}-"
            ):
                await resp.aclose()
                raise UpstreamError("UNAVAILABLE", "upstream cannot resume the blob", status=502)


def _key(upstream: str, digest: Digest) -> str:
    return f"{upstream}/{digest}"


def _unlink(path: Path) -> None:
    with contextlib.suppress(FileNotFoundError):
        path.unlink()
