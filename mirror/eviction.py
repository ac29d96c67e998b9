"""Eviction: content unused for `content_ttl` goes, and the cache stays under `max_size`.

The store keeps access times in memory (`touch_blob`, on every hit) and writes them in
one batch at the start of each round, so serving a hit never writes to the index. A
round runs in a worker thread every `interval` seconds (and on demand:
`mirror cache prune`):

1. blobs and manifests not accessed for `content_ttl` are removed ("ttl");
2. tag entries older than their usefulness (`max_stale`) are removed ("ttl");
3. while blob bytes exceed `max_size`, the least recently used blob goes ("size").

Pinned images (mirror.inventory) are never evicted: what they reach is left out of
every step, and their tags never expire. What they protect is recomputed before
each round (pins may change in another process; a pinned tag may move).

Removing a blob someone is reading is safe (POSIX unlink keeps open files readable);
downloads in flight are not in the index yet, so they are never evicted.

Processes sharing a cache directory run rounds one at a time: a round needs the
directory's `locks/evict.lock` (`mirror.locks`), and a process that finds it held
skips the round's work, only flushing its own access times and re-reading the
totals. `mirror cache prune` waits for it instead.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from mirror.events import Events
from mirror.inventory import Protected
from mirror.locks import FileLock
from mirror.metrics import EvictionReason, Kind, Metrics
from mirror.store import Store

log = logging.getLogger(__name__)

# A download in progress writes its temp file all the time, and a stalled one is cut
# by its watchdog long before this: an hour-old temp file has no owner.
TEMP_MAX_AGE = 3600.0
# With replicas, the evicting replica lists the bucket this often for objects that
# the index lost (committed while Redis was down, or Redis restarted empty).
RECONCILE_EVERY = 600.0


@dataclass(frozen=True, slots=True)
class Round:
    ttl_blobs: int
    ttl_manifests: int
    ttl_tags: int
    size_blobs: int
    bytes_freed: int
    blob_bytes: int  # after the round
    seconds: float


class Rounds:
    """Lifecycle rounds in a worker thread, every `interval` seconds or on demand."""

    # Run in the event loop before each round (what pins protect is read there).
    prepare: Callable[[], Awaitable[object]] | None = None

    async def run_forever(self, interval: float) -> None:
        while True:
            await asyncio.sleep(interval)
            try:
                await self.run_once()
            except Exception:
                log.exception("eviction round failed; retrying next interval")

    async def run_once(self) -> Round:
        if self.prepare is not None:
            await self.prepare()
        return await asyncio.to_thread(self.evict)

    def evict(self) -> Round:
        raise NotImplementedError


class Evictor(Rounds):
    def __init__(
        self,
        store: Store,
        metrics: Metrics | None,
        *,
        content_ttl: float,
        max_size: int | None,
        max_stale: float,
        clock: Callable[[], float] = time.time,
        lock: FileLock | None = None,
        wait: bool = False,
        events: Events | None = None,
        protected: Callable[[], Protected] = Protected,
    ) -> None:
        self._events = events or Events()
        self._protected = protected
        self._lock = lock
        self._wait = wait
        self._store = store
        self._metrics = metrics
        self._content_ttl = content_ttl
        self._max_size = max_size
        self._tag_lifetime = max_stale
        self._clock = clock

    def evict(self) -> Round:
        if self._lock is None:
            return self._evict()
        with self._lock.exclusive(wait=self._wait) as mine:
            if mine:
                self._rounds("ran")
                return self._evict()
        self._rounds("skipped")
        log.debug("eviction round skipped: another process sharing the cache runs one")
        started = time.perf_counter()
        # The access times are this process's own, and the totals may have changed.
        self._store.flush_access()
        self._store.reconcile(self._store.scan())
        cached = self._store.usage().blob_bytes
        return Round(0, 0, 0, 0, 0, cached, time.perf_counter() - started)

    def _rounds(self, result: str) -> None:
        if self._metrics is not None:
            self._metrics.eviction_rounds.labels(result).inc()

    def _evict(self) -> Round:
        started = time.perf_counter()
        store = self._store
        store.flush_access()
        store.sweep_temp(TEMP_MAX_AGE)
        now = self._clock()
        ttl_blobs = ttl_manifests = ttl_tags = size_blobs = freed = 0
        pinned = self._protected()

        scan = store.scan()
        # The running totals restart from what is there (another process may have
        # changed the cache); the drops below keep them exact.
        store.reconcile(scan)
        blobs = []
        expired = []
        for entry in scan.blobs:
            atime = entry.atime
            if entry.digest in pinned.digests:
                continue  # neither expired nor a candidate for the size cap
            if now - atime > self._content_ttl:
                expired.append(entry)
            else:
                blobs.append((atime, entry))
        store.drop_blobs([e.digest for e in expired])
        self._events.evicted("blob", ((e.digest, e.size) for e in expired), "ttl")
        for entry in expired:
            ttl_blobs += 1
            freed += entry.size
            self._count("blob", "ttl", entry.size)
        # Atimes came with the scan (one transaction, not a read per manifest).
        stale = [
            d
            for d, atime in scan.manifests
            if now - (atime or now) > self._content_ttl and d not in pinned.digests
        ]
        store.drop_manifests(stale)
        self._events.evicted("manifest", ((d, None) for d in stale), "ttl")
        ttl_manifests = len(stale)
        for _ in stale:
            self._count("manifest", "ttl", 0)
        # Scopes of what is no longer cached went with it; those of digests a manifest
        # named but nobody pulled go once they are as old as unused content.
        cached = {e.digest for e in scan.blobs} | {d for d, _ in scan.manifests}
        store.drop_scopes(cached, now - self._content_ttl)
        old_tags = [
            key
            for key, stored_at in scan.tags
            if now - stored_at > self._tag_lifetime
            and (key.upstream, key.repo, key.tag) not in pinned.tags
        ]
        store.drop_tags(old_tags)
        ttl_tags = len(old_tags)

        # Pinned bytes count against max_size but are never the ones to go.
        total = sum(e.size for _, e in blobs) + sum(
            e.size for e in scan.blobs if e.digest in pinned.digests
        )
        if self._max_size is not None and total > self._max_size:
            blobs.sort(key=lambda pair: pair[0])  # least recently used first
            victims = []
            for _, entry in blobs:
                if total <= self._max_size:
                    break
                victims.append(entry)
                total -= entry.size
                freed += entry.size
                size_blobs += 1
                self._count("blob", "size", entry.size)
            store.drop_blobs([e.digest for e in victims])
            self._events.evicted("blob", ((e.digest, e.size) for e in victims), "size")
        result = Round(
            ttl_blobs,
            ttl_manifests,
            ttl_tags,
            size_blobs,
            freed,
            total,
            time.perf_counter() - started,
        )
        if freed or ttl_manifests or ttl_tags:
            log.info(
                "evicted %d blobs (%d by ttl, %d by size), %d manifests, %d tags: "
                "%d bytes freed, %d bytes cached, %.2f s",
                ttl_blobs + size_blobs,
                ttl_blobs,
                size_blobs,
                ttl_manifests,
                ttl_tags,
                freed,
                total,
                result.seconds,
            )
        return result

    def _count(self, kind: Kind, reason: EvictionReason, size: int) -> None:
        if self._metrics is not None:
            self._metrics.evictions.labels(kind, reason).inc()
            self._metrics.evicted_bytes.labels(reason).inc(size)


class SharedRounds(Rounds):
    """Lifecycle rounds with replicas (store: s3). Every replica, every round:

    - flushes its access times to Redis (LRU is cluster-wide) and evicts its own L1;
    - evicts the shared content if it holds the round's lock in Redis, so one replica
      at a time does (the lock expires on its own: a dead replica never keeps it);
    - else reads the shared totals for its metrics.

    A dependency that is down skips the shared part with one log line.
    """

    def __init__(
        self,
        shared: Evictor,
        l1: Evictor,
        store: Store,
        try_lock: Callable[[float], bool],
        unavailable: tuple[type[Exception], ...],
        reconcile_bucket: Callable[[], int] | None = None,
    ) -> None:
        self._reconcile_bucket = reconcile_bucket
        self._reconciled = 0.0  # monotonic time of the last bucket listing
        self._shared = shared
        self._l1 = l1
        self._store = store
        self._try_lock = try_lock
        self._unavailable = unavailable
        self._interval = 60.0

    async def run_forever(self, interval: float) -> None:
        self._interval = interval  # the lock lasts about one round
        await super().run_forever(interval)

    def evict(self) -> Round:
        """The shared round if this replica ran it, else the L1 round."""
        local = self._l1.evict()
        try:
            if self._try_lock(max(self._interval * 0.9, 1.0)):
                now = time.monotonic()
                if self._reconcile_bucket is not None and now - self._reconciled > RECONCILE_EVERY:
                    # Listing the bucket is costly: every RECONCILE_EVERY seconds at most.
                    self._reconcile_bucket()
                    self._reconciled = now
                return self._shared.evict()
            self._store.flush_access()
            self._store.reconcile(self._store.scan())
        except self._unavailable as exc:
            log.warning("shared eviction skipped this round: %s", exc)
        return local
