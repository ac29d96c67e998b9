"""Docker Hub's pull rate limit, as a registry front would enforce it.

Hub counts manifest GETs only (a HEAD is free), tells the count on every manifest
answer (`ratelimit-limit: 100;w=21600`, `ratelimit-remaining: 76;w=21600`), and
answers 429 `TOOMANYREQUESTS` once it is spent. Shared by the in-process fake upstream
and the e2e front that stands before the real registry.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class Quota:
    limit: int
    remaining: int
    window: int = 21600
    retry_after: str | None = "30"  # sent with the 429; None: none (as Hub often does)
    gets: int = 0  # manifest GETs counted against the limit
    refused: int = 0  # manifest GETs answered 429

    def take(self, method: str) -> int:
        """Count a manifest request; the status it gets (200, or 429 when spent)."""
        if method != "GET":
            return 200
        if self.remaining <= 0:
            self.refused += 1
            return 429
        self.remaining -= 1
        self.gets += 1
        return 200

    def headers(self) -> dict[str, str]:
        return {
            "ratelimit-limit": f"{self.limit};w={self.window}",
            "ratelimit-remaining": f"{max(0, self.remaining)};w={self.window}",
            "docker-ratelimit-source": "127.0.0.1",
        }

    def refusal_headers(self) -> dict[str, str]:
        extra = {} if self.retry_after is None else {"retry-after": self.retry_after}
        return {**self.headers(), **extra}

    def reset(self) -> None:
        """The window has passed: the whole limit again."""
        self.remaining = self.limit
