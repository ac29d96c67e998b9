"""`GET /v2/_catalog`: the repositories this mirror has cached, as clients name them.

The source is the store's tag entries (a repository is listed while any of its tags is
cached; once eviction drops the last one it disappears). Names are what a client would
pull: with `?ns=<upstream>` that upstream's repositories as the upstream names them;
without, the default upstream's plainly and another's under its path prefix (an
upstream with neither is listed only with `ns`). Docker Hub's official images keep
their stored `library/` form, which pulls the same image.

Pagination follows the distribution spec (`n`, `last`, `Link: <...>; rel="next"`),
with Distribution's default page (100) and its cap (1000) — a larger `n` is lowered to
the cap rather than refused: the spec lets a registry return fewer than `n`.
"""

from __future__ import annotations

import asyncio
import bisect
import itertools
import time
from collections.abc import Callable
from urllib.parse import urlencode

from mirror.access import Access
from mirror.errors import RegistryError
from mirror.identity import Principal
from mirror.routing import Router
from mirror.store import Store

DEFAULT_PAGE = 100
MAX_PAGE = 1000
# Pages after the first (`last` given) read the scan the listing began with, up to this
# old: a client paging through 10k repositories must not make the mirror walk the index
# once per page. A first page rescans as soon as the store's tag count changed.
CACHE_SECONDS = 5.0


# One listed repository: (name as the client pulls it, upstream, upstream's repository).
Entry = tuple[str, str, str]


class Catalog:
    def __init__(
        self, store: Store, clock: Callable[[], float] = time.monotonic, ttl: float = CACHE_SECONDS
    ) -> None:
        self._store = store
        self._clock = clock
        self._ttl = ttl
        self._pairs: list[tuple[str, str]] = []
        self._read_at: float | None = None
        self._tags = -1  # the store's tag count at the last scan
        self._scan_seconds = 0.0  # how long it took
        self._lock = asyncio.Lock()
        # Per scan: the entries by name, per `ns` upstream (None: no ns), built once.
        self._named: dict[str | None, list[Entry]] = {}
        self._named_from: list[tuple[str, str]] | None = None

    async def pairs(self, first_page: bool = True) -> list[tuple[str, str]]:
        """(upstream, repository) pairs with a cached tag, sorted. Concurrent callers
        wait for one scan."""
        async with self._lock:
            now, tags = self._clock(), self._store.usage().tags
            age = None if self._read_at is None else now - self._read_at
            if (
                age is None
                or age >= self._ttl
                # A busy mirror adds tags all the time: clients asking for first pages
                # keep the scans to a third of one worker thread's time at most.
                or (first_page and tags != self._tags and age >= 2 * self._scan_seconds)
            ):
                # A scan of the index blocks: never in the event loop.
                self._pairs = await asyncio.to_thread(self._store.repositories)
                self._read_at, self._tags = now, tags
                self._scan_seconds = self._clock() - now
            return self._pairs

    async def page(
        self,
        router: Router,
        access: Access,
        who: Principal,
        ns: str | None,
        n: int,
        last: str | None,
    ) -> tuple[list[str], bool]:
        """At most `n` names after `last` that `who` may pull, in lexical order, and
        whether more follow; `ns` (containerd's) selects one upstream."""
        only = None if ns is None else router.for_ns(ns).name
        pairs = await self.pairs(first_page=last is None)
        if self._named_from is not pairs:  # a new scan
            self._named, self._named_from = {}, pairs
        if (entries := self._named.get(only)) is None:
            entries = await asyncio.to_thread(_entries, router, pairs, only)
            self._named[only] = entries
        # Naming, sorting and checking are pure CPU, but a caller allowed little of a
        # large cache walks all of it: in a worker thread, as the scan.
        return await asyncio.to_thread(_visible, router, access, who, entries, n, last)


def _entries(router: Router, pairs: list[tuple[str, str]], only: str | None) -> list[Entry]:
    entries = []
    for upstream, repo in pairs:
        if router.proxy(upstream) is None:  # an upstream no longer configured
            continue
        if only is not None:
            name: str | None = repo if upstream == only else None
        else:
            name = router.address(upstream, repo)
        if name is not None:
            entries.append((name, upstream, repo))
    entries.sort()
    return entries


def _visible(
    router: Router,
    access: Access,
    who: Principal,
    entries: list[Entry],
    n: int,
    last: str | None,
) -> tuple[list[str], bool]:
    start = 0 if last is None else bisect.bisect_right(entries, last, key=lambda e: e[0])
    shown: list[str] = []
    for name, upstream, repo in itertools.islice(entries, start, None):
        if not access.allows(who, upstream, repo) or not _policy_allows(router, upstream, repo):
            continue
        if len(shown) == n:
            return shown, True
        shown.append(name)
    return shown, False


def _policy_allows(router: Router, upstream: str, repo: str) -> bool:
    """The upstream's allow/deny lists, as for a pull (they may have changed since)."""
    proxy = router.proxy(upstream)
    try:
        return proxy is not None and bool(proxy.repo(repo))
    except RegistryError:
        return False


def parse_n(text: str | None) -> int:
    """The page size a client asked for; PAGINATION_NUMBER_INVALID for anything but a
    non-negative integer."""
    if not text:  # absent or empty: the default, as Distribution does
        return DEFAULT_PAGE
    if not (text.isascii() and text.isdigit()) or len(text) > 12:
        raise RegistryError(
            "PAGINATION_NUMBER_INVALID",
            "n must be a non-negative integer",
            detail={"n": text[:20]},
        )
    return min(int(text), MAX_PAGE)


def next_link(n: int, last: str, ns: str | None) -> str:
    params = {"n": str(n), "last": last}
    if ns is not None:
        params["ns"] = ns
    return f'</v2/_catalog?{urlencode(params)}>; rel="next"'
