"""How long a tag's answer is trusted, and how long it may be served stale.

A tag is a pointer that can move; content by digest never changes. Within its TTL a
tag is answered from the cache with no upstream request. After it, the mirror asks the
upstream with a `HEAD` (Docker Hub does not count HEADs against the pull rate limit)
and fetches the body only if the digest moved. For `stale_while_revalidate` past the
TTL, the client does not wait for that HEAD: it gets the cached answer at once and the
HEAD runs in the background (RFC 5861's stale-while-revalidate). When the upstream
cannot answer (down, 5xx, 429), the last known answer is served, marked stale, until
`max_stale`. A tag many clients pull is revalidated shortly before it expires
(`refresh_ahead_pulls`), so it never expires at all while it is popular.
"""

from __future__ import annotations

from dataclasses import dataclass
from fnmatch import fnmatchcase


@dataclass(frozen=True, slots=True)
class TTLRule:
    """`pattern` matches `<repository>:<tag>` (fnmatch: `*`, `?`, `[...]`).
    `stale_while_revalidate` None: the scope's default window."""

    pattern: str
    ttl: float
    stale_while_revalidate: float | None = None


@dataclass(frozen=True, slots=True)
class TagFreshness:
    ttl: float
    stale_while_revalidate: float


@dataclass(frozen=True, slots=True)
class Freshness:
    default_ttl: float
    max_stale: float
    rules: tuple[TTLRule, ...] = ()
    stale_while_revalidate: float = 0.0
    # Tags pulled more than this many times within their TTL are revalidated in the
    # background `refresh_ahead` seconds (at most half the TTL) before they expire,
    # so a popular tag never makes a client wait; 0: never.
    refresh_ahead_pulls: int = 0
    refresh_ahead: float = 10.0

    def of(self, repo: str, tag: str) -> TagFreshness:
        """The first matching rule wins; otherwise the defaults."""
        target = f"{repo}:{tag}"
        for rule in self.rules:
            if fnmatchcase(target, rule.pattern):
                window = rule.stale_while_revalidate
                return TagFreshness(
                    rule.ttl, self.stale_while_revalidate if window is None else window
                )
        return TagFreshness(self.default_ttl, self.stale_while_revalidate)

    def ttl(self, repo: str, tag: str) -> float:
        return self.of(repo, tag).ttl
