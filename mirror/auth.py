"""Upstream authentication: challenges, the token flow, and where credentials may go.

Docker Hub's flow: a request answered 401 carries
`WWW-Authenticate: Bearer realm="https://auth.docker.io/token",service="registry.docker.io",
scope="repository:library/alpine:pull"`; the client fetches a token from the realm
(anonymously or with Basic credentials) and retries.

The policy lives here, the transport does not: `UpstreamAuth` decides which realm is
trusted and what to send, and asks the upstream module (the only one that speaks
HTTP) to fetch the token.
"""

from __future__ import annotations

import base64
import ipaddress
import json
import logging
import re
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from urllib.parse import SplitResult, urlsplit

from mirror.domains import registrable_domain
from mirror.errors import UpstreamError
from mirror.metrics import Metrics
from mirror.tokens import TokenCache

log = logging.getLogger(__name__)

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


# Registry platforms where one registrable domain holds many customers' registries:
# a token realm there must be on the registry's own host (or in token_hosts).
MULTI_TENANT_DOMAINS = (
    "amazonaws.com",
    "azurecr.io",
    "jfrog.io",
    "pkg.dev",
    "ocir.io",
    "gitlab.io",
    "herokuapp.com",
)


@dataclass(frozen=True, slots=True)
class Credentials:
    username: str
    password: str


# RFC 6750 b64token, leniently: visible ASCII, no spaces (JWTs and opaque tokens fit).
_TOKEN_RE = re.compile(r"[!-~]{1,16384}")

# GET url with params and headers -> (status, body): the upstream module's transport.
TokenGet = Callable[[str, dict[str, str], dict[str, str]], Awaitable[tuple[int, bytes]]]


