"""The shared index in Redis: tags, blob and manifest metadata, access times, leases.

The one module that imports redis. Keys, all under the configured prefix::

    tags        hash  "<upstream>/<repo>:<tag>#<accept>" -> "<digest> <media type> <stored_at>"
    blobs       hash  digest -> "<size> <stored_at>"        (blobs committed to the bucket)
    atime       zset  digest -> last access                 (LRU across replicas)
    manifests   hash  digest -> media type
    matime      zset  digest -> last access
    scope:<d>   zset  "<upstream>/<repo>" -> when recorded  (pairs known to hold d)
    lease:<d>   str   the replica leading the download of d (expires unless renewed)
    lock:<name> str   a lifecycle lock (one replica evicts at a time)
    pullcount   hash  "<upstream>/<repo>@<ref>" -> pulls (HINCRBY from every replica)
    pulllast    hash  "<upstream>/<repo>@<ref>" -> "<when> <digest>" (the last pull)
    pins        hash  "<upstream>/<repo>@<ref>" -> pinned at
    jobs        hash  job id -> its record (JSON)

Request-path calls use the asyncio client; lifecycle rounds run in a worker thread and
use the blocking client. A Redis that cannot be reached costs at most one short
timeout per BACKOFF seconds: calls then raise `IndexUnavailable` at once, and the
shared store falls back to working alone (docs/deploy.md, "When a dependency is down").
"""

from __future__ import annotations

import logging
import ssl
from collections.abc import Awaitable, Callable, Collection, Set
from pathlib import Path
from typing import Any, TypeVar

import redis
import redis.asyncio as aredis
from redis.backoff import ExponentialBackoff
from redis.retry import Retry

from mirror.health import Health
from mirror.metrics import CacheUsage, Metrics
from mirror.reference import Digest
from mirror.referrers import CACHE_KEY as REFERRERS
from mirror.store import BlobEntry, ImageKey, PullRecord, Scan, TagEntry, TagKey

log = logging.getLogger(__name__)

T = TypeVar("T")

# Pairs kept per digest (a popular base layer is in thousands of repositories); past
# this, the least recently recorded go and are asked again with a HEAD when next used.
MAX_SCOPES = 1024
BACKOFF = 2.0  # seconds of failing fast after a failure, then the next call tries
TIMEOUT = 2.0  # per command and per connect: a stopped Redis costs this, once

# Atomic lease operations: the value names the owner; only the owner renews or frees it.
_CLAIM = """
if redis.call('set', KEYS[1], ARGV[1], 'NX', 'PX', ARGV[2]) then return '' end
return redis.call('get', KEYS[1]) or ''
"""
_RENEW = """
if redis.call('get', KEYS[1]) == ARGV[1] then return redis.call('pexpire', KEYS[1], ARGV[2]) end
return 0
"""
_RELEASE = """
if redis.call('get', KEYS[1]) == ARGV[1] then return redis.call('del', KEYS[1]) end
return 0
"""


class IndexUnavailable(Exception):
    """Redis could not be used now (unreachable, or backing off after a failure)."""


def tag_field(key: TagKey) -> str:
    return f"{key.upstream}/{key.repo}:{key.tag}#{key.accept}"


def parse_tag_field(field: str) -> TagKey:
    # Upstream names have no "/", tags no ":", Accept keys no "#" (media types).
    upstream, _, rest = field.partition("/")
    head, _, accept = rest.rpartition("#")
    repo, _, tag = head.rpartition(":")
    return TagKey(upstream, repo, tag, accept)


def image_field(key: ImageKey) -> str:
    # Upstream names have no "/", repository names no "@".
    return f"{key.upstream}/{key.repo}@{key.ref}"


def parse_image_field(field: str) -> ImageKey:
    upstream, _, rest = field.partition("/")
    repo, _, ref = rest.rpartition("@")
    return ImageKey(upstream, repo, ref)


