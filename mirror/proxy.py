"""The pull-through store: answers from the cache, or fetches from upstream and caches.

Routes call this and never know whether bytes came from disk or upstream
(Distribution's proxy storage shape). Digests and tags follow different rules:
content by digest is immutable, so a cached copy is always right; a tag is a
pointer that is trusted only for `tag_ttl`.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import sqlite3
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

from mirror.downloads import BlobDownload, Cursor, Downloads
from mirror.errors import RegistryError, UpstreamError
from mirror.freshness import Freshness
from mirror.inflight import SingleFlight
from mirror.mediatypes import MANIFEST_TYPES, AcceptSet
from mirror.metrics import Metrics
from mirror.policy import RepoPolicy
from mirror.ranges import ByteRange, RangeSpec, parse_length
from mirror.reference import Digest, Reference, upstream_name
from mirror.responses import read_download, read_file
from mirror.storage import Storage, StoredManifest, TagEntry
from mirror.upstream import Upstream

log = logging.getLogger(__name__)

TAGS_LIST_MAX_BYTES = 16 << 20


@dataclass(frozen=True, slots=True)
class Manifest:
    stored: StoredManifest
    result: str  # "hit", "miss", "revalidated" or "stale": also the X-Cache header

    @property
    def source(self) -> str:
        return "upstream" if self.result == "miss" else "cache"


@dataclass(slots=True)
class Blob:
    """What a blob response needs: size, the byte range, and a body to stream."""

    size: int | None
    range: ByteRange | None
    fd: int | None
    body: AsyncIterator[bytes] | None
    source: str


class Proxy:
    def __init__(
        self,
        storage: Storage,
        upstream: Upstream,
        downloads: Downloads,
        metrics: Metrics,
        *,
        freshness: Freshness,
        policy: RepoPolicy | None = None,
        manifest_max_bytes: int,
        clock: Callable[[], float] = time.time,
        touch: Callable[[str], None] = lambda key: None,
    ) -> None:
        self._storage = storage
        self._upstream = upstream
        self._downloads = downloads
        self._metrics = metrics
        self._policy = policy or RepoPolicy()
        self._freshness = freshness
        self._manifest_max = manifest_max_bytes
        self._clock = clock
        self._touch = touch  # records accesses for eviction (no I/O)
        self._fetches: SingleFlight[StoredManifest] = SingleFlight()
        self._revalidations: SingleFlight[Manifest] = SingleFlight()

    @property
    def name(self) -> str:
        return self._upstream.name

    def repo(self, name: str) -> str:
        """The upstream's repository name for `name`, if this mirror may serve it."""
        repo = upstream_name(name, docker_hub=self._upstream.docker_hub)
        self._policy.check(self._upstream.name, repo)
        return repo

    # -- manifests --------------------------------------------------------------------

    async def manifest(self, name: str, ref: Reference, accept: AcceptSet) -> Manifest:
        repo = self.repo(name)
        if ref.digest is not None:
            stored = self._storage.get_manifest(ref.digest)
            manifest = (
                Manifest(stored, "hit") if stored else await self._shared_fetch(repo, ref, accept)
            )
        else:
            manifest = await self._tag(repo, ref, accept)
        self._metrics.cache.labels("manifest", manifest.result).inc()
        self._touch(f"manifest/{manifest.stored.digest}")
        if not accept.accepts(manifest.stored.media_type):
            # A client that cannot read an index must never be handed one.
            raise RegistryError(
                "MANIFEST_UNKNOWN",
                f"manifest is {manifest.stored.media_type}, which the client does not accept",
                detail={"Accept": list(accept.types)},
            )
        return manifest

    async def _tag(self, repo: str, ref: Reference, accept: AcceptSet) -> Manifest:
        assert ref.tag is not None
        # Tags are cached per upstream: the same name on two registries never mixes.
        entry = self._storage.get_tag(self.name, repo, ref.tag, accept.cache_key)
        stored = self._storage.get_manifest(Digest.parse(entry.digest)) if entry else None
        if entry is None or stored is None:
            return await self._shared_fetch(repo, ref, accept)
        age = self._clock() - entry.stored_at
        if age < self._freshness.ttl(repo, ref.tag):
            return Manifest(stored, "hit")
        # N concurrent requests for an expired tag cause one revalidation.
        manifest, joined = await self._revalidations.run(
            (repo, ref.tag, accept.cache_key),
            lambda: self._revalidate(repo, ref, accept, stored, age),
        )
        if joined:
            self._metrics.coalesced.labels("manifest").inc()
        return manifest

    async def _revalidate(
        self, repo: str, ref: Reference, accept: AcceptSet, stored: StoredManifest, age: float
    ) -> Manifest:
        """HEAD the tag; fetch the body only if the digest moved; stale if upstream fails."""
        tag = ref.tag
        assert tag is not None
        try:
            resp = await self._upstream.get(
                f"/v2/{repo}/manifests/{tag}",
                repo=repo,
                kind="manifest",
                headers=_accept_header(accept),
                method="HEAD",
            )
            await resp.aclose()
            await self._upstream.raise_for_status(resp, "manifest")
            current = _header_digest(resp.headers.get("docker-content-digest"))
            if current is not None and str(current) == stored.digest:
                entry = TagEntry(stored.digest, stored.media_type, self._clock())
                self._cache_write(
                    lambda: self._storage.put_tag(self.name, repo, tag, accept.cache_key, entry)
                )
                return Manifest(stored, "revalidated")
            # The tag moved (or the upstream named no digest): fetch the body.
            return Manifest(await self._fetch_manifest(repo, ref, accept), "miss")
        except UpstreamError as exc:
            if not _upstream_trouble(exc) or age >= self._freshness.max_stale:
                raise
            log.warning("serving %s:%s stale (%.0f s old): %s", repo, ref.tag, age, exc.message)
            return Manifest(stored, "stale")

    async def _shared_fetch(self, repo: str, ref: Reference, accept: AcceptSet) -> Manifest:
        # N concurrent misses for one manifest (a rollout) cause one upstream request.
        stored, joined = await self._fetches.run(
            (repo, str(ref), accept.cache_key),
            lambda: self._fetch_manifest(repo, ref, accept),
        )
        if joined:
            self._metrics.coalesced.labels("manifest").inc()
        return Manifest(stored, "miss")

    async def _fetch_manifest(self, repo: str, ref: Reference, accept: AcceptSet) -> StoredManifest:
        resp = await self._upstream.get(
            f"/v2/{repo}/manifests/{ref}",
            repo=repo,
            kind="manifest",
            headers=_accept_header(accept),
        )
        await self._upstream.raise_for_status(resp, "manifest")
        try:
            length = parse_length(resp.headers.get("content-length"))
            if length is not None and length > self._manifest_max:
                raise UpstreamError(
                    "MANIFEST_INVALID", "manifest exceeds the size limit", status=502
                )
            body = bytearray()
            async for chunk in resp.aiter_raw():
                body += chunk
                if len(body) > self._manifest_max:
                    raise UpstreamError(
                        "MANIFEST_INVALID", "manifest exceeds the size limit", status=502
                    )
        finally:
            await resp.aclose()
        expected = ref.digest or _header_digest(resp.headers.get("docker-content-digest"))
        algorithm = expected.algorithm if expected else "sha256"
        actual = Digest(algorithm, hashlib.new(algorithm, body).hexdigest())
        if expected is not None and actual != expected:
            self._metrics.digest_mismatches.labels("manifest").inc()
            log.error(
                "manifest %s/%s from upstream is %s, expected %s; not cached",
                repo,
                ref,
                actual,
                expected,
            )
            raise UpstreamError(
                "DIGEST_INVALID", "upstream manifest failed digest verification", status=502
            )
        stored = StoredManifest(
            str(actual), _media_type(resp.headers.get("content-type"), body), bytes(body)
        )
        tag = ref.tag
        entry = TagEntry(stored.digest, stored.media_type, self._clock())

        def remember() -> None:
            self._storage.put_manifest(stored)
            if tag is not None:
                self._storage.put_tag(self.name, repo, tag, accept.cache_key, entry)

        self._cache_write(remember)
        return stored

    def _cache_write(self, write: Callable[[], None]) -> None:
        """Cache a manifest or tag; a full or read-only disk costs the cache, not the pull."""
        try:
            write()
        except (OSError, sqlite3.Error) as exc:
            self._metrics.cache_write_failures.labels("manifest").inc()
            log.error("cannot write a manifest to the cache (%s); served uncached", exc)

    async def aclose(self) -> None:
        await self._revalidations.aclose()
        await self._fetches.aclose()

    # -- blobs ------------------------------------------------------------------------

    async def blob(self, name: str, digest: Digest, spec: RangeSpec | None, *, head: bool) -> Blob:
        repo = self.repo(name)
        cached = self._storage.open_blob(digest)
        if cached is not None:
            self._metrics.cache.labels("blob", "hit").inc()
            self._touch(f"blob/{digest}")
            fd, size = cached
            try:
                rng = spec.resolve(size) if spec is not None else None
            except BaseException:
                os.close(fd)
                raise
            if head:
                os.close(fd)
                return Blob(size, rng, None, None, "cache")
            start, end = (rng.start, rng.end) if rng else (0, size)
            return Blob(size, rng, fd, read_file(fd, start, end), "cache")
        self._metrics.cache.labels("blob", "miss").inc()
        if head and self._downloads.active(self._upstream, digest) is None:
            # A HEAD must not start a multi-GB download: ask upstream for the size only.
            return await self._head_upstream(repo, digest, spec)
        dl, dl_fd, cursor = await self._attach(repo, digest)
        try:
            if dl.size is None and spec is not None:
                # A range needs the size; chunked upstreams are rare. While it waits,
                # it holds a spilled relay only from where it will start reading; a
                # suffix range (start unknown) cannot, and may find its bytes gone.
                if spec.first is None:
                    cursor.closed = True
                else:
                    cursor.pos = spec.first
                await dl.finished()
                await dl.ready()
            rng = spec.resolve(dl.size) if spec is not None and dl.size is not None else None
        except BaseException:
            _close(dl_fd)
            raise
        if head:
            _close(dl_fd)
            return Blob(dl.size, rng, None, None, "upstream")
        if rng is not None:
            body = read_download(dl, dl_fd, cursor, rng.start, rng.end)
        else:
            body = read_download(dl, dl_fd, cursor, 0, None)
        return Blob(dl.size, rng, dl_fd, body, "upstream")

    async def _attach(self, repo: str, digest: Digest) -> tuple[BlobDownload, int | None, Cursor]:
        """Join (or start) the download of `digest`: it, a read fd on its file, a cursor.

        The fd is None when the cache could not even create the file (the download
        relays from memory). A download started for another repository that the
        upstream refused (404, 401, 403) says nothing about this repository: then this
        request asks for itself, so one client's bad name cannot fail everybody else's.
        """
        while True:
            dl = self._downloads.get_or_start(self._upstream, repo, digest)
            cursor = dl.attach()
            # Before any await: the path may be renamed, or unlinked if the download spills.
            fd = None if dl.spilled else os.open(dl.path, os.O_RDONLY)
            try:
                await dl.ready()
                return dl, fd, cursor
            except UpstreamError as exc:
                _close(fd)
                # Downloads are per upstream, so only the repository can differ.
                if dl.source[1] == repo or exc.status >= 500:
                    raise
            except BaseException:
                _close(fd)
                raise

    async def _head_upstream(self, repo: str, digest: Digest, spec: RangeSpec | None) -> Blob:
        resp = await self._upstream.get(
            f"/v2/{repo}/blobs/{digest}", repo=repo, kind="blob", method="HEAD"
        )
        await resp.aclose()
        await self._upstream.raise_for_status(resp, "blob")
        size = parse_length(resp.headers.get("content-length"))
        rng = spec.resolve(size) if spec is not None and size is not None else None
        return Blob(size, rng, None, None, "upstream")

    # -- tags -------------------------------------------------------------------------

    async def tags(self, name: str, n: int | None, last: str | None) -> tuple[bytes, str | None]:
        repo = self.repo(name)
        query = []
        if n is not None:
            query.append(f"n={n}")
        if last is not None:
            query.append(f"last={last}")
        path = f"/v2/{repo}/tags/list" + ("?" + "&".join(query) if query else "")
        resp = await self._upstream.get(path, repo=repo, kind="tags")
        await self._upstream.raise_for_status(resp, "tags")
        try:
            body = bytearray()
            async for chunk in resp.aiter_raw():
                body += chunk
                if len(body) > TAGS_LIST_MAX_BYTES:
                    raise UpstreamError("UNAVAILABLE", "tag list too large", status=502)
        finally:
            await resp.aclose()
        return bytes(body), resp.headers.get("link")


def _close(fd: int | None) -> None:
    if fd is not None:
        os.close(fd)


def _accept_header(accept: AcceptSet) -> dict[str, str]:
    value = accept.header()
    return {} if value is None else {"Accept": value}


def _upstream_trouble(exc: UpstreamError) -> bool:
    """Failures that stale content may paper over: unreachable, timeouts, 5xx, 429.

    A 404, 401 or 403 is the upstream's answer, not its trouble: never hidden.
    """
    return exc.upstream_status is None or exc.upstream_status == 429 or (exc.upstream_status >= 500)


def _header_digest(value: str | None) -> Digest | None:
    if not value:
        return None
    try:
        return Digest.parse(value.strip())
    except RegistryError:
        return None


def _media_type(content_type: str | None, body: bytes | bytearray) -> str:
    media_type = (content_type or "").split(";")[0].strip().lower()
    if media_type in MANIFEST_TYPES:
        return media_type
    # Some registries answer application/json; the manifest names its own type.
    try:
        declared = json.loads(body).get("mediaType")
    except (ValueError, AttributeError):
        declared = None
    if isinstance(declared, str) and declared:
        return declared
    return media_type or "application/octet-stream"