class UpstreamAuth:
    """How to authenticate to one upstream: learned from its challenges, with tokens
    cached per scope and credentials sent only where they belong."""

    def __init__(
        self,
        name: str,
        url: str,
        metrics: Metrics,
        get: TokenGet,
        *,
        credentials: Credentials | None = None,
        token_hosts: tuple[str, ...] = (),
        other_upstreams: tuple[str, ...] = (),
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._name = name
        self._url = urlsplit(url)
        self._metrics = metrics
        self._get = get
        self._credentials = credentials
        self._token_hosts = frozenset(h.lower() for h in token_hosts)
        # The other upstreams' origins: a realm there is refused (credential isolation).
        self._foreign_origins = frozenset(
            (p.scheme, (p.hostname or "").lower(), _port(p))
            for p in map(urlsplit, other_upstreams)
            if p != self._url
        )
        self._tokens = TokenCache(clock)
        # Learned from the first 401, so later requests carry a token up front
        # instead of paying a 401 round trip each.
        self._challenge: Challenge | None = None

    def learn(self, challenge: Challenge | None, *, from_upstream: bool) -> bool:
        """Take a 401's challenge; False when it leaves nothing to retry with.

        Only the upstream itself may tell us how to authenticate: a 401 from a
        redirect target (a CDN, anything) must not steer our credentials.
        """
        if (
            challenge is None
            or not from_upstream
            or (challenge.scheme == "basic" and self._credentials is None)
        ):
            return False
        if challenge.scheme == "bearer" and challenge.realm:
            # Checked before it is kept: a refused challenge must fail this request
            # only, never every later one (public repositories need no token at all).
            self._check_realm(challenge.realm)
        self._challenge = challenge
        return True

    def _check_realm(self, realm: str) -> None:
        if not self.realm_allowed(realm):
            # A registry (or whoever answers for it) naming a foreign token service
            # would learn our credentials, or hand us tokens from anywhere. The
            # upstream misbehaves: trouble that a stale tag may paper over.
            log.warning("upstream %s named a foreign token realm; refused", self._name)
            raise UpstreamError(
                "UNAUTHORIZED",
                f"upstream {self._name} named a token realm on a host not allowed for it",
                status=502,
            )

    async def authorization(
        self, scope: str | None, *, rejected: str | None = None, asked: str | None = None
    ) -> str | None:
        """The Authorization value for a request needing `scope`.

        Tokens are cached under the scope we derive from the repository, so the next
        request finds them before sending; a token is fetched for the scope the
        upstream `asked` for in its challenge, when it named one. After a 401,
        `rejected` is the value that failed: a fresh token is fetched only if nobody
        has replaced it meanwhile, so N concurrent 401s cost one token fetch.
        """
        challenge = self._challenge
        if challenge is None:
            return None
        if challenge.scheme == "basic":
            return self._basic()
        if challenge.scheme != "bearer" or not challenge.realm:
            return None
        key = (challenge.realm, challenge.service or "", scope or "")
        token = self._tokens.get(key)
        if token is not None and f"Bearer {token}" != rejected:
            return f"Bearer {token}"
        async with self._tokens.lock(key):
            token = self._tokens.get(key)
            if token is not None and f"Bearer {token}" != rejected:
                return f"Bearer {token}"
            self._tokens.invalidate(key)
            token, expires_in = await self._fetch_token(challenge, asked or scope)
            self._tokens.put(key, token, expires_in)
            return f"Bearer {token}"

    def realm_allowed(self, realm: str) -> bool:
        """The upstream's own host (a token service on another port of it, as
        Distribution and Harbor set-ups often have), its registrable domain over https
        on the default port (registry-1.docker.io -> auth.docker.io), or a host in
        `token_hosts`. Never another configured upstream's origin (its credentials
        would reach that registry), never plain http for an https upstream."""
        try:
            parts = urlsplit(realm)
            host = (parts.hostname or "").lower()
            port = _port(parts)  # raises on a port that is not a number
        except ValueError:
            return False  # unparsable: certainly not a realm we trust
        if parts.scheme not in ("http", "https") or not host:
            return False
        if (parts.scheme, host, port) in self._foreign_origins:
            return False
        if self._url.scheme == "https" and parts.scheme != "https":
            return False  # a token fetched in clear text could be swapped on the way
        if host in self._token_hosts or parts.netloc.lower() in self._token_hosts:
            return True
        own = (self._url.hostname or "").lower()
        if host == own:
            return True
        if parts.scheme != "https" or parts.port not in (None, 443):
            return False
        if is_address(host) or is_address(own):
            return False  # addresses have no registrable domain to share
        domain = registrable_domain(own)
        if domain is None or domain != registrable_domain(host):
            return False
        # On shared registry platforms the registrable domain is everybody's
        # (attacker.azurecr.io, another account's ECR): only the registry's own host.
        return not domain.endswith(MULTI_TENANT_DOMAINS)

    def _basic(self) -> str | None:
        if self._credentials is None:
            return None
        pair = f"{self._credentials.username}:{self._credentials.password}".encode()
        return "Basic " + base64.b64encode(pair).decode()

    def _may_send_credentials(self, realm: str) -> bool:
        """Basic credentials go to an allowed realm (`realm_allowed`, which already
        refuses plain http for an https upstream) over https, or on the upstream's
        own host: never in clear text to another host."""
        parts = urlsplit(realm)
        return parts.scheme == "https" or parts.hostname == self._url.hostname

    async def _fetch_token(self, challenge: Challenge, scope: str | None) -> tuple[str, object]:
        assert challenge.realm is not None
        params = {}
        if challenge.service:
            params["service"] = challenge.service
        if scope:
            params["scope"] = scope
        headers = {}
        if (basic := self._basic()) is not None and self._may_send_credentials(challenge.realm):
            headers["Authorization"] = basic
        result = "error"  # counted once, whichever way this ends
        try:
            status, body = await self._get(challenge.realm, params, headers)
            token, expires_in = _token_from(status, body)
            result = "ok"
            return token, expires_in
        except UpstreamError as exc:
            if exc.code == "UNAUTHORIZED":
                result = "refused"
            raise
        finally:
            self._metrics.token_fetches.labels(self._name, result).inc()


def _token_from(status: int, body: bytes) -> tuple[str, object]:
    if status in (401, 403):
        raise UpstreamError(
            "UNAUTHORIZED",
            "the upstream token service refused our credentials",
            upstream_status=status,
        )
    if status != 200:
        raise UpstreamError(
            "UNAVAILABLE",
            f"token service answered {status}",
            status=502,
            upstream_status=status,
        )
    try:
        data = json.loads(body)
        token = data.get("token") or data.get("access_token")
    except (ValueError, AttributeError, RecursionError):
        token = None
    if not isinstance(token, str) or not token:
        raise UpstreamError("UNAVAILABLE", "token service returned no token", status=502)
    if _TOKEN_RE.fullmatch(token) is None:
        # It goes into an Authorization header: CR/LF or non-ASCII would break the
        # request (or inject headers into it).
        raise UpstreamError("UNAVAILABLE", "token service returned a malformed token", status=502)
    return token, data.get("expires_in")


def _port(parts: SplitResult) -> int:
    return parts.port or (443 if parts.scheme == "https" else 80)


def is_address(host: str) -> bool:
    """An IP address (bracketed or not) or `localhost`: a name no DNS answer decides."""
    try:
        ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        return host == "localhost"
    return True
