"""How long a tag's answer is trusted, and how long it may be served stale.

A tag is a pointer that can move; content by digest never changes. Within its TTL a
tag is answered from the cache with no upstream request. After it, the mirror asks the
upstream with a `HEAD` (Docker Hub does not count HEADs against the pull rate limit)
and fetches the body only if the digest moved. When the upstream cannot answer
(down, 5xx, 429), the last known answer is served, marked stale, until `max_stale`.
"""

from __future__ import annotations

from dataclasses import dataclass
from fnmatch import fnmatchcase


@dataclass(frozen=True, slots=True)
class TTLRule:
    """`pattern` matches `<repository>:<tag>` (fnmatch: `*`, `?`, `[...]`)."""

    pattern: str
    ttl: float


@dataclass(frozen=True, slots=True)
class Freshness:
    default_ttl: float
    max_stale: float
    rules: tuple[TTLRule, ...] = ()

    def ttl(self, repo: str, tag: str) -> float:
        """The first matching rule wins; otherwise the default."""
        target = f"{repo}:{tag}"
        for rule in self.rules:
            if fnmatchcase(target, rule.pattern):
                return rule.ttl
        return self.default_ttl
