"""Upstream authentication: `WWW-Authenticate` challenges and a bearer-token cache.

Docker Hub's flow: a request answered 401 carries
`WWW-Authenticate: Bearer realm="https://auth.docker.io/token",service="registry.docker.io",
scope="repository:library/alpine:pull"`; the client fetches a token from the realm
(anonymously or with Basic credentials) and retries.
"""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field

# auth-param = token "=" ( token / quoted-string ); quoted strings may hold commas.
_PARAM_RE = re.compile(r'\s*([!#$%&\'*+.^_`|~0-9A-Za-z-]+)\s*=\s*("(?:[^"\\]|\\.)*"|[^,\s]*)\s*,?')


@dataclass(frozen=True, slots=True)
class Challenge:
    scheme: str  # lower-case: "bearer" or "basic"
    params: dict[str, str] = field(default_factory=dict)

    @property
    def realm(self) -> str | None:
        return self.params.get("realm")

    @property
    def service(self) -> str | None:
        return self.params.get("service")

    @property
    def scope(self) -> str | None:
        return self.params.get("scope")


def parse_www_authenticate(header: str) -> Challenge | None:
    """Parse one challenge. Returns None for an empty or unparsable header."""
    header = header.strip()
    if not header:
        return None
    scheme, _, rest = header.partition(" ")
    params: dict[str, str] = {}
    pos = 0
    rest = rest.strip()
    while pos < len(rest):
        m = _PARAM_RE.match(rest, pos)
        if m is None or m.end() == pos:
            break
        key, value = m.group(1).lower(), m.group(2)
        if value.startswith('"') and value.endswith('"') and len(value) >= 2:
            value = re.sub(r"\\(.)", r"\1", value[1:-1])
        params[key] = value
        pos = m.end()
    return Challenge(scheme.lower(), params)


@dataclass(frozen=True, slots=True)
class Token:
    value: str
    expires_at: float  # monotonic seconds


# Docker's token spec: when a server omits expires_in, assume 60 seconds.
DEFAULT_EXPIRES_IN = 60
# Past this many per-scope locks, idle ones are dropped.
MAX_IDLE_ENTRIES = 4096
# Refresh this early so a token never expires between lookup and use.
REFRESH_MARGIN = 10.0


def token_lifetime(expires_in: object) -> float:
    try:
        seconds = float(expires_in)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        seconds = DEFAULT_EXPIRES_IN
    if seconds <= 0:
        seconds = DEFAULT_EXPIRES_IN
    return seconds


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
