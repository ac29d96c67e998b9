"""Which (upstream, repository) pairs the shared cache may serve a digest for.

Content is cached once per digest and shared by every upstream and repository, but a
digest is no secret (manifests, logs and build output show them). Knowing a private
layer's digest must not get it through another upstream's name or another repository.
So each digest carries the pairs it was fetched for or confirmed in (its scopes), and
content by digest is served for any other pair only once that upstream says it has it:

    known pair (memory, then the store)       served; no upstream request
    unknown pair, the upstream answers 2xx    recorded, then served from the cache
    unknown pair, it answers 404, 401, 403    404 BLOB_UNKNOWN / MANIFEST_UNKNOWN
    the upstream in trouble (unreachable,     its error (502, 504, 429): never served
      timeout, 5xx, 429)                        unchecked, nothing recorded

The question is a HEAD with the mirror's credentials for that upstream, through its
remote store (tiers, then the registry). A manifest fetched for a pair records its own
digest and every digest it references (`manifests.Checked.references`): a registry
serves a manifest only if what it references is in that repository, so a normal pull
asks nothing extra. Confirmations are remembered in a bounded memory in front of the
store, so a hit costs no more store reads than before; with the store's index down
(Redis), that memory is all there is, and anything else is asked again.
"""

from __future__ import annotations

import logging
import sqlite3
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Iterable
from contextlib import AbstractContextManager, nullcontext

from mirror.errors import RegistryError, UpstreamError
from mirror.inflight import SingleFlight
from mirror.metrics import Kind, Metrics
from mirror.reference import Digest
from mirror.store import Store

log = logging.getLogger(__name__)

# Confirmed (digest, repository) pairs remembered per upstream: ~200 bytes each.
MEMORY = 1 << 15
# What the upstream may say to mean "not here for you": refused, never retried.
_REFUSED = frozenset({401, 403, 404})
_UNKNOWN = {"blob": "BLOB_UNKNOWN", "manifest": "MANIFEST_UNKNOWN"}


class Scopes:
    """One upstream's view: may `digest` be served from the cache for `repo`?"""

    def __init__(self, store: Store, upstream: str, metrics: Metrics) -> None:
        self._store = store
        self._upstream = upstream
        self._metrics = metrics
        self._known: OrderedDict[tuple[Digest, str], None] = OrderedDict()
        self._checks: SingleFlight[None] = SingleFlight()

    async def aclose(self) -> None:
        await self._checks.aclose()

    async def known(self, digest: Digest, repo: str) -> bool:
        key = (digest, repo)
        if key in self._known:
            self._known.move_to_end(key)
            return True
        try:
            found = await self._store.has_scope(digest, self._upstream, repo)
        except (OSError, sqlite3.Error) as exc:
            log.warning("cannot read the scopes of %s (%s); asking the upstream", digest, exc)
            found = False
        if found:
            self._remember(key)
        return found

    async def record(self, digests: Iterable[Digest], repo: str) -> None:
        """`repo` of this upstream holds `digests` (it just served or confirmed them)."""
        new = [d for d in dict.fromkeys(digests) if (d, repo) not in self._known]
        if not new:
            return
        for digest in new:
            self._remember((digest, repo))
        try:
            await self._store.add_scopes(new, self._upstream, repo)
        except (OSError, sqlite3.Error) as exc:
            # Remembered in memory still; other processes ask the upstream once more.
            log.warning("cannot record scopes in the cache (%s)", exc)

    async def check(
        self,
        kind: Kind,
        digest: Digest,
        repo: str,
        ask: Callable[[], Awaitable[object]],
        charge: Callable[[], AbstractContextManager[object]] = nullcontext,
    ) -> None:
        """Return if `digest` may be served for `repo`; else raise. `ask` is the HEAD
        that confirms it (run once for concurrent checks of the same pair). `charge`
        is held by the request that starts a check, never by one joining it: the
        HEAD is an upstream request like any other (per-client limits, and a refusal
        is not remembered), but one client's limit must not fail another's request."""
        if await self.known(digest, repo):
            return
        key = (kind, digest, repo)
        with charge() if key not in self._checks else nullcontext():
            await self._checks.run(key, lambda: self._confirm(kind, digest, repo, ask))

    async def _confirm(
        self, kind: Kind, digest: Digest, repo: str, ask: Callable[[], Awaitable[object]]
    ) -> None:
        try:
            await ask()
        except UpstreamError as exc:
            if exc.upstream_status in _REFUSED:
                self._metrics.scope_checks.labels(self._upstream, "refused").inc()
                log.info(
                    "%s %s is cached, but %s/%s does not serve it to us (%s): refused",
                    kind,
                    digest,
                    self._upstream,
                    repo,
                    exc.upstream_status,
                )
                raise RegistryError(
                    _UNKNOWN[kind], f"{kind} unknown to {self._upstream} in {repo}"
                ) from None
            self._metrics.scope_checks.labels(self._upstream, "error").inc()
            raise
        self._metrics.scope_checks.labels(self._upstream, "confirmed").inc()
        await self.record([digest], repo)

    def _remember(self, key: tuple[Digest, str]) -> None:
        self._known[key] = None
        self._known.move_to_end(key)
        while len(self._known) > MEMORY:
            self._known.popitem(last=False)
