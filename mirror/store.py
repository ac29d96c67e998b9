"""What the proxy needs from a cache: the `Store` protocol and the values it holds.

The local disk (`mirror.diskstore`) is the embedded default; a shared store for
replicas (object storage for bytes, a key-value index for tags and metadata)
implements the same protocol. Calls a network store would block on are `async`;
lifecycle work that runs in a worker thread (scan, drop, recover) is not.

Keys are the store's business: callers name digests, tags and upstreams, never key
strings, so each implementation lays out its own keys.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Collection, Set
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from mirror.filespan import READ_CHUNK as READ_CHUNK  # where the body readers find it
from mirror.filespan import FileSpan
from mirror.metrics import CacheUsage
from mirror.reference import Digest


@dataclass(frozen=True, slots=True)
class StoredManifest:
    digest: Digest
    media_type: str
    body: bytes


@dataclass(frozen=True, slots=True)
class TagKey:
    """A tag's answer is cached per upstream and per negotiated Accept set: the same
    name on two registries never mixes, and a schema2-only client never gets an index."""

    upstream: str
    repo: str
    tag: str
    accept: str  # AcceptSet.cache_key


@dataclass(frozen=True, slots=True)
class TagEntry:
    digest: Digest
    media_type: str
    stored_at: float  # wall-clock seconds, from the injected clock


@dataclass(frozen=True, slots=True)
class ImageKey:
    """An image as clients name it on one upstream: by a tag, or by a digest (a pull
    by digest, or a pin of one). What pull records and pins are kept by."""

    upstream: str
    repo: str
    ref: str  # a tag, or "sha256:<hex>"

    def __str__(self) -> str:
        sep = "@" if ":" in self.ref else ":"
        return f"{self.upstream}/{self.repo}{sep}{self.ref}"


@dataclass(frozen=True, slots=True)
class PullRecord:
    key: ImageKey
    digest: Digest  # what the last pull got
    count: int
    last: float  # wall-clock seconds of the last pull


@dataclass(frozen=True, slots=True)
class BlobEntry:
    digest: Digest
    size: int
    stored_at: float
    atime: float  # last access, as last recorded


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
    """Everything a lifecycle round looks at, read in one pass."""

    blobs: list[BlobEntry]
    manifests: list[tuple[Digest, float | None]]  # (digest, last access; None: never)
    tags: list[tuple[TagKey, float]]  # (tag, stored_at)


@dataclass(frozen=True, slots=True)
class Stats:
    blobs: int
    blob_bytes: int
    manifests: int
    tags: int
    oldest: float | None  # stored_at of the oldest / newest blob
    newest: float | None

    @classmethod
    def of(cls, scan: Scan) -> Stats:
        times = [b.stored_at for b in scan.blobs]
        return cls(
            len(scan.blobs),
            sum(b.size for b in scan.blobs),
            len(scan.manifests),
            len(scan.tags),
            min(times, default=None),
            max(times, default=None),
        )


# What a body yields: bytes in memory, or a span of an open file (sent with sendfile).
Chunk = bytes | FileSpan


class Body(Protocol):
    """A blob body being streamed: chunks, then `aclose()` releases what it holds
    (a file descriptor, a reader's place in a download) whether or not it finished."""

    def __aiter__(self) -> AsyncIterator[Chunk]: ...

    async def aclose(self) -> None: ...


class BlobSource(Protocol):
    """Where a download's bytes come from, once it has answered with headers: the
    upstream (`RemoteBlob`), the replica leading that download, or the bucket."""

    @property
    def size(self) -> int | None: ...

    def __aiter__(self) -> AsyncIterator[bytes]: ...

    async def mismatched(self) -> None:
        """The bytes failed verification: a source that keeps them (the bucket)
        forgets them, so the next request fetches the blob anew."""
        ...

    async def aclose(self) -> None: ...


class OpenBlob(Protocol):
    """A blob opened for reading, cached or still downloading: its size (None while a
    chunked download runs) and one body for a byte range. `aclose()` releases it when
    no body was taken (a HEAD, a refused range); closing the body does otherwise."""

    @property
    def size(self) -> int | None: ...

    async def wait_size(self, first: int | None) -> int | None:
        """The size a range request needs (`first`: where it starts reading)."""
        ...

    def body(self, start: int, end: int | None) -> Body:
        """Bytes [start, end); `end` None: to the blob's end."""
        ...

    def download(self) -> BlobSource | None:
        """A remote blob (in a shared bucket) as the source of a local download, which
        verifies it before its last byte and keeps it locally; None: read it in place.
        Taking the source takes the blob's resources with it."""
        ...

    async def aclose(self) -> None: ...


class BlobWrite(Protocol):
    """A blob being written while it downloads.

    `path` is a local file that the download writes and its readers tail. A shared store
    may also send the bytes on as they arrive (`publish`: a multipart upload), but makes
    them visible under their digest only in `commit`, once the digest has verified.
    """

    @property
    def path(self) -> Path: ...

    def wrote(self, size: int) -> None:
        """The file now holds `size` bytes (a shared store's upload may read them)."""
        ...

    def publish(self) -> None:
        """This process is the one that puts these bytes in the shared store (it leads
        the download); a no-op for a store that is not shared."""
        ...

    async def commit(self, size: int) -> Path:
        """Adopt the verified, synced file under its digest; where it now is.

        Readers may still join the download while this runs and open `path` by name:
        the file stays readable there until it is in its final place.
        """
        ...

    async def abort(self) -> None:
        """Give up: nothing becomes visible, and what was sent on is discarded. Best
        effort (a read-only disk may keep the file: the temp sweep removes it later)."""
        ...


class Store(Protocol):
    # -- manifests by digest (immutable) and tags (pointers with a birth time) --------
    async def get_manifest(self, digest: Digest) -> StoredManifest | None: ...

    async def put_manifest(self, manifest: StoredManifest) -> None: ...

    async def get_tag(self, key: TagKey) -> TagEntry | None: ...

    async def put_tag(self, key: TagKey, entry: TagEntry) -> None: ...

    # -- blobs ------------------------------------------------------------------------
    async def open_blob(self, digest: Digest) -> OpenBlob | None: ...

    async def blob_size(self, digest: Digest) -> int | None: ...

    async def blob_url(self, digest: Digest) -> str | None:
        """A URL clients may fetch the committed blob from directly (a presigned object
        URL), when the store is configured to redirect; else None."""
        ...

    def write_blob(self, digest: Digest) -> BlobWrite:
        """Begin writing a blob that is downloading: a local file readers tail."""
        ...

    # -- scopes: the (upstream, repository) pairs known to hold a digest (mirror.scopes)
    async def has_scope(self, digest: Digest, upstream: str, repo: str) -> bool: ...

    async def add_scopes(self, digests: Collection[Digest], upstream: str, repo: str) -> None: ...

    def drop_scopes(self, keep: Set[Digest], before: float) -> int:
        """Forget the scopes of digests not in `keep` (nothing cached under them) last
        recorded before `before`: what manifests named but nobody pulled. How many."""
        ...

    # -- access tracking (no I/O on the request path) and lifecycle -------------------
    def touch_blob(self, digest: Digest) -> None: ...

    def touch_manifest(self, digest: Digest) -> None: ...

    def record_pull(self, key: ImageKey, digest: Digest) -> None:
        """A client pulled `key` (a manifest GET); counted in memory, written by
        `flush_access` (counts add up across processes and replicas)."""
        ...

    def flush_access(self) -> None:
        """Write the accesses and pulls recorded since the last flush (a lifecycle
        round, or an admin listing that wants them current)."""
        ...

    # -- what operators see and steer (mirror.inventory); blocking: a worker thread ----
    def pulls(self) -> list[PullRecord]: ...

    def drop_pulls(self, keys: list[ImageKey]) -> None: ...

    def pins(self) -> dict[ImageKey, float]:
        """Pinned images, with when they were pinned."""
        ...

    def set_pin(self, key: ImageKey, pinned_at: float | None) -> None:
        """Pin `key` (at `pinned_at`), or unpin it (None)."""
        ...

    def tag_entries(self) -> list[tuple[TagKey, TagEntry]]:
        """Every tag entry with its digest, in one read."""
        ...

    def put_job(self, job_id: str, record: str) -> None:
        """Write a warm job's record (JSON text), where every process sharing the
        store reads it: a job runs in one worker, and any worker answers for it."""
        ...

    def jobs(self) -> dict[str, str]:
        """Every job record, by id."""
        ...

    def drop_jobs(self, job_ids: list[str]) -> None: ...

    def scan(self) -> Scan:
        """Read every entry. No side effects."""
        ...

    def repositories(self) -> list[tuple[str, str]]:
        """The distinct (upstream, repository) pairs holding a cached tag, sorted
        (the catalog). Blocking: call it from a worker thread."""
        ...

    def drop_blobs(self, digests: list[Digest]) -> None: ...

    def drop_manifests(self, digests: list[Digest]) -> None: ...

    def drop_tags(self, keys: list[TagKey]) -> None: ...

    def sweep_temp(self, older_than: float) -> int:
        """Remove temp files untouched for `older_than` seconds (left by a failed
        cleanup, such as a read-only disk); how many went."""
        ...

    def verify_blob(self, entry: BlobEntry) -> bool:
        """Re-hash one blob; drop it unless it matches."""
        ...

    def recover(self) -> Recovery: ...

    def usage(self) -> CacheUsage:
        """Running totals for the metrics, exact without a scan."""
        ...

    def reconcile(self, scan: Scan) -> None:
        """Reset the running totals from a full scan (absorbs other processes' changes)."""
        ...

    def probe(self) -> tuple[bool, str]:
        """Can the cache take a write now (for /readyz)? (usable, what was found)."""
        ...

    def close(self) -> None: ...
