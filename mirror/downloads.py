"""One upstream's blob downloads: at most one per digest, owned by the table, not by
any response.

A miss starts a `BlobDownload` task that streams the upstream body into a temp file
(hashing as it goes, `mirror.hashing`) and commits it to the store when the digest
verifies. Responses only *read* the growing file at their own pace, so a client that
disconnects, or reads slowly, never affects the download, and every byte is fetched
from upstream once. Each upstream has its own table: one registry's failure (or wrong
bytes) never breaks pulls through another, while committed blobs are shared by all.

When the cache cannot take the bytes the download spills to a relay (`mirror.relay`)
and stops being shared: a relay cannot serve readers who join late.

With `sharing` (processes sharing one cache directory, `mirror.sharing`), a miss first
claims the digest's lease: the leader downloads as above, the others follow its temp
file with a `BlobDownload` of their own that no upstream request drives.
"""

from __future__ import annotations

import asyncio
import logging
import os
import weakref
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any

from mirror.diskstore import unlink_temp
from mirror.download import BlobDownload, DownloadReader
from mirror.errors import RegistryError, UpstreamError
from mirror.events import Events
from mirror.hashing import HashingWriter
from mirror.metrics import Metrics
from mirror.reference import Digest
from mirror.relay import Abandoned
from mirror.sharing import Follower, Leader, LeaderLost, Sharing
from mirror.store import BlobSource, BlobWrite, Store
from mirror.upstream import RemoteStore

log = logging.getLogger(__name__)


# (repo, digest, max_bytes, write) -> the source. It calls `write.publish()` when this
# process is the one fetching from the upstream.
OpenSource = Callable[[str, Digest, int, BlobWrite], Awaitable[BlobSource]]
# A check that the requested repository may be served the digest (a scope check),
# for a download led by another process for another repository.
Check = Callable[[], Awaitable[None]]
# A leader that ends before its upstream answered makes its followers claim again:
# this many times at most (each is a leader gone: crashed, or shut down).
MAX_RECLAIMS = 5


class DigestMismatch(Exception):
    pass


