"""The pull-through store: a store over a local store and a remote store.

Routes call a `Proxy` and never know whether bytes came from the cache or the
upstream (Distribution's `proxyBlobStore{localStore, remoteStore}` shape). Digests and
tags follow different rules: content by digest is immutable, so a cached copy is
always right; a tag is a pointer that is trusted only for `tag_ttl`, then revalidated
with a HEAD, and served stale while the upstream is in trouble.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import sqlite3
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Protocol, TypeVar

from mirror import dockerhub, manifests, referrers
from mirror.budget import Deferred
from mirror.downloads import Downloads, OpenSource
from mirror.errors import RegistryError, UpstreamError
from mirror.events import Events
from mirror.fairness import UNLIMITED, Fairness, Slot
from mirror.freshness import Freshness
from mirror.inflight import SingleFlight
from mirror.mediatypes import MANIFEST_TYPES, OCI_INDEX, AcceptSet
from mirror.metrics import CacheResult, Metrics, Source
from mirror.policy import RepoPolicy
from mirror.ranges import ByteRange, RangeSpec
from mirror.reference import Digest, Reference
from mirror.scopes import Scopes
from mirror.sharing import Sharing
from mirror.store import Body, OpenBlob, Store, StoredManifest, TagEntry, TagKey
from mirror.upstream import RemoteStore

log = logging.getLogger(__name__)

TAGS_LIST_MAX_BYTES = 16 << 20
# Manifests larger than this are checked in a worker thread (a 4 MiB one takes ~0.4 s).
CHECK_INLINE_MAX = 64 << 10

T = TypeVar("T")
# Background revalidations of one upstream running at once; more wait their turn.
BACKGROUND_MAX = 8
# Background revalidations waiting or running per upstream; past it, stale answers.
BACKGROUND_QUEUE_MAX = 1000
# Seconds before a tag whose background revalidation failed gets another.
BACKGROUND_RETRY = 30.0
# Tags whose pulls (refresh ahead) and failures are remembered, most recent kept.
PULL_COUNTS_MAX = 10_000


@dataclass(frozen=True, slots=True)
class Manifest:
    stored: StoredManifest
    result: CacheResult
    # For a tag: seconds since it was last confirmed with the registry (the `Age` a
    # downstream mirror tier counts its own TTL from); None for a digest.
    age: float | None = None

    @property
    def source(self) -> Source:
        return "upstream" if self.result == "miss" else "cache"


@dataclass(frozen=True, slots=True)
class Blob:
    """What a blob response needs: size, the byte range, and a body (None for HEAD)."""

    size: int | None
    range: ByteRange | None
    body: Body | None
    source: Source
    location: str | None = None  # a redirect to the blob elsewhere (a presigned URL)


@dataclass(frozen=True, slots=True)
class _Revalidation:
    """A cached tag past its TTL, and what asking the upstream about it needs."""

    key: TagKey
    ref: Reference
    accept: AcceptSet
    stored: StoredManifest
    entry: TagEntry
    age: float


class Coordinator(Protocol):
    """One replica at a time does a piece of work (mirror.cluster.Cluster.once)."""

    async def once(
        self,
        name: str,
        work: Callable[[], Awaitable[T]],
        done_elsewhere: Callable[[], Awaitable[T | None]],
        wait: float,
    ) -> T: ...


class Proxy:
    def __init__(
        self,
        store: Store,
        upstream: RemoteStore,
        metrics: Metrics,
        *,
        freshness: Freshness,
        policy: RepoPolicy | None = None,
        manifest_max_bytes: int,
        commit_grace: float = 25.0,
        max_blob_size: int = 64 << 30,
        clock: Callable[[], float] = time.time,
        source: OpenSource | None = None,
        cluster: Coordinator | None = None,
        revalidate_wait: float = 20.0,
        stale_after: float | None = None,
        fairness: Fairness | None = None,
        sharing: Sharing | None = None,
        events: Events | None = None,
    ) -> None:
        self._events = events or Events()
        # Per-client limits, charged only where a request makes us go upstream.
        self.fairness = fairness or Fairness()
        self._stale_after = stale_after
        self._cluster = cluster
        # How long replicas wait for another's revalidation (a HEAD's deadline).
        self._revalidate_wait = revalidate_wait
        self._store = store
        self._upstream = upstream
        self._metrics = metrics
        self._policy = policy or RepoPolicy()
        self._freshness = freshness
        self._manifest_max = manifest_max_bytes
        self._clock = clock
        self._max_blob = max_blob_size
        self._sizes = SizeHints()
        # Which repositories of this upstream may be served a cached digest.
        self.scopes = Scopes(store, upstream.name, metrics)
        # This upstream's downloads: isolation between upstreams is ownership.
        self.downloads = Downloads(
            store,
            upstream,
            metrics,
            commit_grace=commit_grace,
            source=source,
            sharing=sharing,
            events=self._events,
        )
        self._fetches: SingleFlight[StoredManifest] = SingleFlight()
        self._revalidations: SingleFlight[Manifest] = SingleFlight()
        # Background revalidations (stale-while-revalidate, refresh ahead): pulls per
        # tag since it was last confirmed, when a failed one may be tried again, and
        # how many run at once.
        self._pulls: OrderedDict[TagKey, tuple[float, int]] = OrderedDict()
        self._retry_at: OrderedDict[TagKey, float] = OrderedDict()
        self._background_slots = asyncio.Semaphore(BACKGROUND_MAX)
        self._queued = 0  # background revalidations started and not yet done

    @property
    def name(self) -> str:
        return self._upstream.name

    @property
    def freshness(self) -> Freshness:
        return self._freshness

    def repo(self, name: str) -> str:
        """The upstream's repository name for `name`, if this mirror may serve it."""
        repo = dockerhub.repository(name, hub=self._upstream.docker_hub)
        self._policy.check(self._upstream.name, repo)
        return repo

    async def aclose(self) -> None:
        await self._revalidations.aclose()
        await self._fetches.aclose()
        await self.downloads.aclose()
        await self.scopes.aclose()

    # -- manifests --------------------------------------------------------------------

    async def manifest(
        self, name: str, ref: Reference, accept: AcceptSet, max_age: float | None = None
    ) -> Manifest:
        """`max_age`: a downstream mirror tier's own TTL (its `Cache-Control: max-age`):
        a tag older than that is revalidated first."""
        repo = self.repo(name)
        if ref.digest is not None:
            stored = await self._cached(ref.digest)
            if stored is not None:
                await self._may_serve_manifest(repo, stored)
                manifest = Manifest(stored, "hit")
            else:
                manifest = await self._shared_fetch(repo, ref, accept)
        else:
            manifest = await self._tag(repo, ref, accept, max_age)
        self._metrics.cache.labels("manifest", manifest.result).inc()
        self._store.touch_manifest(manifest.stored.digest)
        if not accept.accepts(manifest.stored.media_type):
            # A client that cannot read an index must never be handed one.
            raise RegistryError(
                "MANIFEST_UNKNOWN",
                f"manifest is {manifest.stored.media_type}, which the client does not accept",
                detail={"Accept": list(accept.types)},
            )
        return manifest

    async def _tag(
        self, repo: str, ref: Reference, accept: AcceptSet, max_age: float | None
    ) -> Manifest:
        answer = await self._tag_answer(repo, ref, accept, max_age)
        if answer.age is not None:
            return answer  # a hit or a stale answer: its entry was read already
        assert ref.tag is not None
        # Fetched or revalidated just now: its age as recorded (a tier's answer may be
        # old already). Only off the hit path, which is most requests.
        entry = await self._store.get_tag(TagKey(self.name, repo, ref.tag, accept.cache_key))
        if entry is None or entry.digest != answer.stored.digest:
            return answer
        return Manifest(answer.stored, answer.result, max(0.0, self._clock() - entry.stored_at))

    async def _tag_answer(
        self, repo: str, ref: Reference, accept: AcceptSet, max_age: float | None
    ) -> Manifest:
        assert ref.tag is not None
        key = TagKey(self.name, repo, ref.tag, accept.cache_key)
        entry = await self._store.get_tag(key)
        stored = await self._cached(entry.digest) if entry else None
        if entry is None or stored is None:
            return await self._shared_fetch(repo, ref, accept)
        age = self._clock() - entry.stored_at
        fresh = self._freshness.of(repo, ref.tag)
        if age < (fresh.ttl if max_age is None else min(fresh.ttl, max_age)):
            if self._popular(key, entry, age, fresh.ttl):
                self._background(_Revalidation(key, ref, accept, stored, entry, age))
            return Manifest(stored, "hit", max(0.0, age))  # the hit path: nothing more
        revalidate = _Revalidation(key, ref, accept, stored, entry, age)
        if (
            max_age is None  # a downstream tier asking for its own TTL waits, as it asked
            and age < fresh.ttl + fresh.stale_while_revalidate
            and age < self._freshness.max_stale
        ):
            # Stale-while-revalidate: answered now, the HEAD runs behind the answer.
            result: CacheResult = "updating" if self._background(revalidate) else "stale"
            return Manifest(stored, result, max(0.0, age))
        # Charged before the flight, and only to the client that starts it: joining a
        # revalidation in progress costs no upstream request, and must never fail
        # because of another client's limit.
        if key not in self._revalidations and (wait := self.fairness.try_manifest()) is not None:
            if age >= self._freshness.max_stale:
                raise self.fairness.refuse_manifest(wait)
            # The answer we have is still servable: better than a 429.
            self.fairness.throttled_stale()
            return Manifest(stored, "stale", max(0.0, age))
        # N concurrent requests for an expired tag cause one revalidation; with
        # replicas, one for the whole cluster. The flight joined may be a background
        # one still queued for its slot behind an expiry wave: with a stale answer at
        # hand it is waited for no longer than the upstream would be (`stale_after`).
        stale_ok = age < self._freshness.max_stale
        joining = stale_ok and key in self._revalidations
        try:
            async with asyncio.timeout(self._stale_after if joining else None):
                return await self._coalesced(
                    self._revalidations, key, lambda: self._revalidate_once(revalidate)
                )
        except TimeoutError:
            if not joining:
                raise
            return Manifest(stored, "stale", max(0.0, age))  # the flight goes on, shielded
        except UpstreamError as exc:
            if not _upstream_trouble(exc) or age >= self._freshness.max_stale:
                raise
            return Manifest(stored, "stale", max(0.0, age))  # logged once, by the flight

    def _popular(self, key: TagKey, entry: TagEntry, age: float, ttl: float) -> bool:
        """Whether a fresh tag has been pulled often enough since it was last confirmed
        to be revalidated before it expires (refresh ahead)."""
        threshold = self._freshness.refresh_ahead_pulls
        if threshold <= 0:
            return False
        since, pulls = self._pulls.pop(key, (entry.stored_at, 0))
        if since != entry.stored_at:  # confirmed again since: a new count
            since, pulls = entry.stored_at, 0
        self._pulls[key] = (since, pulls + 1)
        if len(self._pulls) > PULL_COUNTS_MAX:
            self._pulls.popitem(last=False)
        return pulls + 1 > threshold and age >= ttl - min(self._freshness.refresh_ahead, ttl / 2)

    def _background(self, revalidate: _Revalidation) -> bool:
        """Start a revalidation nobody waits for; False if one may not start now (one
        failed a moment ago: the upstream is not asked again on every request)."""
        key = revalidate.key
        if key in self._revalidations:
            return True  # the one in flight will do
        if self._clock() < self._retry_at.get(key, 0.0):
            return False
        if self._queued >= BACKGROUND_QUEUE_MAX:
            # An expiry wave over more tags than the queue holds (each queued task
            # keeps its manifest): the rest are served stale and asked about later.
            return False
        self._retry_at.pop(key, None)
        return self._revalidations.start(key, lambda: self._in_background(revalidate))

    async def _in_background(self, revalidate: _Revalidation) -> Manifest:
        """A revalidation behind an answer already sent: counted, and on failure the
        entry stays as it was and the next one waits a while."""
        key = revalidate.key
        self._queued += 1
        try:
            async with self._background_slots:  # an expiry wave is not a HEAD storm
                manifest = await self._revalidate_once(revalidate)
        except UpstreamError as exc:
            deferred = isinstance(exc, Deferred)
            self._metrics.background_revalidations.labels(
                self.name, "deferred" if deferred else "failed"
            ).inc()
            if not _upstream_trouble(exc):  # trouble was logged by _revalidate
                log.warning("background revalidation of %s:%s failed: %s", key.repo, key.tag, exc)
            self._retry_at[key] = self._clock() + BACKGROUND_RETRY
            if len(self._retry_at) > PULL_COUNTS_MAX:
                self._retry_at.popitem(last=False)
            raise
        finally:
            self._queued -= 1
        # By the digest: another replica's revalidation is read back as "revalidated",
        # and a GET after a HEAD that named no digest may find the same one.
        moved = manifest.stored.digest != revalidate.stored.digest
        result = "moved" if moved else "unchanged"
        self._metrics.background_revalidations.labels(self.name, result).inc()
        return manifest

    async def _revalidate_once(self, revalidate: _Revalidation) -> Manifest:
        key, entry = revalidate.key, revalidate.entry

        def work() -> Awaitable[Manifest]:
            return self._revalidate(revalidate)

        if self._cluster is None:
            return await work()

        async def done_elsewhere() -> Manifest | None:
            # Another replica revalidated: the shared entry is newer than ours.
            current = await self._store.get_tag(key)
            if current is None or current.stored_at <= entry.stored_at:
                return None
            found = await self._cached(current.digest)
            return None if found is None else Manifest(found, "revalidated")

        name = f"reval:{key.upstream}/{key.repo}:{key.tag}#{key.accept}"
        return await self._cluster.once(name, work, done_elsewhere, self._revalidate_wait)

    async def _revalidate(self, revalidate: _Revalidation) -> Manifest:
        """HEAD the tag; fetch the body only if the digest moved. Raises UpstreamError
        when the upstream fails (each caller then serves stale, or not).

        With a stale answer at hand, the upstream gets `stale_after` seconds, not a whole
        fetch_timeout: a downstream mirror tier waiting on us with the same deadline
        must get the stale answer before its deadline takes us for unreachable."""
        key, stored = revalidate.key, revalidate.stored
        stale_ok = revalidate.age < self._freshness.max_stale
        budget = self._stale_after if stale_ok else None
        try:
            try:
                async with asyncio.timeout(budget):
                    head = await self._upstream.head_manifest(
                        key.repo, revalidate.ref, revalidate.accept.header()
                    )
                    if head.digest == stored.digest:
                        # A tier's answer may be `head.age` old already: counted from then.
                        when = self._clock() - head.age
                        entry = TagEntry(stored.digest, stored.media_type, when)
                        await self._cache_write(self._store.put_tag(key, entry))
                        return Manifest(stored, "revalidated")
                    # The tag moved (or the upstream named no digest): fetch the body,
                    # unless the rate-limit budget keeps its GET for misses.
                    fetched = await self._fetch_manifest(
                        key.repo, revalidate.ref, revalidate.accept, refresh=stale_ok
                    )
                    return Manifest(fetched, "miss")
            except TimeoutError:
                raise UpstreamError(
                    "UNAVAILABLE", f"no answer within {budget:g} s", status=504
                ) from None
        except UpstreamError as exc:
            if stale_ok and _upstream_trouble(exc):
                # Once per revalidation, however many clients wait for it.
                level = logging.DEBUG if isinstance(exc, Deferred) else logging.WARNING
                log.log(
                    level,
                    "serving %s:%s stale (%.0f s old): %s",
                    key.repo,
                    key.tag,
                    revalidate.age,
                    exc.message,
                )
            raise

    async def _shared_fetch(self, repo: str, ref: Reference, accept: AcceptSet) -> Manifest:
        # N concurrent misses for one manifest (a rollout) cause one upstream request;
        # with replicas, one for the whole cluster (manifest GETs are what Docker Hub's
        # rate limit counts).
        key = (repo, str(ref), accept.cache_key)
        if key not in self._fetches:  # joining a fetch in flight costs nothing
            self.fairness.charge_manifest()
        stored = await self._coalesced(
            self._fetches, key, lambda: self._fetch_once(repo, ref, accept)
        )
        return Manifest(stored, "miss")

    async def _fetch_once(self, repo: str, ref: Reference, accept: AcceptSet) -> StoredManifest:
        def work() -> Awaitable[StoredManifest]:
            return self._fetch_manifest(repo, ref, accept)

        if self._cluster is None:
            return await work()

        async def done_elsewhere() -> StoredManifest | None:
            digest = ref.digest
            if digest is None:
                assert ref.tag is not None
                entry = await self._store.get_tag(
                    TagKey(self.name, repo, ref.tag, accept.cache_key)
                )
                digest = None if entry is None else entry.digest
            if digest is None:
                return None
            if ref.digest is not None and not await self.scopes.known(digest, repo):
                # Cached meanwhile for another pair, or by a holder whose fetch failed.
                return None
            return await self._cached(digest)

        name = f"fetch:{self.name}/{repo}@{ref}#{accept.cache_key}"
        return await self._cluster.once(name, work, done_elsewhere, self._revalidate_wait)

    async def _cached(self, digest: Digest) -> StoredManifest | None:
        stored = await self._store.get_manifest(digest)
        if stored is not None and not manifests.servable(stored.media_type):
            # Cached by an older version that did not check manifests: fetched anew.
            return None
        return stored

    async def _coalesced(
        self, flight: SingleFlight[T], key: object, work: Callable[[], Awaitable[T]]
    ) -> T:
        result, joined = await flight.run(key, work)
        if joined:
            self._metrics.coalesced.labels("manifest").inc()
        return result

    async def _fetch_manifest(
        self, repo: str, ref: Reference, accept: AcceptSet, *, refresh: bool = False
    ) -> StoredManifest:
        remote = await self._upstream.get_manifest(
            repo, ref, accept.header(), self._manifest_max, refresh=refresh
        )
        # Validated before anything else: a schema1 answer, or one that is no manifest,
        # is refused as such, never counted as a digest mismatch.
        if len(remote.body) > CHECK_INLINE_MAX:  # parsing takes a while: not in the loop
            checked = await asyncio.to_thread(manifests.check, remote.content_type, remote.body)
        else:
            checked = manifests.check(remote.content_type, remote.body)
        expected = ref.digest or manifests.expected_digest(remote.digest_header)
        algorithm = expected.algorithm if expected else "sha256"
        actual = Digest(algorithm, hashlib.new(algorithm, remote.body).hexdigest())
        if expected is not None and actual != expected:
            self._metrics.digest_mismatches.labels("manifest").inc()
            self._events.mismatch(
                "manifest",
                upstream=self.name,
                repository=repo,
                digest=str(expected),
                actual=str(actual),
            )
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
        stored = StoredManifest(actual, checked.media_type, remote.body)
        self._sizes.remember(repo, checked.sizes)
        # Before the manifest itself: a replica that finds it cached finds its scopes.
        await self.scopes.record([actual, *checked.references], repo)
        await self._cache_write(self._remember(stored, repo, ref.tag, accept, remote.age))
        return stored

    async def _remember(
        self, stored: StoredManifest, repo: str, tag: str | None, accept: AcceptSet, age: float
    ) -> None:
        await self._store.put_manifest(stored)
        if tag is not None:
            key = TagKey(self.name, repo, tag, accept.cache_key)
            await self._store.put_tag(
                key, TagEntry(stored.digest, stored.media_type, self._clock() - age)
            )
        self._events.fill(
            "manifest",
            upstream=self.name,
            repository=repo,
            digest=str(stored.digest),
            media_type=stored.media_type,
            size=len(stored.body),
            tag=tag,
            manifest=stored.body,
        )

    async def _may_serve_manifest(self, repo: str, stored: StoredManifest) -> None:
        """A cached manifest by digest, for `repo`: known there, or asked (a HEAD)."""
        accept = ", ".join(dict.fromkeys([stored.media_type, *MANIFEST_TYPES]))
        ref = Reference.parse(str(stored.digest))
        await self.scopes.check(
            "manifest",
            stored.digest,
            repo,
            lambda: self._upstream.head_manifest(repo, ref, accept),
            self._manifest_request,
        )

    def _manifest_request(self) -> Slot:
        """A token for one upstream manifest request by the current client, or 429."""
        self.fairness.charge_manifest()
        return UNLIMITED

    async def _cache_write(self, write: Awaitable[None]) -> None:
        """Cache a manifest or tag; a full or read-only disk costs the cache, not the pull."""
        try:
            await write
        except (OSError, sqlite3.Error) as exc:
            self._metrics.cache_write_failures.labels("manifest").inc()
            log.error("cannot write a manifest to the cache (%s); served uncached", exc)

    # -- blobs ------------------------------------------------------------------------

    async def blob(
        self,
        name: str,
        digest: Digest,
        spec: RangeSpec | None,
        *,
        head: bool,
        checked: bool = False,
    ) -> Blob:
        repo = self.repo(name)
        if not head and (url := await self._store.blob_url(digest)) is not None:
            await self._may_serve_blob(repo, digest)
            self._metrics.cache.labels("blob", "hit").inc()
            self._store.touch_blob(digest)
            return Blob(None, None, None, "cache", url)
        if head and (size := await self._store.blob_size(digest)) is not None:
            # A HEAD needs the size only: a shared store's object is not opened for it.
            await self._may_serve_blob(repo, digest)
            self._metrics.cache.labels("blob", "hit").inc()
            self._store.touch_blob(digest)
            return Blob(size, spec.resolve(size) if spec is not None else None, None, "cache")
        cached = await self._store.open_blob(digest)
        if cached is not None:
            try:
                await self._may_serve_blob(repo, digest)
            except BaseException:
                await cached.aclose()
                raise
            self._metrics.cache.labels("blob", "hit").inc()
            self._store.touch_blob(digest)
            if spec is None and (source := cached.download()) is not None:
                # A whole blob from a shared bucket: read through a local download.
                limit = self._limit(repo, digest)
                reader = await self.downloads.join(repo, digest, limit, source)
                return await answer(reader, spec, head, "cache")
            return await answer(cached, spec, head, "cache")
        active = self.downloads.active(digest)
        # Our own GET for this repository confirms it; joining another repository's
        # download, or (with replicas) following whichever replica leads it, does not.
        direct = self._cluster is None and (active is None or active.repo == repo)
        if not direct and not checked and (active is not None or not head):
            await self._may_serve_blob(repo, digest)
            # The check may have taken a HEAD's time: the download may have been
            # committed meanwhile, and must then be read from the cache, not fetched again.
            return await self.blob(name, digest, spec, head=head, checked=True)
        self._metrics.cache.labels("blob", "miss").inc()
        starts = self.downloads.active(digest) is None
        if head and starts:
            # A HEAD must not start a multi-GB download: ask upstream for the size only.
            # It is an upstream request too, so it takes a cold-fetch slot while it runs
            # (not a manifest token: registries do not count blob HEADs as pulls).
            with self.fairness.cold_fetch():
                size = await self._upstream.head_blob(repo, digest)
            await self.scopes.record([digest], repo)
            rng = spec.resolve(size) if spec is not None and size is not None else None
            return Blob(size, rng, None, "upstream")
        # Only the client whose request starts the download is charged: joining one in
        # progress costs the upstream nothing.
        slot = self.fairness.cold_fetch() if starts else UNLIMITED
        limit = self._limit(repo, digest)
        try:
            # Another process's download for another repository: a scope check first.
            check = (lambda: self._may_serve_blob(repo, digest)) if direct else None
            reader = await self.downloads.join(repo, digest, limit, check=check)
            if direct:
                try:
                    await self.scopes.record([digest], repo)
                except BaseException:
                    await reader.aclose()
                    raise
            blob = await answer(reader, spec, head, "upstream")
        except BaseException:
            slot.release()
            raise
        if blob.body is None:
            slot.release()
            return blob
        # Held until the download ends, not until this client hangs up: the download
        # goes on without it (for the cache), so a client disconnecting from each
        # could otherwise have any number running upstream at once.
        reader.when_finished(slot.release)
        return blob

    async def _may_serve_blob(self, repo: str, digest: Digest) -> None:
        """A cached (or downloading) blob, for `repo`: known there, or asked (a HEAD)."""
        await self.scopes.check(
            "blob",
            digest,
            repo,
            lambda: self._upstream.head_blob(repo, digest),
            self.fairness.cold_fetch,  # as a cold HEAD: a slot while it runs
        )

    def _limit(self, repo: str, digest: Digest) -> int:
        # A descriptor's size only lowers the bound, and only for its own repository:
        # another repository's manifest cannot make a blob unpullable here.
        hint = self._sizes.get(repo, digest)
        return self._max_blob if hint is None else min(hint, self._max_blob)

    # -- referrers (mirror.referrers) ---------------------------------------------------

    async def referrers(self, name: str, digest: Digest) -> Manifest:
        """The referrers index of `digest` in this repository, unfiltered: cached like a
        tag (its TTL rules, stale while the upstream is in trouble), never revalidated
        by HEAD (the referrers API has no digest to compare)."""
        repo = self.repo(name)
        key = TagKey(self.name, repo, referrers.fallback_tag(digest), referrers.CACHE_KEY)
        entry = await self._store.get_tag(key)
        stored = await self._cached(entry.digest) if entry else None
        age = 0.0
        if entry is not None and stored is not None:
            age = max(0.0, self._clock() - entry.stored_at)
            # Kept as recently used, like the manifests clients pull, for eviction.
            self._store.touch_manifest(stored.digest)
            if age < self._freshness.ttl(repo, key.tag):
                return Manifest(stored, "hit", age)
        if key not in self._fetches:  # joining a fetch in flight costs nothing
            self.fairness.charge_manifest()
        stale_ok = stored is not None and age < self._freshness.max_stale
        try:
            # With a stale answer at hand, the upstream gets `stale_after` (as for tags).
            async with asyncio.timeout(self._stale_after if stale_ok else None):
                fresh = await self._coalesced(
                    self._fetches, key, lambda: self._fetch_referrers(key, digest, stale_ok)
                )
        except TimeoutError:
            if stored is None:
                raise
            log.warning("serving referrers of %s@%s stale: upstream too slow", repo, digest)
            return Manifest(stored, "stale", age)
        except UpstreamError as exc:
            if stored is None or not stale_ok or not _upstream_trouble(exc):
                raise
            level = logging.DEBUG if isinstance(exc, Deferred) else logging.WARNING
            log.log(level, "serving referrers of %s@%s stale: %s", repo, digest, exc.message)
            return Manifest(stored, "stale", age)
        return Manifest(fresh, "miss" if stored is None else "revalidated", 0.0)

    async def _fetch_referrers(
        self, key: TagKey, digest: Digest, refresh: bool = False
    ) -> StoredManifest:
        """`refresh`: a cached answer can be served stale, so the rate-limit budget may
        keep the tag schema's manifest GET for misses."""
        body = await self._upstream.referrers(key.repo, digest, self._manifest_max)
        if body is None:  # no referrers API: the referrers tag schema
            try:
                remote = await self._upstream.get_manifest(
                    key.repo,
                    Reference(tag=key.tag),
                    OCI_INDEX,
                    self._manifest_max,
                    refresh=refresh,
                )
                body = remote.body
            except UpstreamError as exc:
                if exc.upstream_status != 404:
                    raise
                body = referrers.EMPTY  # neither: nothing refers to it
        index = referrers.index(referrers.descriptors(body))
        stored = StoredManifest(
            Digest("sha256", hashlib.sha256(index).hexdigest()), OCI_INDEX, index
        )

        async def remember() -> None:
            await self._store.put_manifest(stored)
            await self._store.put_tag(key, TagEntry(stored.digest, OCI_INDEX, self._clock()))

        await self._cache_write(remember())
        return stored

    # -- tags -------------------------------------------------------------------------

    async def tags(self, name: str, n: int | None, last: str | None) -> tuple[bytes, str | None]:
        repo = self.repo(name)
        self.fairness.charge_manifest()  # never cached: every tag list goes upstream
        return await self._upstream.tags(repo, n, last, TAGS_LIST_MAX_BYTES)


