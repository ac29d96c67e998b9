"""The cache index on local disk: the one module that imports diskcache.

Tag entries, manifests by digest, blob sizes and access times, in one SQLite-backed
diskcache. Index keys are formatted only here; calls are small SQLite operations
(tens of µs) and run inline even where the store protocol is async.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Collection, Set
from pathlib import Path
from typing import Any, cast

import diskcache

from mirror.metrics import CacheUsage
from mirror.reference import Digest
from mirror.referrers import CACHE_KEY as REFERRERS
from mirror.store import (
    BlobEntry,
    ImageKey,
    PullRecord,
    Scan,
    StoredManifest,
    TagEntry,
    TagKey,
)


def _blob_key(digest: Digest) -> str:
    return f"blob/{digest}"


def _manifest_key(digest: Digest) -> str:
    return f"manifest/{digest}"


def _atime_key(digest: Digest) -> str:
    return f"atime/manifest/{digest}"


def _scope_key(digest: Digest) -> str:
    return f"scope/{digest}"


def _pair(upstream: str, repo: str) -> str:
    return f"{upstream}/{repo}"  # upstream names have no "/"


# Pairs kept per digest: a popular base layer is in thousands of repositories. Past
# this, the least recently recorded go (asked again with a HEAD when next requested).
MAX_SCOPES = 1024


def _image_key(prefix: str, key: ImageKey) -> str:
    # Repository names have no "@"; a reference is a tag or a digest.
    return f"{prefix}/{key.upstream}/{key.repo}@{key.ref}"


def _parse_image_key(prefix: str, key: str) -> ImageKey:
    upstream, _, rest = key[len(prefix) + 1 :].partition("/")
    repo, _, ref = rest.rpartition("@")
    return ImageKey(upstream, repo, ref)


def _prefixed(index: Any, prefix: str) -> list[str]:
    # diskcache has no prefix query: one pass over the keys, no values read.
    return [k for k in index.iterkeys() if isinstance(k, str) and k.startswith(prefix)]


PINS_KEY = "pins"
JOBS_KEY = "jobs"  # one entry for the last hundred jobs' records


def _tag_key(key: TagKey) -> str:
    return f"tag/{key.upstream}/{key.repo}:{key.tag}#{key.accept}"


def _parse_tag_key(key: str) -> TagKey:
    # Upstream names have no "/", tags no ":", Accept keys no "#" (media types).
    upstream, _, rest = key[len("tag/") :].partition("/")
    head, _, accept = rest.rpartition("#")
    repo, _, tag = head.rpartition(":")
    return TagKey(upstream, repo, tag, accept)


class DiskIndex:
    def __init__(self, directory: Path, clock: Callable[[], float]) -> None:
        self._clock = clock
        # eviction_policy "none": diskcache must never drop index rows on its own,
        # or blob files would lose their entries behind our back.
        self._index: Any = diskcache.Cache(str(directory), eviction_policy="none", size_limit=2**62)
        # Running totals for the metrics collector, so a scrape never scans the index.
        # Kept exact by every write below and reset from each full scan (`reconcile`,
        # which also absorbs changes made by another process: `mirror cache prune`).
        self._usage_lock = threading.Lock()
        self._usage = CacheUsage(0, 0, 0, 0)
        # Accesses since the last flush: a hit never writes to SQLite. Touched in the
        # event loop, flushed from a worker thread, hence the lock.
        self._touch_lock = threading.Lock()
        self._touched_blobs: dict[Digest, float] = {}
        self._touched_manifests: dict[Digest, float] = {}
        self._pulled: dict[ImageKey, tuple[Digest, int, float]] = {}

    def close(self) -> None:
        self._index.close()

    # -- manifests and tags -----------------------------------------------------------

    async def get_manifest(self, digest: Digest) -> StoredManifest | None:
        value = self._index.get(_manifest_key(digest))
        if value is None:
            return None
        media_type, body = cast(tuple[str, bytes], value)
        return StoredManifest(digest, media_type, body)

    async def put_manifest(self, manifest: StoredManifest) -> None:
        # Content by digest never changes: add() writes only if it is new.
        if self._index.add(_manifest_key(manifest.digest), (manifest.media_type, manifest.body)):
            self._count(manifests=1)
        self._index.set(_atime_key(manifest.digest), self._clock())

    async def get_tag(self, key: TagKey) -> TagEntry | None:
        value = self._index.get(_tag_key(key))
        if value is None:
            return None
        digest, media_type, stored_at = cast(tuple[str, str, float], value)
        return TagEntry(Digest.parse(digest), media_type, stored_at)

    async def put_tag(self, key: TagKey, entry: TagEntry) -> None:
        index_key = _tag_key(key)
        new = index_key not in self._index
        self._index.set(index_key, (str(entry.digest), entry.media_type, entry.stored_at))
        if new:
            self._count(tags=1)

    # -- scopes: one entry per digest, {"<upstream>/<repo>": recorded at} ---------------

    async def has_scope(self, digest: Digest, upstream: str, repo: str) -> bool:
        pairs = self._index.get(_scope_key(digest))
        return pairs is not None and _pair(upstream, repo) in pairs

    async def add_scopes(self, digests: Collection[Digest], upstream: str, repo: str) -> None:
        pair, now = _pair(upstream, repo), self._clock()
        with self._index.transact():  # read-modify-write: other processes share the index
            for digest in digests:
                key = _scope_key(digest)
                pairs = dict(cast(dict[str, float], self._index.get(key) or {}))
                pairs[pair] = now
                if len(pairs) > MAX_SCOPES:
                    newest = sorted(pairs.items(), key=lambda kv: kv[1])[-MAX_SCOPES:]
                    pairs = dict(newest)
                self._index.set(key, pairs)

    def drop_scopes(self, keep: Set[Digest], before: float) -> int:
        keys = [k for k in self._index.iterkeys() if isinstance(k, str) and k.startswith("scope/")]
        dropped = 0
        with self._index.transact():
            for key in keys:
                digest = Digest.parse(key[len("scope/") :])
                pairs = cast(dict[str, float] | None, self._index.get(key))
                if digest in keep or (pairs and max(pairs.values()) >= before):
                    continue
                dropped += bool(self._index.delete(key))
        return dropped

    # -- blob entries (the files are the store's) --------------------------------------

    async def blob_size(self, digest: Digest) -> int | None:
        return self.indexed_size(digest)

    def indexed_size(self, digest: Digest) -> int | None:
        value = self._index.get(_blob_key(digest))
        return None if value is None else _blob_value(value)[0]

    def _add_blob(self, digest: Digest, size: int, now: float) -> None:
        key = _blob_key(digest)
        old = self._index.get(key)
        self._index.set(key, (size, now, now))
        if old is None:
            self._count(blobs=1, blob_bytes=size)

    def _pop_blobs(self, digests: list[Digest]) -> None:
        dropped = freed = 0
        with self._index.transact():
            for digest in digests:
                value = self._index.pop(_blob_key(digest), None)
                self._index.delete(_scope_key(digest))
                if value is not None:
                    dropped += 1
                    freed += _blob_value(value)[0]
        self._count(blobs=-dropped, blob_bytes=-freed)

    # -- access tracking --------------------------------------------------------------

    def touch_blob(self, digest: Digest) -> None:
        with self._touch_lock:
            self._touched_blobs[digest] = self._clock()

    def touch_manifest(self, digest: Digest) -> None:
        with self._touch_lock:
            self._touched_manifests[digest] = self._clock()

    def record_pull(self, key: ImageKey, digest: Digest) -> None:
        with self._touch_lock:
            _, count, _ = self._pulled.get(key, (digest, 0, 0.0))
            self._pulled[key] = (digest, count + 1, self._clock())

    def flush_access(self) -> None:
        """One transaction for every access since the last flush. A blob keeps its
        access time in its own entry (one key per blob to scan and to delete)."""
        with self._touch_lock:
            blobs, self._touched_blobs = self._touched_blobs, {}
            manifests, self._touched_manifests = self._touched_manifests, {}
            pulled, self._pulled = self._pulled, {}
        with self._index.transact():
            # Read-modify-write in the transaction: other processes add their counts.
            for key, (digest, count, when) in pulled.items():
                index_key = _image_key("pull", key)
                old = self._index.get(index_key)
                total = count + (int(old[1]) if old else 0)
                if old and float(old[2]) > when:  # another process pulled it later
                    digest, when = Digest.parse(old[0]), float(old[2])
                self._index.set(index_key, (str(digest), total, when))
            for digest, when in blobs.items():
                value = self._index.get(_blob_key(digest))
                if value is not None:
                    size, stored_at, atime = _blob_value(value)
                    self._index.set(_blob_key(digest), (size, stored_at, max(atime, when)))
            for digest, when in manifests.items():
                self._index.set(_atime_key(digest), when)

    # -- lifecycle --------------------------------------------------------------------

    def scan(self) -> Scan:
        """Every blob, manifest and tag entry, from one pass over the index keys
        (and the values read in one transaction): a round stays cheap at 100k entries."""
        blob_keys: list[str] = []
        manifests: list[str] = []
        tag_keys: list[str] = []
        for key in self._index.iterkeys():
            if not isinstance(key, str):
                continue
            if key.startswith("blob/"):
                blob_keys.append(key)
            elif key.startswith("manifest/"):
                manifests.append(key[len("manifest/") :])
            elif key.startswith("tag/"):
                tag_keys.append(key)
        with self._index.transact():
            blob_values = [(k, self._index.get(k)) for k in blob_keys]
            tag_values = [(k, self._index.get(k)) for k in tag_keys]
            manifest_atimes = [(d, self._index.get(f"atime/manifest/{d}")) for d in manifests]
        blobs = []
        for key, value in blob_values:
            if value is not None:  # None: removed meanwhile
                size, stored_at, atime = _blob_value(value)
                blobs.append(BlobEntry(Digest.parse(key[5:]), size, stored_at, atime))
        tags = [
            (_parse_tag_key(k), float(cast(tuple[str, str, float], v)[2]))
            for k, v in tag_values
            if v
        ]
        atimes = [(Digest.parse(d), None if t is None else float(t)) for d, t in manifest_atimes]
        return Scan(blobs, atimes, tags)

    def tag_entries(self) -> list[tuple[TagKey, TagEntry]]:
        keys = _prefixed(self._index, "tag/")
        with self._index.transact():
            values = [(k, self._index.get(k)) for k in keys]
        entries = []
        for key, value in values:
            if value:
                digest, media_type, stored_at = cast(tuple[str, str, float], value)
                entries.append(
                    (_parse_tag_key(key), TagEntry(Digest.parse(digest), media_type, stored_at))
                )
        return entries

    def pulls(self) -> list[PullRecord]:
        keys = _prefixed(self._index, "pull/")
        with self._index.transact():
            values = [(k, self._index.get(k)) for k in keys]
        return [
            PullRecord(_parse_image_key("pull", k), Digest.parse(v[0]), int(v[1]), float(v[2]))
            for k, v in values
            if v
        ]

    def drop_pulls(self, keys: list[ImageKey]) -> None:
        with self._index.transact():
            for key in keys:
                self._index.delete(_image_key("pull", key))

    def pins(self) -> dict[ImageKey, float]:
        # One entry for all pins (an operator pins a handful): read before every
        # eviction round, it must not cost a pass over every key.
        pins = cast(dict[str, float], self._index.get(PINS_KEY) or {})
        return {_parse_image_key("pin", k): float(t) for k, t in pins.items()}

    def set_pin(self, key: ImageKey, pinned_at: float | None) -> None:
        with self._index.transact():  # read-modify-write: other processes share the index
            pins = dict(cast(dict[str, float], self._index.get(PINS_KEY) or {}))
            if pinned_at is None:
                pins.pop(_image_key("pin", key), None)
            else:
                pins[_image_key("pin", key)] = pinned_at
            self._index.set(PINS_KEY, pins)

    def put_job(self, job_id: str, record: str) -> None:
        with self._index.transact():  # read-modify-write: other processes share the index
            jobs = dict(cast(dict[str, str], self._index.get(JOBS_KEY) or {}))
            jobs[job_id] = record
            self._index.set(JOBS_KEY, jobs)

    def jobs(self) -> dict[str, str]:
        return dict(cast(dict[str, str], self._index.get(JOBS_KEY) or {}))

    def drop_jobs(self, job_ids: list[str]) -> None:
        with self._index.transact():
            jobs = dict(cast(dict[str, str], self._index.get(JOBS_KEY) or {}))
            for job_id in job_ids:
                jobs.pop(job_id, None)
            self._index.set(JOBS_KEY, jobs)

    def repositories(self) -> list[tuple[str, str]]:
        pairs = set()
        for key in self._index.iterkeys():
            if isinstance(key, str) and key.startswith("tag/"):
                tag = _parse_tag_key(key)
                # A referrers answer is cached for whatever name a client asked about
                # (an empty index for a repository that does not exist): no repository.
                if tag.accept != REFERRERS:
                    pairs.add((tag.upstream, tag.repo))
        return sorted(pairs)

    def reconcile(self, scan: Scan) -> None:
        with self._usage_lock:
            self._usage = CacheUsage(
                len(scan.blobs),
                sum(b.size for b in scan.blobs),
                len(scan.manifests),
                len(scan.tags),
            )

    def usage(self) -> CacheUsage:
        return self._usage

    def _count(
        self, blobs: int = 0, blob_bytes: int = 0, manifests: int = 0, tags: int = 0
    ) -> None:
        with self._usage_lock:
            u = self._usage
            self._usage = CacheUsage(
                u.blobs + blobs,
                u.blob_bytes + blob_bytes,
                u.manifests + manifests,
                u.tags + tags,
            )

    def drop_manifests(self, digests: list[Digest]) -> None:
        dropped = 0
        with self._index.transact():
            for digest in digests:
                dropped += bool(self._index.delete(_manifest_key(digest)))
                self._index.delete(_atime_key(digest))
                self._index.delete(_scope_key(digest))
        self._count(manifests=-dropped)

    def drop_tags(self, keys: list[TagKey]) -> None:
        dropped = 0
        with self._index.transact():
            for key in keys:
                dropped += bool(self._index.delete(_tag_key(key)))
        self._count(tags=-dropped)


def _blob_value(value: Any) -> tuple[int, float, float]:
    """(size, stored_at, atime); older entries lack the later fields."""
    if isinstance(value, int):
        return value, 0.0, 0.0
    fields = cast(tuple[Any, ...], value)
    size, stored_at = int(fields[0]), float(fields[1])
    atime = float(fields[2]) if len(fields) > 2 else stored_at
    return size, stored_at, atime
