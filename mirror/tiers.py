"""Mirror tiers: an upstream's mirrors tried first, in order, then the registry itself.

A node-local mirror in front of a central one, as Docker's `registry-mirrors` and
containerd's `hosts.toml` chain endpoints. `Tiers` is a remote store over several
`Upstream`s (each with its own client, credentials and `?ns=`), so the proxy does not
know tiers exist:

- every call goes to the first tier whose circuit is closed; any failure there tries
  the next, and the registry is always tried last;
- a tier that does not answer (connection error, timeout), or sends bytes that fail
  their digest or break half-way, opens its circuit: it is skipped for `backoff`
  seconds, then given one trial request (half-open) and used again once it answers. A
  404, 401, 403 or 5xx is the tier's answer: the next tier is asked, but the circuit
  stays closed (a warm central whose registry is down still serves what it holds);
- a 429 from a tier is passed on: the tier is rate-limited by the registry, and every
  node asking the registry itself would spend the same quota faster;
- a blob body that breaks half-way continues from the next tier with `Range`;
- content by digest may come from any tier: the proxy verifies it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Literal, TypeVar

from mirror import logs
from mirror.budget import Deferred, Refused
from mirror.errors import RegistryError, UpstreamError
from mirror.metrics import Metrics
from mirror.reference import Digest, Reference
from mirror.store import BlobSource
from mirror.upstream import ManifestHead, RemoteManifest, Upstream

log = logging.getLogger(__name__)

T = TypeVar("T")
State = Literal["closed", "open", "half-open"]
_STATE_VALUE = {"closed": 0, "open": 1, "half-open": 2}


def unreachable(exc: UpstreamError) -> bool:
    """The tier itself failed (no answer, a timeout): its circuit opens. A 5xx is an
    answer: a warm central whose registry is down answers 502 for what it lacks and
    200 for what it holds, so it stays in use (the next tier is asked this time)."""
    return exc.upstream_status is None


@dataclass
class Tier:
    name: str
    upstream: Upstream
    registry: bool  # the last resort: never skipped
    state: State = "closed"
    until: float = 0.0
    failures: int = field(default=0)


class Tiers:
    def __init__(
        self,
        tiers: list[Tier],
        metrics: Metrics,
        *,
        backoff: float = 30.0,
        ttl: Callable[[str, str], float] = lambda repo, tag: 300.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._ttl = ttl  # our tag TTL for (repo, tag): what tiers are asked to honour
        assert tiers and tiers[-1].registry
        self._tiers = tiers
        self._registry = tiers[-1].upstream
        self.name = self._registry.name
        self.docker_hub = self._registry.docker_hub
        self._metrics = metrics
        self._backoff = backoff
        self._clock = clock
        for tier in tiers:
            metrics.add_tier(self.name, tier.name)

    async def aclose(self) -> None:
        for tier in self._tiers:
            await tier.upstream.aclose()

    # -- the circuit ------------------------------------------------------------------

    def _usable(self) -> list[Tier]:
        """The tiers to try now, in order: closed ones, and open ones whose back-off
        is over (each then gets one trial request); the registry always."""
        now = self._clock()
        usable = []
        for tier in self._tiers:
            if tier.registry or tier.state == "closed":
                usable.append(tier)
            elif tier.state == "open" and now >= tier.until:
                self._set(tier, "half-open")
                usable.append(tier)
            else:
                self._metrics.tier_requests.labels(self.name, tier.name, "skipped").inc()
        return usable

    def failed(self, tier: Tier, why: str) -> None:
        """Open the tier's circuit (the registry has none: it is always tried)."""
        self._metrics.tier_requests.labels(self.name, tier.name, "error").inc()
        if tier.registry:
            return
        tier.failures += 1
        tier.until = self._clock() + self._backoff
        if tier.state != "open":
            log.warning(
                "mirror tier %s of %s failed (%s); skipping it for %.0f s",
                tier.name,
                self.name,
                why,
                self._backoff,
            )
        self._set(tier, "open")

    def _answered(self, tier: Tier) -> None:
        self._metrics.tier_requests.labels(self.name, tier.name, "ok").inc()
        self._up(tier)
        if (record := logs.current.get()) is not None:
            record.tier = tier.name

    def _up(self, tier: Tier) -> None:
        """The tier answered: its circuit closes."""
        if tier.state != "closed":
            log.info("mirror tier %s of %s answers again", tier.name, self.name)
            self._set(tier, "closed")

    def _set(self, tier: Tier, state: State) -> None:
        tier.state = state
        self._metrics.tier_state.labels(self.name, tier.name).set(_STATE_VALUE[state])

    async def _first(self, call: Callable[[Tier], Awaitable[T]], skip: tuple[Tier, ...] = ()) -> T:
        """`call` on each usable tier (but `skip`) in turn until one answers; else the
        last error."""
        error: UpstreamError | None = None
        for tier in self._usable():
            if tier in skip and not tier.registry:
                continue
            settled = False
            try:
                result = await call(tier)
            except (Refused, Deferred):
                # The registry's own budget kept the GET: no request was made, so no
                # answer to count for or against it.
                settled = True
                raise
            except UpstreamError as exc:
                settled = True
                if unreachable(exc):
                    self.failed(tier, exc.message)
                else:
                    # An answer (404, 401, 403, 429, 5xx): the tier is up, and stays
                    # in use; the next tier is asked this time.
                    self._up(tier)
                    self._metrics.tier_requests.labels(self.name, tier.name, "error").inc()
                if exc.upstream_status == 429:
                    # The tier is rate-limited by the registry: every node asking the
                    # registry itself would only spend the same quota faster.
                    raise
                error = exc
                continue
            else:
                settled = True
            finally:
                if not settled and tier.state == "half-open":
                    # A trial that ended otherwise (cancelled): tried again later.
                    self._set(tier, "open")
                    tier.until = self._clock() + self._backoff
            self._answered(tier)
            return result
        assert error is not None  # the registry is always tried
        raise error

    # -- the remote store -------------------------------------------------------------

    def _max_age(self, tier: Tier, repo: str, ref: Reference) -> float | None:
        """A tier is asked for a tag no older than our own TTL for it: then the user
        sees at most one TTL of staleness however many tiers there are."""
        if tier.registry or ref.tag is None:
            return None
        return self._ttl(repo, ref.tag)

    async def get_manifest(
        self,
        repo: str,
        ref: Reference,
        accept: str | None,
        max_bytes: int,
        max_age: float | None = None,
        *,
        refresh: bool = False,
    ) -> RemoteManifest:
        async def get(tier: Tier) -> RemoteManifest:
            fresh = self._max_age(tier, repo, ref)
            remote = await tier.upstream.get_manifest(
                repo, ref, accept, max_bytes, fresh, refresh=refresh
            )
            if fresh is not None and remote.age >= fresh:
                # Older than we asked: a tier serving stale (its registry is down) or
                # one that ignores max-age. Counted from now, or the tag would expire
                # at once and be asked for again on every request.
                remote = dataclasses.replace(remote, age=0.0)
            if not tier.registry and not _matches(remote, ref):
                # Wrong bytes from a tier: try the next one (the proxy verifies again).
                raise UpstreamError("DIGEST_INVALID", "tier sent a manifest that failed its digest")
            return remote

        return await self._first(get)

    async def head_manifest(
        self, repo: str, ref: Reference, accept: str | None, max_age: float | None = None
    ) -> ManifestHead:
        async def head(tier: Tier) -> ManifestHead:
            fresh = self._max_age(tier, repo, ref)
            answer = await tier.upstream.head_manifest(repo, ref, accept, fresh)
            if fresh is not None and answer.age >= fresh:
                answer = dataclasses.replace(answer, age=0.0)  # as in get_manifest
            return answer

        return await self._first(head)

    async def head_blob(self, repo: str, digest: Digest) -> int | None:
        return await self._first(lambda t: t.upstream.head_blob(repo, digest))

    async def tags(
        self, repo: str, n: int | None, last: str | None, max_bytes: int
    ) -> tuple[bytes, str | None]:
        return await self._first(lambda t: t.upstream.tags(repo, n, last, max_bytes))

    async def referrers(self, repo: str, digest: Digest, max_bytes: int) -> bytes | None:
        return await self._first(lambda t: t.upstream.referrers(repo, digest, max_bytes))

    async def open_blob(
        self, repo: str, digest: Digest, max_bytes: int, start: int = 0
    ) -> TieredBlob:
        blob = TieredBlob(self, repo, digest, max_bytes, start)
        await blob.open()
        return blob