class Downloads:
    def __init__(
        self,
        store: Store,
        upstream: RemoteStore,
        metrics: Metrics,
        *,
        commit_grace: float = 25.0,
        source: OpenSource | None = None,
        sharing: Sharing | None = None,
        events: Events | None = None,
    ) -> None:
        self._events = events or Events()
        self._store = store
        self._sharing = sharing
        # Downloads that follow another process's (their repo: the leader's, or "").
        self._followed: weakref.WeakSet[BlobDownload] = weakref.WeakSet()
        self._upstream = upstream
        self._open = source or self._from_upstream
        self._metrics = metrics
        self._commit_grace = commit_grace
        self._active: dict[Digest, BlobDownload] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._runs: dict[asyncio.Task[None], BlobDownload] = {}

    def active(self, digest: Digest) -> BlobDownload | None:
        return self._active.get(digest)

    @property
    def upstream_name(self) -> str:
        return self._upstream.name

    async def settled(self, digest: Digest) -> None:
        """Wait until this process's download of `digest`, if any, has ended: committed
        to the cache (or given up). A warm job waits so that done means cached."""
        runs = [task for task, dl in self._runs.items() if dl.digest == digest]
        if runs:
            await asyncio.wait([asyncio.shield(t) for t in runs])

    def listing(self) -> list[BlobDownload]:
        """Downloads running now: led here, or followed from another process."""
        running = [dl for dl in self._active.values() if dl.running]
        return running + [dl for dl in self._followed if dl.running and dl not in running]

    async def join(
        self,
        repo: str,
        digest: Digest,
        max_bytes: int,
        source: BlobSource | None = None,
        *,
        check: Check | None = None,
    ) -> DownloadReader:
        """A reader of the download of `digest` (joined, or started), once upstream
        has answered with headers.

        A download started for another repository that the upstream refused (404, 401,
        403) says nothing about this repository: then this request asks for itself, so
        one client's bad name cannot fail everybody else's. A download another process
        leads for another repository is read only once `check` passed.
        """
        reclaims = 0
        while True:
            dl = self.get_or_start(repo, digest, max_bytes, source)
            if source is not None and dl.source is not source:
                await source.aclose()  # joined a download already running instead
            source = None
            followed = dl in self._followed
            # A follower's file is known only once it streams: its reader opens then.
            reader = None if followed else dl.reader()
            try:
                await dl.ready()
                if reader is None:
                    if check is not None and dl.repo != repo:
                        await check()
                    reader = dl.reader()
                return reader
            except UpstreamError as exc:
                if reader is not None:
                    await reader.aclose()
                if followed and isinstance(dl.error, LeaderLost) and reclaims < MAX_RECLAIMS:
                    reclaims += 1
                    continue  # its leader ended before the upstream answered: again
                if dl.repo == repo or exc.status >= 500:
                    raise
            except BaseException:
                if reader is not None:
                    await reader.aclose()
                raise

    def get_or_start(
        self, repo: str, digest: Digest, max_bytes: int, source: BlobSource | None = None
    ) -> BlobDownload:
        """The download of `digest`: joined, or started (from `source` if given, else
        from the table's own source: the upstream, or the cluster's leader)."""
        download = self._active.get(digest)
        if download is not None:
            self._metrics.coalesced.labels("blob").inc()
            return download
        lease = None
        if self._sharing is not None and source is None:
            claim = self._sharing.claim(digest, repo)
            if isinstance(claim, Follower):
                return self._follow(digest, claim)
            if isinstance(claim, int):
                return self._committed_elsewhere(digest, claim)
            lease = claim
        if lease is not None:
            assert self._sharing is not None
            write: BlobWrite = self._sharing.store.write_blob(digest, lease.temp)
        else:
            write = self._store.write_blob(digest)
        download = BlobDownload(digest, write.path, repo)
        download.source = source
        write_error = None
        try:
            # Created now, so a reader can open it before the first byte arrives.
            download.path.touch()
        except OSError as exc:
            # No cache file (full or read-only disk): relay-only from byte 0, and not
            # shared. Counted once the upstream answers: a 404 lost nothing.
            download.spill()
            write_error = exc
        else:
            self._active[digest] = download
        run = self._background(self._run(download, write, max_bytes, write_error, source, lease))
        self._runs[run] = download
        run.add_done_callback(self._runs.pop)
        return download

    def _follow(self, digest: Digest, follower: Follower) -> BlobDownload:
        """Another process leads this download: read its file as it grows."""
        assert self._sharing is not None
        self._metrics.downloads_followed.inc()
        # The leader's repository, once its log names it; "" until then.
        download = BlobDownload(digest, follower.temp, "")
        self._followed.add(download)
        self._active[digest] = download

        async def tail() -> None:
            assert self._sharing is not None
            try:
                await self._sharing.follow(download, follower)
            finally:
                self._forget(download)

        run = self._background(tail())
        self._runs[run] = download
        run.add_done_callback(self._runs.pop)
        return download

    def _committed_elsewhere(self, digest: Digest, size: int) -> BlobDownload:
        """Committed by another process since this request's cache lookup: a download
        that has ended, for whoever it was fetched (so the request's scope is checked)."""
        assert self._sharing is not None
        path = self._sharing.store.blob_path(digest)
        download = BlobDownload(digest, path, "")
        download.streaming(size)
        download.progressed(size)
        download.verified(size)
        download.committed(path)
        self._followed.add(download)
        return download

    async def aclose(self) -> None:
        """Stop: downloads whose bytes verified are only committing (fsync, rename), so
        they get `commit_grace` seconds to finish (clients already have those bytes: a
        cancelled commit would throw a verified blob away). Everything else stops now."""
        committing = {t for t, dl in self._runs.items() if dl.state == "verified"}
        if committing:
            log.info("waiting up to %.0f s for %d commits", self._commit_grace, len(committing))
            await asyncio.wait(committing, timeout=self._commit_grace)
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    # -- the download task ------------------------------------------------------------

    async def _from_upstream(
        self, repo: str, digest: Digest, max_bytes: int, write: BlobWrite
    ) -> BlobSource:
        write.publish()
        return await self._upstream.open_blob(repo, digest, max_bytes)

    async def _run(
        self,
        dl: BlobDownload,
        write: BlobWrite,
        max_bytes: int,
        write_error: OSError | None,
        source: BlobSource | None,
        lease: Leader | None = None,
    ) -> None:
        writer: HashingWriter | None = None
        body = source
        self._metrics.downloads_in_flight.inc()
        try:
            if body is None:
                body = await self._open(dl.repo, dl.digest, max_bytes, write)
            if write_error is not None:
                self._cache_write_failed(dl, write, write_error, lease)

            def progressed(size: int) -> None:
                dl.progressed(size)
                write.wrote(size)

            writer = HashingWriter(
                self._open_for_write(dl, write, lease),
                dl.digest.algorithm,
                progressed,
                lambda exc: self._spill(dl, write, exc, lease),
                dl.relayed,
                size=body.size,
            )
            dl.streaming(body.size)
            if lease is not None:
                lease.streaming(body.size)
            async for chunk in body:
                await writer.write(chunk)
                if dl.spilled:
                    await dl.room()  # the relay moves at its readers' pace
            hexdigest = await writer.finish()
            total = writer.submitted
            if hexdigest != dl.digest.hex or (dl.size is not None and total != dl.size):
                self._metrics.digest_mismatches.labels("blob").inc()
                log.error(
                    "blob %s from %s failed verification (got %s:%s, %d bytes); discarded",
                    dl.digest,
                    dl.repo,
                    dl.digest.algorithm,
                    hexdigest,
                    total,
                )
                await body.mismatched()
                self._events.mismatch(
                    "blob",
                    upstream=self._upstream.name,
                    repository=dl.repo,
                    digest=str(dl.digest),
                    actual=f"{dl.digest.algorithm}:{hexdigest}",
                )
                raise DigestMismatch(str(dl.digest))
            dl.verified(total)  # readers may finish now; the disk catches up below
            if dl.spilled:
                log.info("blob %s verified and served uncached", dl.digest)
                return
            await writer.synced()
            dl.committed(await write.commit(total))
            self._events.fill(
                "blob",
                upstream=self._upstream.name,
                repository=dl.repo,
                digest=str(dl.digest),
                media_type=None,
                size=total,
            )
            if lease is not None:
                lease.committed(total)
        except BaseException as exc:
            if writer is not None:
                writer.abort()
            await self._failed(dl, write, exc, lease)
        finally:
            self._metrics.downloads_in_flight.dec()
            self._forget(dl)
            if lease is not None and not dl.spilled:
                # Ended already, unless something escaped the handling above. A spilled
                # download's lease ends after its temp file is gone (`_abort`).
                lease.failed(LeaderLost())
            if body is not None:
                # After the commit: a shared download's lease is held until here, so
                # no other replica starts the same download while this one commits.
                await body.aclose()

    async def _failed(
        self, dl: BlobDownload, write: BlobWrite, exc: BaseException, lease: Leader | None
    ) -> None:
        cancelled = isinstance(exc, asyncio.CancelledError)
        # Forget it before anything else: the next request must start afresh, never
        # join a failed download whose file is being removed.
        self._forget(dl)
        if dl.state == "verified":
            # Clients have (or are reading) verified bytes from the temp file; only
            # the cache lost this blob. Their open descriptors survive the unlink.
            log.error("could not commit verified blob %s: %r", dl.digest, exc)
            if not cancelled:
                self._metrics.cache_write_failures.labels("blob").inc()
        else:
            dl.failed(exc)
            if isinstance(exc, Abandoned):
                log.info("uncached download of %s stopped: no client left", dl.digest)
            elif not isinstance(exc, RegistryError | DigestMismatch):
                log.warning("download of %s from %s failed: %r", dl.digest, dl.repo, exc)
        await self._abort(write, lease, exc)
        if cancelled:
            raise exc

    def _open_for_write(
        self, dl: BlobDownload, write: BlobWrite, lease: Leader | None
    ) -> int | None:
        if dl.spilled:
            return None
        try:
            return os.open(dl.path, os.O_WRONLY | os.O_TRUNC)
        except OSError as exc:
            self._spill(dl, write, exc, lease)
            return None

    def _spill(
        self, dl: BlobDownload, write: BlobWrite, exc: OSError | None, lease: Leader | None
    ) -> None:
        if dl.state == "failed":
            return  # a chunk still queued when the download failed: nobody to relay to
        dl.spill()
        self._cache_write_failed(dl, write, exc, lease)

    def _cache_write_failed(
        self, dl: BlobDownload, write: BlobWrite, exc: OSError | None, lease: Leader | None
    ) -> None:
        """The cache refused a blob: stream it on, uncached, and free what it took.
        Other processes' followers cannot read a relay: they fail, and ask again."""
        self._metrics.cache_write_failures.labels("blob").inc()
        log.error(
            "cannot write blob %s to the cache (%s); streaming it to its clients uncached",
            dl.digest,
            exc,
        )
        self._forget(dl)  # later requests start their own download
        self._background(self._abort(write, lease, LeaderLost()))

    @staticmethod
    async def _abort(write: BlobWrite, lease: Leader | None, exc: BaseException) -> None:
        """Remove the temp file. A leased one is first renamed away and its lease ended
        at once: a next leader creates its file under the same name, which must not
        be removed after it was, and must not wait for a multi-GB unlink either."""
        if lease is None:
            await write.abort()
            return
        if lease.ended:
            return  # removed already (at a spill), or committed
        doomed = lease.detach()
        lease.failed(exc)
        if doomed is not None:
            await asyncio.to_thread(unlink_temp, doomed)

    def _forget(self, dl: BlobDownload) -> None:
        """Drop `dl` from the table, but never a newer download of the same digest."""
        if self._active.get(dl.digest) is dl:
            del self._active[dl.digest]

    def _background(self, coro: Coroutine[Any, Any, None]) -> asyncio.Task[None]:
        """Run `coro` as a task owned by this table (cancelled by aclose)."""
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task
