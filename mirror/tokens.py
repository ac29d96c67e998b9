"""Bearer tokens per (realm, service, scope), with one fetch in flight per key."""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Callable
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Token:
    value: str
    expires_at: float  # monotonic seconds


# Docker's token spec: when a server omits expires_in, assume 60 seconds.
DEFAULT_EXPIRES_IN = 60
# Tokens are refetched at least this often, whatever their expires_in.
MAX_LIFETIME = 86400.0
# Past this many per-scope locks, idle ones are dropped.
MAX_IDLE_ENTRIES = 4096
# Refresh this early so a token never expires between lookup and use.
REFRESH_MARGIN = 10.0


def token_lifetime(expires_in: object) -> float:
    """Seconds a token lives: what the token service says, within reason (a huge,
    infinite or NaN value from a hostile service must neither crash nor pin a token)."""
    try:
        seconds = float(expires_in)  # type: ignore[arg-type]
    except (TypeError, ValueError, OverflowError):
        seconds = DEFAULT_EXPIRES_IN
    if not math.isfinite(seconds) or seconds <= 0:
        seconds = DEFAULT_EXPIRES_IN
    return min(seconds, MAX_LIFETIME)


class TokenCache:
    """Tokens per (realm, service, scope), with one fetch in flight per key.

    Concurrent pulls of one repository would otherwise fetch one token each.
    """

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._tokens: dict[tuple[str, str, str], Token] = {}
        self._locks: dict[tuple[str, str, str], asyncio.Lock] = {}

    def get(self, key: tuple[str, str, str]) -> str | None:
        token = self._tokens.get(key)
        if token is None:
            return None
        if token.expires_at - REFRESH_MARGIN <= self._clock():
            del self._tokens[key]
            return None
        return token.value

    def put(self, key: tuple[str, str, str], value: str, expires_in: object) -> None:
        lifetime = token_lifetime(expires_in)
        # A short-lived token is refreshed at half-life rather than never cached.
        margin = min(REFRESH_MARGIN, lifetime / 2)
        self._tokens[key] = Token(value, self._clock() + lifetime - margin + REFRESH_MARGIN)

    def invalidate(self, key: tuple[str, str, str]) -> None:
        self._tokens.pop(key, None)

    def lock(self, key: tuple[str, str, str]) -> asyncio.Lock:
        lock = self._locks.get(key)
        if lock is None:
            if len(self._locks) >= MAX_IDLE_ENTRIES:
                self._prune()
            lock = self._locks[key] = asyncio.Lock()
        return lock

    def _prune(self) -> None:
        # Clients can name any number of repositories: forget idle locks and expired
        # tokens instead of growing without bound.
        now = self._clock()
        self._locks = {k: v for k, v in self._locks.items() if v.locked()}
        self._tokens = {k: t for k, t in self._tokens.items() if t.expires_at > now}