async def answer(blob: OpenBlob, spec: RangeSpec | None, head: bool, source: Source) -> Blob:
    """The response for an open blob: its range resolved, a body unless HEAD. The blob
    is released here unless its body goes out with the answer."""
    try:
        size = blob.size if spec is None else await blob.wait_size(spec.first)
        rng = spec.resolve(size) if spec is not None and size is not None else None
    except BaseException:
        await blob.aclose()
        raise
    if head:
        await blob.aclose()
        return Blob(size, rng, None, source)
    body = blob.body(rng.start, rng.end) if rng is not None else blob.body(0, None)
    return Blob(size, rng, body, source)


class SizeHints:
    """Blob sizes named by manifests fetched lately, per repository: a download of one
    of these digests through that repository may not grow past its descriptor's size.
    Bounded (least recent go)."""

    MAX_ENTRIES = 1 << 16

    def __init__(self) -> None:
        self._sizes: OrderedDict[tuple[str, Digest], int] = OrderedDict()

    def remember(self, repo: str, sizes: dict[Digest, int]) -> None:
        for digest, size in sizes.items():
            self._sizes[repo, digest] = size
            self._sizes.move_to_end((repo, digest))
        while len(self._sizes) > self.MAX_ENTRIES:
            self._sizes.popitem(last=False)

    def get(self, repo: str, digest: Digest) -> int | None:
        return self._sizes.get((repo, digest))


def _upstream_trouble(exc: UpstreamError) -> bool:
    """Failures that stale content may paper over: unreachable, timeouts, 5xx, 429.

    A 404, 401 or 403 is the upstream's answer, not its trouble: never hidden.
    """
    return exc.upstream_status is None or exc.upstream_status == 429 or (exc.upstream_status >= 500)