class TieredBlob:
    """A blob body from the first tier that answers; when it breaks half-way, the
    rest comes from the next tier with `Range`."""

    def __init__(self, tiers: Tiers, repo: str, digest: Digest, max_bytes: int, start: int):
        self._tiers = tiers
        self._repo = repo
        self._digest = digest
        self._max = max_bytes
        self._offset = start
        self._body: BlobSource | None = None
        self._tier: Tier | None = None
        self._used: list[Tier] = []
        self.size: int | None = None

    async def open(self) -> None:
        await self._next(skip=())
        assert self._body is not None
        self.size = self._body.size

    async def _next(self, skip: tuple[Tier, ...]) -> None:
        async def get(tier: Tier) -> tuple[Tier, BlobSource]:
            upstream = tier.upstream
            return tier, await upstream.open_blob(self._repo, self._digest, self._max, self._offset)

        tier, body = await self._tiers._first(get, skip)
        self._tier, self._body = tier, body
        self._used.append(tier)

    async def __aiter__(self) -> AsyncIterator[bytes]:
        tiers = self._tiers
        while True:
            assert self._body is not None and self._tier is not None
            counter = tiers._metrics.tier_bytes.labels(tiers.name, self._tier.name)
            try:
                async for chunk in self._body:
                    self._offset += len(chunk)
                    counter.inc(len(chunk))
                    yield chunk
                return
            except UpstreamError as exc:
                if self._tier.registry:
                    raise
                log.warning(
                    "blob %s from tier %s broke at %d bytes (%s); the next tier goes on",
                    self._digest,
                    self._tier.name,
                    self._offset,
                    exc.message,
                )
                tiers.failed(self._tier, exc.message)
                await self._body.aclose()
                await self._next(skip=tuple(self._used))

    async def mismatched(self) -> None:
        # Every tier that sent bytes of it is suspect: the next download skips them.
        for tier in self._used:
            self._tiers.failed(tier, f"blob {self._digest} failed its digest")

    async def aclose(self) -> None:
        if self._body is not None:
            await self._body.aclose()


def _matches(remote: RemoteManifest, ref: Reference) -> bool:
    expected = ref.digest
    if expected is None:
        header = remote.digest_header
        if not header:
            return True  # nothing to check against here; the proxy decides
        try:
            expected = Digest.parse(header.strip())
        except RegistryError:
            return True  # an unusable header: the proxy refuses it the same way
    return hashlib.new(expected.algorithm, remote.body).hexdigest() == expected.hex