class RedisIndex:
    def __init__(
        self,
        url: str,
        metrics: Metrics,
        *,
        password: str | None = None,
        ca_bundle: Path | None = None,
        prefix: str = "mirror:",
    ) -> None:
        options: dict[str, Any] = {
            "socket_timeout": TIMEOUT,
            "socket_connect_timeout": TIMEOUT,
            # One quick retry for a connection that went stale; then the back-off.
            "retry": Retry(ExponentialBackoff(cap=0.2, base=0.05), 1),
            "decode_responses": True,
        }
        if password is not None:
            options["password"] = password
        if ca_bundle is not None and url.startswith("rediss://"):
            options["ssl_ca_certs"] = str(ca_bundle)
            options["ssl_cert_reqs"] = ssl.CERT_REQUIRED
        self._async = aredis.Redis.from_url(url, **options)
        self._sync = redis.Redis.from_url(url, **options)
        self._p = prefix
        self._metrics = metrics
        self.health = Health(
            "redis",
            metrics,
            backoff=BACKOFF,
            down="redis unavailable (%s); working alone: local single flight, content "
            "found by digest in the local cache and the bucket",
            up="redis reachable again; coordinating with the other replicas",
        )
        self._usage = CacheUsage(0, 0, 0, 0)
        self._claim = self._async.register_script(_CLAIM)
        self._renew = self._async.register_script(_RENEW)
        self._release = self._async.register_script(_RELEASE)

    @property
    def reachable(self) -> bool:
        return self.health.reachable

    async def aclose(self) -> None:
        await self._async.aclose()
        self._sync.close()

    # -- health -----------------------------------------------------------------------

    def _check(self) -> None:
        if self.health.backing_off():
            raise IndexUnavailable("redis unavailable (backing off)")

    def _failed(self, exc: Exception) -> IndexUnavailable:
        self._metrics.redis_errors.inc()
        self.health.failed(_describe(exc))
        return IndexUnavailable(_describe(exc))

    def _ok(self) -> None:
        self.health.ok()

    async def _run(self, call: Callable[[], Awaitable[T]]) -> T:
        self._check()
        try:
            result = await call()
        except (redis.RedisError, OSError) as exc:
            raise self._failed(exc) from None
        self._ok()
        return result

    def _run_sync(self, call: Callable[[], T]) -> T:
        self._check()
        try:
            result = call()
        except (redis.RedisError, OSError) as exc:
            raise self._failed(exc) from None
        self._ok()
        return result

    async def ping(self) -> bool:
        try:
            await self._run(lambda: self._async.ping())
        except IndexUnavailable:
            return False
        return True

    def ping_sync(self) -> bool:
        """For /readyz (a worker thread): is Redis answering now?"""
        try:
            self._run_sync(self._sync.ping)
        except IndexUnavailable:
            return False
        return True

    # -- tags and manifests -----------------------------------------------------------

    async def get_tag(self, key: TagKey) -> TagEntry | None:
        value = await self._run(lambda: self._async.hget(self._p + "tags", tag_field(key)))
        if not value:
            return None
        digest, media_type, stored_at = str(value).split(" ")
        return TagEntry(Digest.parse(digest), media_type, float(stored_at))

    async def put_tag(self, key: TagKey, entry: TagEntry) -> None:
        value = f"{entry.digest} {entry.media_type} {entry.stored_at!r}"
        added = await self._run(lambda: self._async.hset(self._p + "tags", tag_field(key), value))
        if added:  # a new tag: the catalog (mirror.catalog) sees the count change
            u = self._usage
            self._usage = CacheUsage(u.blobs, u.blob_bytes, u.manifests, u.tags + 1)

    async def add_manifest(self, digest: Digest, media_type: str, now: float) -> None:
        async def add() -> None:
            async with self._async.pipeline(transaction=True) as pipe:
                pipe.hset(self._p + "manifests", str(digest), media_type)
                pipe.zadd(self._p + "matime", {str(digest): now}, gt=True)  # GT still adds
                await pipe.execute()

        await self._run(add)

    # -- scopes -----------------------------------------------------------------------

    def _scope(self, digest: Digest) -> str:
        return f"{self._p}scope:{digest}"

    async def has_scope(self, digest: Digest, upstream: str, repo: str) -> bool:
        member = f"{upstream}/{repo}"
        score = await self._run(lambda: self._async.zscore(self._scope(digest), member))
        return score is not None

    async def add_scopes(
        self, digests: Collection[Digest], upstream: str, repo: str, now: float
    ) -> None:
        member = f"{upstream}/{repo}"

        async def add() -> None:
            async with self._async.pipeline(transaction=False) as pipe:
                for digest in digests:
                    pipe.zadd(self._scope(digest), {member: now})
                    pipe.zremrangebyrank(self._scope(digest), 0, -MAX_SCOPES - 1)
                await pipe.execute()

        if digests:
            await self._run(add)

    def drop_scopes(self, keep: Set[Digest], before: float) -> int:
        """Worker thread: SCAN the scope keys, drop those of digests not in `keep`
        whose newest pair was recorded before `before`."""
        prefix = self._p + "scope:"

        def drop() -> int:
            keys = [
                str(k) for k in self._sync.scan_iter(match=_glob_escape(prefix) + "*", count=1000)
            ]
            candidates = [k for k in keys if Digest.parse(k[len(prefix) :]) not in keep]
            if not candidates:
                return 0
            pipe = self._sync.pipeline(transaction=False)
            for key in candidates:
                pipe.zrange(key, -1, -1, withscores=True)
            newest = pipe.execute()
            pairs = zip(candidates, newest, strict=True)
            old = [k for k, top in pairs if not top or top[0][1] < before]
            return int(self._sync.delete(*old)) if old else 0

        return self._run_sync(drop)

    # -- blobs ------------------------------------------------------------------------

    async def blob_size(self, digest: Digest) -> int | None:
        value = await self._run(lambda: self._async.hget(self._p + "blobs", str(digest)))
        return None if not value else int(str(value).split(" ")[0])

    async def add_blob(self, digest: Digest, size: int, now: float) -> None:
        async def add() -> None:
            async with self._async.pipeline(transaction=True) as pipe:
                pipe.hset(self._p + "blobs", str(digest), f"{size} {now!r}")
                pipe.zadd(self._p + "atime", {str(digest): now}, gt=True)  # GT still adds
                await pipe.execute()

        await self._run(add)
        u = self._usage
        self._usage = CacheUsage(u.blobs + 1, u.blob_bytes + size, u.manifests, u.tags)

    def add_blobs(self, entries: list[tuple[Digest, int, float]]) -> None:
        """Index blobs found in the bucket: (digest, size, stored_at), worker thread."""

        def add() -> None:
            pipe = self._sync.pipeline(transaction=False)
            for digest, size, stored_at in entries:
                pipe.hsetnx(self._p + "blobs", str(digest), f"{size} {stored_at!r}")
                pipe.zadd(self._p + "atime", {str(digest): stored_at}, nx=True)
            pipe.execute()

        self._run_sync(add)

    def touch(self, blobs: dict[Digest, float], manifests: dict[Digest, float]) -> None:
        """Record access times (a lifecycle round, from a worker thread). GT: a replica
        flushing late never moves another replica's newer access back."""
        if not blobs and not manifests:
            return

        def write() -> None:
            pipe = self._sync.pipeline(transaction=False)
            if blobs:
                pipe.zadd(
                    self._p + "atime", {str(d): t for d, t in blobs.items()}, xx=True, gt=True
                )
            if manifests:
                pipe.zadd(
                    self._p + "matime", {str(d): t for d, t in manifests.items()}, xx=True, gt=True
                )
            pipe.execute()

        self._run_sync(write)

    def add_pulls(self, pulled: dict[ImageKey, tuple[Digest, int, float]]) -> None:
        """Pull counts add up (HINCRBY) across replicas; the last pull is the latest
        one written (replicas flush within a round of each other)."""
        if not pulled:
            return

        def write() -> None:
            pipe = self._sync.pipeline(transaction=False)
            for key, (digest, count, when) in pulled.items():
                pipe.hincrby(self._p + "pullcount", image_field(key), count)
                pipe.hset(self._p + "pulllast", image_field(key), f"{when!r} {digest}")
            pipe.execute()

        self._run_sync(write)

    def pulls(self) -> list[PullRecord]:
        def read() -> tuple[Any, Any]:
            pipe = self._sync.pipeline(transaction=True)
            pipe.hgetall(self._p + "pullcount")
            pipe.hgetall(self._p + "pulllast")
            return tuple(pipe.execute())

        counts, lasts = self._run_sync(read)
        records = []
        for field, last in lasts.items():
            when, digest = str(last).split(" ")
            key = parse_image_field(field)
            records.append(
                PullRecord(key, Digest.parse(digest), int(counts.get(field, 0)), float(when))
            )
        return records

    def drop_pulls(self, keys: list[ImageKey]) -> None:
        if keys:
            fields = [image_field(k) for k in keys]

            def drop() -> None:
                pipe = self._sync.pipeline(transaction=True)
                pipe.hdel(self._p + "pullcount", *fields)
                pipe.hdel(self._p + "pulllast", *fields)
                pipe.execute()

            self._run_sync(drop)

    def pins(self) -> dict[ImageKey, float]:
        raw = self._run_sync(lambda: self._sync.hgetall(self._p + "pins"))
        return {parse_image_field(str(f)): float(v) for f, v in raw.items()}

    def set_pin(self, key: ImageKey, pinned_at: float | None) -> None:
        if pinned_at is None:
            self._run_sync(lambda: self._sync.hdel(self._p + "pins", image_field(key)))
        else:
            self._run_sync(
                lambda: self._sync.hset(self._p + "pins", image_field(key), repr(pinned_at))
            )

    def put_job(self, job_id: str, record: str) -> None:
        self._run_sync(lambda: self._sync.hset(self._p + "jobs", job_id, record))

    def jobs(self) -> dict[str, str]:
        raw = self._run_sync(lambda: self._sync.hgetall(self._p + "jobs"))
        return {str(k): str(v) for k, v in raw.items()}

    def drop_jobs(self, job_ids: list[str]) -> None:
        if job_ids:
            self._run_sync(lambda: self._sync.hdel(self._p + "jobs", *job_ids))

    def tag_entries(self) -> list[tuple[TagKey, TagEntry]]:
        raw = self._run_sync(lambda: self._sync.hgetall(self._p + "tags"))
        entries = []
        for field, value in raw.items():
            digest, media_type, stored_at = str(value).split(" ")
            entries.append(
                (
                    parse_tag_field(str(field)),
                    TagEntry(Digest.parse(digest), media_type, float(stored_at)),
                )
            )
        return entries

    # -- leases -----------------------------------------------------------------------

    async def claim(self, name: str, owner: str, ttl: float) -> str | None:
        """Take the lease `name` for `ttl` seconds: None if taken, else its holder."""
        holder = await self._run(
            lambda: self._claim(keys=[self._p + name], args=[owner, int(ttl * 1000)])
        )
        return None if holder == "" else str(holder)

    async def renew(self, name: str, owner: str, ttl: float) -> bool:
        renewed = await self._run(
            lambda: self._renew(keys=[self._p + name], args=[owner, int(ttl * 1000)])
        )
        return bool(renewed)

    async def release(self, name: str, owner: str) -> None:
        await self._run(lambda: self._release(keys=[self._p + name], args=[owner]))

    def try_lock(self, name: str, owner: str, ttl: float) -> bool:
        """A lifecycle lock (from a worker thread): held by one replica until it expires."""
        got = self._run_sync(
            lambda: self._sync.set(self._p + "lock:" + name, owner, nx=True, px=int(ttl * 1000))
        )
        return bool(got)

    # -- lifecycle (worker thread) ----------------------------------------------------

    def scan(self) -> Scan:
        def read() -> tuple[Any, ...]:
            pipe = self._sync.pipeline(transaction=True)
            pipe.hgetall(self._p + "blobs")
            pipe.zrange(self._p + "atime", 0, -1, withscores=True)
            pipe.hgetall(self._p + "manifests")
            pipe.zrange(self._p + "matime", 0, -1, withscores=True)
            pipe.hgetall(self._p + "tags")
            return tuple(pipe.execute())

        blobs_raw, atimes_raw, manifests_raw, matimes_raw, tags_raw = self._run_sync(read)
        atimes = dict(atimes_raw)
        blobs = []
        for digest, value in blobs_raw.items():
            size, stored_at = value.split(" ")
            stored = float(stored_at)
            blobs.append(
                BlobEntry(
                    Digest.parse(digest), int(size), stored, float(atimes.get(digest, stored))
                )
            )
        matimes = dict(matimes_raw)
        manifests = [
            (Digest.parse(d), None if d not in matimes else float(matimes[d]))
            for d in manifests_raw
        ]
        tags = [
            (parse_tag_field(field), float(value.split(" ")[2]))
            for field, value in tags_raw.items()
        ]
        return Scan(blobs, manifests, tags)

    def repositories(self) -> list[tuple[str, str]]:
        # HSCAN rather than HKEYS: Redis answers other replicas between the batches
        # instead of blocking on one hash of every tag.
        def read() -> set[tuple[str, str]]:
            pairs = set()
            for field, _ in self._sync.hscan_iter(self._p + "tags", count=1000):
                tag = parse_tag_field(field)
                if tag.accept != REFERRERS:  # as DiskIndex.repositories
                    pairs.add((tag.upstream, tag.repo))
            return pairs

        return sorted(self._run_sync(read))

    def drop_blobs(self, digests: list[Digest]) -> None:
        if digests:
            names = [str(d) for d in digests]

            def drop() -> None:
                pipe = self._sync.pipeline(transaction=True)
                pipe.hdel(self._p + "blobs", *names)
                pipe.zrem(self._p + "atime", *names)
                pipe.delete(*(self._scope(d) for d in digests))
                pipe.execute()

            self._run_sync(drop)

    def drop_manifests(self, digests: list[Digest]) -> None:
        if digests:
            names = [str(d) for d in digests]

            def drop() -> None:
                pipe = self._sync.pipeline(transaction=True)
                pipe.hdel(self._p + "manifests", *names)
                pipe.zrem(self._p + "matime", *names)
                pipe.delete(*(self._scope(d) for d in digests))
                pipe.execute()

            self._run_sync(drop)

    def drop_tags(self, keys: list[TagKey]) -> None:
        if keys:
            self._run_sync(lambda: self._sync.hdel(self._p + "tags", *map(tag_field, keys)))

    def usage(self) -> CacheUsage:
        return self._usage

    def reconcile(self, scan: Scan) -> None:
        self._usage = CacheUsage(
            len(scan.blobs), sum(b.size for b in scan.blobs), len(scan.manifests), len(scan.tags)
        )


def _glob_escape(text: str) -> str:
    """A literal for a SCAN MATCH pattern (a prefix may hold glob characters)."""
    return "".join("\\" + c if c in "*?[]\\" else c for c in text)


def _describe(exc: BaseException) -> str:
    """One line, without the URL (it may carry the password)."""
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return text[:200]
