"""The on-disk cache: the one module that imports diskcache.

Layout under the cache directory::

    index/                      diskcache: tag entries, manifests by digest, blob sizes
    blobs/<alg>/<hex[:2]>/<hex> one file per blob digest, shared by every repository
    tmp/                        downloads in progress; renamed into blobs/ once verified

Blobs live outside diskcache so that committing a multi-GB download is a rename,
never a second copy. Index calls are small SQLite operations (tens of µs) and run
inline; anything that can take long (fsync, hashing) runs in worker threads elsewhere.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import logging
import os
import shutil
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import diskcache

from mirror.metrics import CacheUsage
from mirror.reference import Digest

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class StoredManifest:
    digest: str
    media_type: str
    body: bytes


@dataclass(frozen=True, slots=True)
class TagEntry:
    digest: str
    media_type: str
    stored_at: float  # wall-clock seconds, from the injected clock


@dataclass(frozen=True, slots=True)
class BlobEntry:
    digest: Digest
    size: int
    stored_at: float
    atime: float  # last access, as last recorded by the evictor


@dataclass(frozen=True, slots=True)
class Recovery:
    """What start-up recovery found and removed after an unclean stop."""

    blobs: int
    temp_removed: int
    orphan_files_removed: int
    entries_dropped: int
    seconds: float


@dataclass(frozen=True, slots=True)
class Scan:
    blobs: list[BlobEntry]
    manifests: list[tuple[str, float | None]]  # (digest, last access; None: never)
    tags: list[tuple[str, float]]  # (index key, stored_at)


@dataclass(frozen=True, slots=True)
class Stats:
    blobs: int
    blob_bytes: int
    manifests: int
    tags: int
    oldest: float | None  # stored_at of the oldest / newest blob
    newest: float | None


class Storage:
    def __init__(self, root: Path, clock: Callable[[], float] = time.time) -> None:
        self.root = root
        self.blob_dir = root / "blobs"
        self.tmp_dir = root / "tmp"
        self._clock = clock
        for d in (self.blob_dir, self.tmp_dir):
            d.mkdir(parents=True, exist_ok=True)
        # eviction_policy "none": diskcache must never drop index rows on its own,
        # or blob files would lose their entries behind our back.
        self._index: Any = diskcache.Cache(
            str(root / "index"), eviction_policy="none", size_limit=2**62
        )
        # Running totals for the metrics collector, so a scrape never scans the index.
        # Kept exact by every write below and reset by each full scan (which also
        # absorbs changes made by another process, such as `mirror cache prune`).
        self._usage_lock = threading.Lock()
        self._usage = CacheUsage(0, 0, 0, 0)

    def close(self) -> None:
        self._index.close()

    # -- recovery ---------------------------------------------------------------------

    def recover(self) -> Recovery:
        """Make the cache consistent after a crash or `kill -9` at any moment.

        - `tmp/` holds downloads that never verified: all removed.
        - A blob file without an index entry was renamed into place but never recorded
          (killed mid-commit): removed rather than trusted.
        - An index entry without its file (removed by hand, lost): dropped.
        Committed files were fsynced before their rename, so what remains is verified.
        """
        started = time.perf_counter()
        temp_removed = 0
        for entry in self.tmp_dir.iterdir():
            with contextlib.suppress(FileNotFoundError):
                if entry.is_dir():
                    shutil.rmtree(entry)
                else:
                    entry.unlink()
                temp_removed += 1
        indexed = {str(b.digest): b for b in self.iter_blobs()}
        on_disk = set()
        orphans = 0
        for algorithm_dir in _subdirs(self.blob_dir):
            for prefix_dir in _subdirs(Path(algorithm_dir.path)):
                for file in os.scandir(prefix_dir.path):
                    digest = f"{algorithm_dir.name}:{file.name}"
                    if digest in indexed:
                        on_disk.add(digest)
                        continue
                    with contextlib.suppress(FileNotFoundError):
                        os.unlink(file.path)
                    orphans += 1
        # Through drop_blobs: one transaction, and the usage totals follow.
        missing = [indexed[d].digest for d in indexed.keys() - on_disk]
        self.drop_blobs(missing)
        return Recovery(
            len(on_disk), temp_removed, orphans, len(missing), time.perf_counter() - started
        )

    def scan(self) -> Scan:
        """Every blob, manifest and tag entry, from one pass over the index keys.

        Recovery, stats and each eviction round need all three; walking the keys once
        (and reading the values in one transaction) keeps a round cheap at 100k entries.
        """
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
        tags = [(k, float(cast(tuple[str, str, float], v)[2])) for k, v in tag_values if v]
        with self._usage_lock:
            self._usage = CacheUsage(
                len(blobs), sum(b.size for b in blobs), len(manifests), len(tags)
            )
        atimes = [(d, None if t is None else float(t)) for d, t in manifest_atimes]
        return Scan(blobs, atimes, tags)

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

    def iter_blobs(self) -> Iterator[BlobEntry]:
        return iter(self.scan().blobs)

    def stats(self) -> Stats:
        scan = self.scan()
        times = [b.stored_at for b in scan.blobs]
        return Stats(
            len(scan.blobs),
            sum(b.size for b in scan.blobs),
            len(scan.manifests),
            len(scan.tags),
            min(times, default=None),
            max(times, default=None),
        )

    def verify_blob(self, entry: BlobEntry) -> bool:
        """Re-hash one blob file; drop it (file and entry) unless it matches."""
        digest = entry.digest
        h = hashlib.new(digest.algorithm)
        size = 0
        try:
            with open(self.blob_path(digest), "rb") as f:
                while chunk := f.read(1 << 20):
                    h.update(chunk)
                    size += len(chunk)
        except FileNotFoundError:
            self.drop_blob(digest)
            return False
        if h.hexdigest() == digest.hex and size == entry.size:
            return True
        log.error("cached blob %s failed verification; removed", digest)
        self.drop_blob(digest)
        return False

    def drop_blob(self, digest: Digest) -> None:
        self.drop_blobs([digest])

    # -- access times (for eviction) --------------------------------------------------

    def record_access(self, times: dict[str, float]) -> None:
        """Store last-access times, keyed "blob/<digest>" or "manifest/<digest>".

        Batched by the evictor, so a cache hit never writes to the index. A blob keeps
        its access time in its own entry (one key per blob to scan and to delete).
        """
        with self._index.transact():
            for key, when in times.items():
                if key.startswith("blob/"):
                    value = self._index.get(key)
                    if value is not None:
                        size, stored_at, atime = _blob_value(value)
                        self._index.set(key, (size, stored_at, max(atime, when)))
                else:
                    self._index.set(f"atime/{key}", when)

    def drop_blobs(self, digests: list[Digest]) -> None:
        """Index rows in one transaction, then the files. Open readers keep reading
        (POSIX unlink semantics)."""
        dropped = freed = 0
        with self._index.transact():
            for digest in digests:
                value = self._index.pop(f"blob/{digest}", None)
                if value is not None:
                    dropped += 1
                    freed += _blob_value(value)[0]
        self._count(blobs=-dropped, blob_bytes=-freed)
        for digest in digests:
            with contextlib.suppress(FileNotFoundError):
                self.blob_path(digest).unlink()

    def drop_manifests(self, digests: list[str]) -> None:
        dropped = 0
        with self._index.transact():
            for digest in digests:
                dropped += bool(self._index.delete(f"manifest/{digest}"))
                self._index.delete(f"atime/manifest/{digest}")
        self._count(manifests=-dropped)

    def drop_key(self, key: str) -> None:
        if self._index.delete(key) and key.startswith("tag/"):
            self._count(tags=-1)

    # -- manifests --------------------------------------------------------------------

    def get_manifest(self, digest: Digest) -> StoredManifest | None:
        value = self._index.get(f"manifest/{digest}")
        if value is None:
            return None
        media_type, body = cast(tuple[str, bytes], value)
        return StoredManifest(str(digest), media_type, body)

    def put_manifest(self, manifest: StoredManifest) -> None:
        # Content by digest never changes: add() writes only if it is new.
        if self._index.add(f"manifest/{manifest.digest}", (manifest.media_type, manifest.body)):
            self._count(manifests=1)
        self._index.set(f"atime/manifest/{manifest.digest}", self._clock())

    # -- tags -------------------------------------------------------------------------

    @staticmethod
    def _tag_key(upstream: str, repo: str, tag: str, accept_key: str) -> str:
        return f"tag/{upstream}/{repo}:{tag}#{accept_key}"

    def get_tag(self, upstream: str, repo: str, tag: str, accept_key: str) -> TagEntry | None:
        value = self._index.get(self._tag_key(upstream, repo, tag, accept_key))
        if value is None:
            return None
        digest, media_type, stored_at = cast(tuple[str, str, float], value)
        return TagEntry(digest, media_type, stored_at)

    def put_tag(self, upstream: str, repo: str, tag: str, accept_key: str, entry: TagEntry) -> None:
        key = self._tag_key(upstream, repo, tag, accept_key)
        new = key not in self._index
        self._index.set(key, (entry.digest, entry.media_type, entry.stored_at))
        if new:
            self._count(tags=1)

    # -- blobs ------------------------------------------------------------------------

    def blob_path(self, digest: Digest) -> Path:
        # Digest.parse admitted only [0-9a-f] of a fixed length: no path tricks possible.
        return self.blob_dir / digest.algorithm / digest.hex[:2] / digest.hex

    def blob_size(self, digest: Digest) -> int | None:
        value = self._index.get(f"blob/{digest}")
        return None if value is None else _blob_value(value)[0]

    def open_blob(self, digest: Digest) -> tuple[int, int] | None:
        """Open a cached blob: (fd, size), or None on a miss. The caller closes fd."""
        size = self.blob_size(digest)
        if size is None:
            return None
        try:
            fd = os.open(self.blob_path(digest), os.O_RDONLY)
        except FileNotFoundError:
            # The index outlived its file (removed by hand, or a crash): a miss.
            log.warning("cache index had %s but its file is gone; dropping the entry", digest)
            self.drop_blob(digest)
            return None
        return fd, size

    def probe(self) -> tuple[bool, str]:
        """Can the cache take a write now (for /readyz)? (usable, what was found).

        A full disk is not unusable: hits still serve and misses stream uncached, so
        taking the mirror out of service would only send every node upstream. A cache
        that cannot be written at all (read-only, gone, wrong owner) is unusable.
        """
        path = self.tmp_dir / f".probe-{uuid.uuid4().hex}"
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            try:
                os.write(fd, b"\0")
            finally:
                os.close(fd)
                path.unlink(missing_ok=True)
        except OSError as exc:
            if exc.errno in (errno.ENOSPC, errno.EDQUOT):
                return True, "full: serving cached content, new content uncached"
            return False, f"not writable: {exc.strerror or exc}"
        return True, "ok"

    def temp_path(self) -> Path:
        return self.tmp_dir / uuid.uuid4().hex

    def commit_blob(self, digest: Digest, temp: Path, size: int) -> Path:
        """Adopt a verified temp file: a rename, atomic on one file system."""
        final = self.blob_path(digest)
        final.parent.mkdir(parents=True, exist_ok=True)
        os.replace(temp, final)
        now = self._clock()
        key = f"blob/{digest}"
        try:
            old = self._index.get(key)
            self._index.set(key, (size, now, now))
        except BaseException:
            # An unindexed file would hold its space, unseen, until the next recovery.
            final.unlink(missing_ok=True)
            raise
        if old is None:
            self._count(blobs=1, blob_bytes=size)
        return final


def _blob_value(value: Any) -> tuple[int, float, float]:
    """(size, stored_at, atime); older entries lack the later fields."""
    if isinstance(value, int):
        return value, 0.0, 0.0
    fields = cast(tuple[Any, ...], value)
    size, stored_at = int(fields[0]), float(fields[1])
    atime = float(fields[2]) if len(fields) > 2 else stored_at
    return size, stored_at, atime


def _subdirs(path: Path) -> list[os.DirEntry[str]]:
    return [e for e in os.scandir(path) if e.is_dir(follow_symlinks=False)]
