"""The shared store for replicas: content in a bucket, the index in Redis, and the
local disk as a size-capped L1 in front of both.

    reads    L1 (local disk speed) -> the bucket (by the Redis index, or a HEAD
             when Redis is down) -> a miss; a bucket hit also fills L1 in the
             background, verified before it is kept
    writes   a download writes the L1 temp file; the replica that leads it
             (`publish`) streams the same bytes into a multipart upload, completed
             only once the digest has verified; then Redis records the blob
    tags     Redis (one entry, so one revalidation per TTL for the cluster); L1
             keeps a copy for when Redis is down

Failure semantics: the mirror is a cache and degrades instead of failing a pull it
could serve. Redis down: tags and sizes come from L1 and the bucket; S3 down: L1
serves, and misses are fetched upstream into L1 only (docs/deploy.md).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import sqlite3
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Collection, Set
from pathlib import Path

from mirror.diskstore import DiskBlob, DiskStore, DiskWrite
from mirror.errors import AbortResponse, UpstreamError
from mirror.hashing import HashingWriter
from mirror.metrics import CacheUsage, Metrics
from mirror.objects import ObjectBody, Objects, ObjectStoreError, Upload
from mirror.redisindex import IndexUnavailable, RedisIndex
from mirror.reference import Digest
from mirror.store import (
    BlobEntry,
    ImageKey,
    PullRecord,
    Recovery,
    Scan,
    StoredManifest,
    TagEntry,
    TagKey,
)

log = logging.getLogger(__name__)

# Bucket hits copied into L1 at once, per replica (each is one GET of the object).
L1_FILLS = 2
MAX_FILLS_QUEUED = 1024
# Accesses remembered between flushes (about 100 bytes each).
MAX_TOUCHED = 1 << 18


class SharedStore:
    def __init__(
        self,
        l1: DiskStore,
        objects: Objects,
        index: RedisIndex,
        metrics: Metrics,
        *,
        l1_enabled: bool = True,
        redirect_ttl: float | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._redirect_ttl = redirect_ttl  # None: no redirects
        self.l1 = l1
        self.objects = objects
        self.index = index
        self._metrics = metrics
        self._l1_enabled = l1_enabled
        self._clock = clock
        self._fills: dict[Digest, asyncio.Task[None]] = {}
        self._fill_slots = asyncio.Semaphore(L1_FILLS)
        self._dropping: set[asyncio.Task[None]] = set()
        # Accesses since the last flush to Redis: touched in the event loop, flushed
        # from the lifecycle thread (hence the lock), kept while Redis is down (up to
        # MAX_TOUCHED each: an outage of days must not grow them without bound).
        self._touch_lock = threading.Lock()
        self._touched_blobs: dict[Digest, float] = {}
        self._touched_manifests: dict[Digest, float] = {}
        self._pulled: dict[ImageKey, tuple[Digest, int, float]] = {}

    # -- manifests and tags -----------------------------------------------------------

    async def get_manifest(self, digest: Digest) -> StoredManifest | None:
        stored = await self.l1.get_manifest(digest)
        if stored is not None:
            return stored
        try:
            found = await self.objects.get_manifest(digest)
        except ObjectStoreError:
            return None
        if found is None:
            return None
        stored = StoredManifest(digest, *found)
        await self._local(self.l1.put_manifest(stored))
        return stored

    async def put_manifest(self, manifest: StoredManifest) -> None:
        # The bucket and Redis first: the other replicas can use it; L1 last, and
        # only its failure is the caller's (a full local disk is counted as usual).
        try:
            await self.objects.put_manifest(manifest.digest, manifest.media_type, manifest.body)
        except ObjectStoreError:
            pass  # logged once by Objects; this replica still has it in L1
        else:
            await self._shared(
                self.index.add_manifest(manifest.digest, manifest.media_type, self._clock())
            )
        await self.l1.put_manifest(manifest)

    async def get_tag(self, key: TagKey) -> TagEntry | None:
        try:
            return await self.index.get_tag(key)
        except IndexUnavailable:
            return await self.l1.get_tag(key)

    async def put_tag(self, key: TagKey, entry: TagEntry) -> None:
        await self._shared(self.index.put_tag(key, entry))
        await self.l1.put_tag(key, entry)

    # -- scopes: in Redis only. Without it a digest's pairs are unknown here (False),
    # and what this replica confirms meanwhile lives in the proxy's bounded memory
    # (mirror.scopes): never served unchecked.

    async def has_scope(self, digest: Digest, upstream: str, repo: str) -> bool:
        try:
            return await self.index.has_scope(digest, upstream, repo)
        except IndexUnavailable:
            return False

    async def add_scopes(self, digests: Collection[Digest], upstream: str, repo: str) -> None:
        await self._shared(self.index.add_scopes(digests, upstream, repo, self._clock()))

    def drop_scopes(self, keep: Set[Digest], before: float) -> int:
        return self.index.drop_scopes(keep, before)

    # -- blobs ------------------------------------------------------------------------

    async def open_blob(self, digest: Digest) -> DiskBlob | ObjectBlob | None:
        local = await self.l1.open_blob(digest)
        if local is not None:
            self._metrics.tier_hits.labels("l1").inc()
            return local
        size = await self.shared_size(digest)
        if size is None:
            return None
        # The whole object's GET is opened now, while the answer can still be a miss:
        # a bucket that fails here sends the request upstream instead of cutting a
        # client mid-body. Most requests read it all; a range request reopens.
        try:
            whole = await self.objects.open_blob(digest, 0, size) if size else None
        except ObjectStoreError:
            return None
        if whole is None and size:
            # Indexed but gone (evicted a moment ago): a miss, and the entry goes.
            with contextlib.suppress(IndexUnavailable):
                await asyncio.to_thread(self.index.drop_blobs, [digest])
            return None
        self._metrics.tier_hits.labels("shared").inc()
        # A whole-blob read becomes a local download from the bucket (`download()`):
        # verified, shared by concurrent readers, kept in L1. A range is read in place,
        # and the blob is copied into L1 in the background.
        return ObjectBlob(
            self.objects,
            digest,
            size,
            whole,
            on_range=lambda: self._fill(digest, size),
            on_damage=lambda: self.damaged(digest),
        )

    async def blob_size(self, digest: Digest) -> int | None:
        size = await self.l1.blob_size(digest)
        return size if size is not None else await self.shared_size(digest)

    async def shared_size(self, digest: Digest) -> int | None:
        """The size of a blob committed to the bucket, or None. A bucket backing off is
        no help now (its reads would fail): None, and the blob is fetched upstream."""
        if not self.objects.reachable:
            return None
        indexed = True
        try:
            size = await self.index.blob_size(digest)
            if size is not None:
                return size
        except IndexUnavailable:
            indexed = False
        try:
            # The bucket answers by digest: Redis is down, or does not know an object
            # committed while it was down (or before it lost its data). A HEAD costs
            # little next to the upstream fetch a miss means.
            size = await self.objects.blob_size(digest)
        except ObjectStoreError:
            return None
        if size is not None and indexed:
            await self._shared(self.index.add_blob(digest, size, self._clock()))
        return size

    async def blob_url(self, digest: Digest) -> str | None:
        """A presigned GET of the committed object (Distribution's `redirect`). Only
        for what the bucket holds under its final key: never an upload in progress."""
        if self._redirect_ttl is None or await self.shared_size(digest) is None:
            return None
        try:
            return await self.objects.sign(digest, self._redirect_ttl)
        except ObjectStoreError:
            return None

    def write_blob(self, digest: Digest) -> SharedWrite:
        return SharedWrite(self, self.l1.write_blob(digest), digest)

    async def committed(self, digest: Digest, size: int) -> None:
        await self._shared(self.index.add_blob(digest, size, self._clock()))

    def damaged(self, digest: Digest) -> None:
        """A blob in the bucket failed verification. Only verified bytes are ever put,
        so this is damage: forgotten, and the next request fetches the blob anew."""
        log.error("blob %s in the bucket does not match its digest; removed", digest)
        task = asyncio.get_running_loop().create_task(self._drop_damaged(digest))
        self._dropping.add(task)
        task.add_done_callback(self._dropping.discard)

    async def _drop_damaged(self, digest: Digest) -> None:
        try:
            await asyncio.to_thread(self.drop_blobs, [digest])
        except (IndexUnavailable, ObjectStoreError) as exc:
            log.warning("could not remove damaged blob %s yet: %s", digest, exc)

    def _fill(self, digest: Digest, size: int) -> None:
        """Copy a bucket hit into L1, once per digest at a time, in the background."""
        if not self._l1_enabled or digest in self._fills or len(self._fills) >= MAX_FILLS_QUEUED:
            return  # a later hit fills it
        task = asyncio.get_running_loop().create_task(self._fill_one(digest, size))
        self._fills[digest] = task
        task.add_done_callback(lambda _: self._fills.pop(digest, None))

    async def _fill_one(self, digest: Digest, size: int) -> None:
        async with self._fill_slots:
            if await self.l1.blob_size(digest) is not None:
                return
            write = self.l1.write_blob(digest)
            writer = None
            try:
                body = await self.objects.open_blob(digest, 0, size) if size else None
                fd = os.open(write.path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
                failed: list[OSError | None] = []
                writer = HashingWriter(
                    fd, digest.algorithm, lambda _: None, failed.append, lambda _: None
                )
                if body is not None:
                    try:
                        async for chunk in body:
                            await writer.write(chunk)
                    finally:
                        await body.aclose()
                hexdigest = await writer.finish()
                if failed or hexdigest != digest.hex or writer.submitted != size:
                    await write.abort()
                    if not failed:
                        self.damaged(digest)
                    return
                await writer.synced()
                await write.commit(size)
            except asyncio.CancelledError:
                if writer is not None:
                    writer.abort()
                await write.abort()
                raise
            except (OSError, sqlite3.Error, AbortResponse, IndexUnavailable) as exc:
                if writer is not None:
                    writer.abort()
                log.warning("could not copy %s from the bucket to the local cache: %s", digest, exc)
                await write.abort()

    # -- access tracking and lifecycle ------------------------------------------------

    def touch_blob(self, digest: Digest) -> None:
        self.l1.touch_blob(digest)
        with self._touch_lock:
            if len(self._touched_blobs) < MAX_TOUCHED or digest in self._touched_blobs:
                self._touched_blobs[digest] = self._clock()

    def touch_manifest(self, digest: Digest) -> None:
        self.l1.touch_manifest(digest)
        with self._touch_lock:
            if len(self._touched_manifests) < MAX_TOUCHED or digest in self._touched_manifests:
                self._touched_manifests[digest] = self._clock()

    def record_pull(self, key: ImageKey, digest: Digest) -> None:
        with self._touch_lock:
            old = self._pulled.get(key)
            if old is not None or len(self._pulled) < MAX_TOUCHED:
                self._pulled[key] = (digest, (old[1] if old else 0) + 1, self._clock())

    def flush_access(self) -> None:
        """Every replica's accesses reach Redis (ZADD GT), whoever evicts."""
        with self._touch_lock:
            blobs, self._touched_blobs = self._touched_blobs, {}
            manifests, self._touched_manifests = self._touched_manifests, {}
            pulled, self._pulled = self._pulled, {}
        try:
            self.index.add_pulls(pulled)
        except IndexUnavailable:
            with self._touch_lock:
                for key, (digest, count, when) in pulled.items():
                    old = self._pulled.get(key)
                    self._pulled[key] = (digest, count + (old[1] if old else 0), when)
        try:
            self.index.touch(blobs, manifests)
        except IndexUnavailable:
            # Kept for the next round: Redis may be back by then.
            with self._touch_lock:
                for digest, when in blobs.items():
                    self._touched_blobs.setdefault(digest, when)
                for digest, when in manifests.items():
                    self._touched_manifests.setdefault(digest, when)

    def scan(self) -> Scan:
        return self.index.scan()

    def repositories(self) -> list[tuple[str, str]]:
        try:
            return self.index.repositories()
        except IndexUnavailable:
            # What this replica cached itself: a partial list beats none.
            return self.l1.repositories()

    def drop_blobs(self, digests: list[Digest]) -> None:
        # Redis first: no replica finds them from here on; then the objects. Replicas
        # streaming one now may be cut (the next request fetches it anew); L1 copies
        # stay until L1 evicts them.
        self.index.drop_blobs(digests)
        self.objects.delete([self.objects.blob_key(d) for d in digests])

    def drop_manifests(self, digests: list[Digest]) -> None:
        self.index.drop_manifests(digests)
        self.objects.delete([self.objects.manifest_key(d) for d in digests])

    def drop_tags(self, keys: list[TagKey]) -> None:
        self.index.drop_tags(keys)

    # -- pulls and pins: in Redis (the cluster's), as tags are -------------------------

    def pulls(self) -> list[PullRecord]:
        return self.index.pulls()

    def drop_pulls(self, keys: list[ImageKey]) -> None:
        self.index.drop_pulls(keys)

    def pins(self) -> dict[ImageKey, float]:
        return self.index.pins()

    def set_pin(self, key: ImageKey, pinned_at: float | None) -> None:
        self.index.set_pin(key, pinned_at)

    def tag_entries(self) -> list[tuple[TagKey, TagEntry]]:
        return self.index.tag_entries()

    def put_job(self, job_id: str, record: str) -> None:
        self.index.put_job(job_id, record)

    def jobs(self) -> dict[str, str]:
        return self.index.jobs()

    def drop_jobs(self, job_ids: list[str]) -> None:
        self.index.drop_jobs(job_ids)

    def sweep_temp(self, older_than: float) -> int:
        return self.l1.sweep_temp(older_than)

    def reconcile_bucket(self) -> int:
        """Index the blobs the bucket holds but Redis does not (committed while Redis
        was down, or before it lost its data), so that they count against max_size
        and are evicted like the rest. How many were found (a lifecycle round's)."""
        known = {b.digest for b in self.index.scan().blobs}
        found = [entry for entry in self.objects.list_blobs() if entry[0] not in known]
        if found:
            self.index.add_blobs(found)
            log.info("indexed %d blobs found in the bucket without an index entry", len(found))
        return len(found)

    def verify_blob(self, entry: BlobEntry) -> bool:
        """Re-hash the bucket's object (what every replica serves); drop it unless it
        matches. L1 copies were verified when they were made."""
        found = self.objects.hash_blob(entry.digest)
        if found == (entry.digest.hex, entry.size):
            return True
        log.error(
            "blob %s in the bucket %s; removed",
            entry.digest,
            "is missing" if found is None else "failed verification",
        )
        self.drop_blobs([entry.digest])
        return False

    def recover(self) -> Recovery:
        return self.l1.recover()  # the bucket holds only verified objects: nothing to do

    def usage(self) -> CacheUsage:
        return self.index.usage()

    def reconcile(self, scan: Scan) -> None:
        self.index.reconcile(scan)

    def probe(self) -> tuple[bool, str]:
        """Ready while the local disk is usable: without Redis or the bucket the
        replica still serves (alone, from L1, or uncached); /readyz says which."""
        usable, detail = self.l1.probe()
        parts = [f"local: {detail}"]
        redis_ok = self.index.ping_sync()
        parts.append("redis: " + ("ok" if redis_ok else "unreachable, working alone"))
        parts.append("s3: " + ("ok" if self.objects.reachable else "unreachable, serving L1"))
        return usable, "; ".join(parts)

    def close(self) -> None:
        for task in self._fills.values():
            task.cancel()
        self.l1.close()

    async def aclose(self) -> None:
        tasks = list(self._fills.values())
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await self.index.aclose()

    # -- helpers ----------------------------------------------------------------------

    async def _shared(self, write: Awaitable[None]) -> None:
        """A write to Redis that the replica can do without (logged once by the index)."""
        with contextlib.suppress(IndexUnavailable):
            await write

    async def _local(self, write: Awaitable[None]) -> None:
        try:
            await write
        except (OSError, sqlite3.Error) as exc:
            log.warning("cannot copy a manifest to the local cache: %s", exc)


class SharedWrite:
    """A download's L1 temp file, and the bucket upload that follows it when this
    replica leads the download."""

    def __init__(self, store: SharedStore, local: DiskWrite, digest: Digest) -> None:
        self._store = store
        self._local = local
        self._digest = digest
        self._size = 0
        self._upload: Upload | None = None

    @property
    def path(self) -> Path:
        return self._local.path

    def wrote(self, size: int) -> None:
        self._size = size
        if self._upload is not None:
            self._upload.wrote(size)

    def publish(self) -> None:
        if self._upload is None and self._store.objects.reachable:
            self._upload = self._store.objects.upload(self._digest, self._local.path)
            self._upload.wrote(self._size)
            self._upload.start()

    async def commit(self, size: int) -> Path:
        if self._upload is not None and await self._upload.complete(size):
            await self._store.committed(self._digest, size)
        return await self._local.commit(size)

    async def abort(self) -> None:
        if self._upload is not None:
            await self._upload.abort()
        await self._local.abort()


class ObjectBlob:
    """A blob in the bucket, open for reading: one ranged GET per body."""

    def __init__(
        self,
        objects: Objects,
        digest: Digest,
        size: int,
        whole: ObjectBody | None = None,
        on_range: Callable[[], None] | None = None,
        on_damage: Callable[[], None] | None = None,
    ) -> None:
        self._on_damage = on_damage
        self._objects = objects
        self._digest = digest
        self.size = size
        self._whole = whole  # the whole object's GET, already answered
        self._on_range = on_range

    async def wait_size(self, first: int | None) -> int:
        return self.size

    def body(self, start: int, end: int | None) -> ObjectBlobBody:
        end = self.size if end is None else end
        whole, self._whole = self._whole, None
        if (start, end) != (0, self.size):
            if whole is not None:
                whole.discard()  # a range: its own GET
                whole = None
            if self._on_range is not None:
                self._on_range()
        return ObjectBlobBody(self._objects, self._digest, start, end, whole)

    def download(self) -> BucketSource:
        return BucketSource(self)

    def forget(self) -> None:
        """Damaged (it failed verification): dropped from the index and the bucket."""
        if self._on_damage is not None:
            self._on_damage()

    async def aclose(self) -> None:
        whole, self._whole = self._whole, None
        if whole is not None:
            await whole.aclose()


class ObjectBlobBody:
    def __init__(
        self, objects: Objects, digest: Digest, start: int, end: int, opened: ObjectBody | None
    ) -> None:
        self._objects = objects
        self._digest = digest
        self._start = start
        self._end = end
        self._opened = opened

    async def __aiter__(self) -> AsyncIterator[bytes]:
        if self._end <= self._start:
            return
        body, self._opened = self._opened, None
        try:
            if body is None:
                body = await self._objects.open_blob(self._digest, self._start, self._end)
        except ObjectStoreError as exc:
            raise AbortResponse(f"bucket read of {self._digest} failed: {exc}") from None
        if body is None:
            raise AbortResponse(f"blob {self._digest} left the bucket (evicted)")
        sent = self._start
        try:
            async for chunk in body:
                sent += len(chunk)
                yield chunk
        except ObjectStoreError as exc:
            raise AbortResponse(f"bucket read of {self._digest} broke: {exc}") from None
        finally:
            await body.aclose()
        if sent != self._end:
            raise AbortResponse(f"bucket object {self._digest} is shorter than its index entry")

    async def aclose(self) -> None:
        opened, self._opened = self._opened, None
        if opened is not None:
            await opened.aclose()


class BucketSource:
    """A blob in the bucket as the source of a local download (its bytes are verified
    by the download before they are final, and kept in L1)."""

    def __init__(self, blob: ObjectBlob) -> None:
        self._blob = blob
        self._body = blob.body(0, None)
        self.size: int | None = blob.size

    async def mismatched(self) -> None:
        self._blob.forget()

    async def __aiter__(self) -> AsyncIterator[bytes]:
        try:
            async for chunk in self._body:
                yield chunk
        except (ObjectStoreError, AbortResponse) as exc:
            raise UpstreamError("UNAVAILABLE", f"bucket read failed: {exc}", status=502) from None

    async def aclose(self) -> None:
        await self._body.aclose()
