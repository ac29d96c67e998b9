"""The only module that talks to the upstream registry.

It owns authentication (Bearer token flow or Basic), redirects (Docker Hub answers
blob GETs with a 307 to a CDN host, which must never see our `Authorization`), and
maps upstream failures to the error table.
"""

from __future__ import annotations

import base64
import ipaddress
import logging
import ssl
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from urllib.parse import SplitResult, urljoin, urlsplit

import httpx

from mirror import logs
from mirror.auth import Challenge, TokenCache, parse_www_authenticate
from mirror.config import DOCKER_HUB, DOCKER_HUB_ALIASES
from mirror.domains import registrable_domain
from mirror.errors import UpstreamError
from mirror.metrics import Metrics

log = logging.getLogger(__name__)

MAX_REDIRECTS = 5
_REDIRECTS = frozenset({301, 302, 303, 307, 308})
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


def make_client(
    connect_timeout: float, read_timeout: float, *, verify: ssl.SSLContext | bool = True
) -> httpx.AsyncClient:
    """One pooled client per upstream for the app's lifetime, on the aiohttp transport.

    httpx's default transport reads bodies at ~0.6 GB/s (CPU bound); the aiohttp
    transport reaches ~2.9 GB/s with 1 MiB reads once malloc is tuned
    (mirror/tuning.py; bench/transport.py, docs/benchmarks.md).
    """
    from httpx_aiohttp import AiohttpTransport
    from httpx_aiohttp.transport import AiohttpResponseStream

    # The transport reads 16 KiB at a time by default; aiohttp's read(n) returns
    # whatever is buffered up to n, so a large n costs nothing on slow links.
    AiohttpResponseStream.CHUNK_SIZE = 1 << 20
    timeout = httpx.Timeout(
        connect=connect_timeout, read=read_timeout, write=read_timeout, pool=connect_timeout
    )
    limits = httpx.Limits(max_connections=256, max_keepalive_connections=64)
    return httpx.AsyncClient(
        # trust_env off: no HTTP(S)_PROXY or netrc from the environment may see our
        # credentials or reroute an upstream.
        transport=AiohttpTransport(limits=limits, verify=verify, trust_env=False),
        timeout=timeout,
        follow_redirects=False,  # followed by hand: see Upstream._send
        # Byte-exact bodies: a content-encoded blob would not match its digest.
        headers={"Accept-Encoding": "identity", "User-Agent": "mirror"},
    )


@dataclass(frozen=True, slots=True)
class Credentials:
    username: str
    password: str


class Upstream:
    """One upstream registry, reached through its own pooled client."""

    def __init__(
        self,
        url: str,
        client: httpx.AsyncClient,
        metrics: Metrics,
        *,
        name: str | None = None,
        credentials: Credentials | None = None,
        token_hosts: tuple[str, ...] = (),
        other_upstreams: tuple[str, ...] = (),
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.url = url.rstrip("/")
        parts = urlsplit(self.url)
        self.name = name or parts.netloc  # as clients call it: docker.io, ghcr.io
        self._token_hosts = frozenset(h.lower() for h in token_hosts)
        # The other upstreams' origins: a realm there is refused (credential isolation).
        self._foreign_origins = frozenset(
            (p.scheme, (p.hostname or "").lower(), _port(p))
            for p in map(urlsplit, other_upstreams)
            if urlsplit(url) != p
        )
        # Credentials go only to this origin: scheme included, so an https upstream's
        # token never follows a redirect to plain http on the same host.
        self.origin = (parts.scheme, parts.netloc)
        # Docker Hub semantics (`alpine` -> `library/alpine`) follow the registry's
        # name, wherever it is reached (a pull-through cache of Hub, a test registry).
        self.docker_hub = self.name == DOCKER_HUB or parts.hostname in DOCKER_HUB_ALIASES
        self._client = client
        self._metrics = metrics
        self._credentials = credentials
        self._tokens = TokenCache(clock)
        # Learned from the first 401, so later requests carry a token up front
        # instead of paying a 401 round trip each.
        self._challenge: Challenge | None = None

    # -- public API -------------------------------------------------------------------

    async def get(
        self,
        path: str,
        *,
        repo: str | None,
        kind: str,
        headers: Mapping[str, str] | None = None,
        method: str = "GET",
    ) -> httpx.Response:
        """Send a request and return the (streaming) response; the caller closes it.

        Errors are *not* raised for upstream status codes; see `raise_for_status`.
        Transport failures raise UpstreamError (502/504).
        """
        hdrs = dict(headers or {})
        scope = f"repository:{repo}:pull" if repo else None
        auth = await self._authorization(scope)
        resp = await self._send(method, self.url + path, hdrs, auth, kind)
        if resp.status_code == 401:
            challenge = parse_www_authenticate(resp.headers.get("www-authenticate", ""))
            await resp.aclose()
            # Only the upstream itself may tell us how to authenticate: a 401 from a
            # redirect target (a CDN, anything) must not steer our credentials.
            from_upstream = _origin(str(resp.request.url)) == self.origin
            if (
                challenge is None
                or not from_upstream
                or (challenge.scheme == "basic" and self._credentials is None)
            ):
                raise UpstreamError(
                    "UNAUTHORIZED", "upstream requires authentication", upstream_status=401
                )
            self._challenge = challenge
            auth = await self._authorization(scope, rejected=auth, asked=challenge.scope)
            resp = await self._send(method, self.url + path, hdrs, auth, kind)
        return resp

    @staticmethod
    async def raise_for_status(resp: httpx.Response, kind: str) -> None:
        """Map an upstream error status to the error table (and close the response)."""
        status = resp.status_code
        if status < 400:
            return
        await resp.aclose()
        if status == 404:
            code = {"manifest": "MANIFEST_UNKNOWN", "blob": "BLOB_UNKNOWN"}.get(
                kind, "NAME_UNKNOWN"
            )
            raise UpstreamError(code, f"{kind} unknown to upstream", upstream_status=404)
        if status == 401:
            raise UpstreamError(
                "UNAUTHORIZED", "upstream refused our credentials", upstream_status=401
            )
        if status == 403:
            raise UpstreamError("DENIED", "upstream denied access", upstream_status=403)
        if status == 429:
            headers = {}
            if "retry-after" in resp.headers:
                headers["Retry-After"] = resp.headers["retry-after"]
            raise UpstreamError(
                "TOOMANYREQUESTS",
                "upstream rate limit reached",
                upstream_status=429,
                headers=headers,
            )
        raise UpstreamError(
            "UNAVAILABLE", f"upstream answered {status}", status=502, upstream_status=status
        )

    # -- internals --------------------------------------------------------------------

    async def _authorization(
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
        if not self._realm_allowed(challenge.realm):
            # A registry (or whoever answers for it) naming a foreign token service
            # would learn our credentials, or hand us tokens from anywhere.
            log.warning("upstream %s named a foreign token realm; refused", self.name)
            raise UpstreamError(
                "UNAUTHORIZED",
                f"upstream {self.name} named a token realm on a host not allowed for it",
                status=502,
                upstream_status=401,
            )
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

    def _basic(self) -> str | None:
        if self._credentials is None:
            return None
        pair = f"{self._credentials.username}:{self._credentials.password}".encode()
        return "Basic " + base64.b64encode(pair).decode()

    def _realm_allowed(self, realm: str) -> bool:
        """The upstream's own host (a token service on another port of it, as
        Distribution and Harbor set-ups often have), its registrable domain over https
        on the default port (registry-1.docker.io -> auth.docker.io), or a host in
        `token_hosts`. Never another configured upstream's origin (its credentials
        would reach that registry), never plain http for an https upstream."""
        parts = urlsplit(realm)
        host = (parts.hostname or "").lower()
        if parts.scheme not in ("http", "https") or not host:
            return False
        if (parts.scheme, host, _port(parts)) in self._foreign_origins:
            return False
        if self.origin[0] == "https" and parts.scheme != "https":
            return False  # a token fetched in clear text could be swapped on the way
        if host in self._token_hosts or parts.netloc.lower() in self._token_hosts:
            return True
        own = urlsplit(self.url)
        if host == (own.hostname or "").lower():
            return True
        if parts.scheme != "https" or parts.port not in (None, 443):
            return False
        if _is_ip(host) or _is_ip(own.hostname or ""):
            return False  # addresses have no registrable domain to share
        domain = registrable_domain(own.hostname or "")
        if domain is None or domain != registrable_domain(host):
            return False
        # On shared registry platforms the registrable domain is everybody's
        # (attacker.azurecr.io, another account's ECR): only the registry's own host.
        return not domain.endswith(MULTI_TENANT_DOMAINS)

    def _may_send_credentials(self, realm: str) -> bool:
        """Basic credentials go to an allowed realm (`_realm_allowed`, which already
        refuses plain http for an https upstream) over https, or on the upstream's
        own host: never in clear text to another host."""
        parts = urlsplit(realm)
        return parts.scheme == "https" or parts.hostname == urlsplit(self.url).hostname

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
            token, expires_in = await self._token_request(challenge.realm, params, headers)
            result = "ok"
            return token, expires_in
        except UpstreamError as exc:
            if exc.code == "UNAUTHORIZED":
                result = "refused"
            raise
        finally:
            self._metrics.token_fetches.labels(self.name, result).inc()

    async def _token_request(
        self, realm: str, params: dict[str, str], headers: dict[str, str]
    ) -> tuple[str, object]:
        started = time.perf_counter()
        try:
            resp = await self._client.get(realm, params=params, headers=headers)
        except httpx.TransportError as exc:
            self._metrics.upstream_request(
                self.name, "token", "error", time.perf_counter() - started
            )
            raise _transport_error(exc, "token service") from exc
        self._metrics.upstream_request(
            self.name, "token", str(resp.status_code), time.perf_counter() - started
        )
        if resp.status_code in (401, 403):
            raise UpstreamError(
                "UNAUTHORIZED",
                "the upstream token service refused our credentials",
                upstream_status=resp.status_code,
            )
        if resp.status_code != 200:
            raise UpstreamError(
                "UNAVAILABLE",
                f"token service answered {resp.status_code}",
                status=502,
                upstream_status=resp.status_code,
            )
        try:
            data = resp.json()
            token = data.get("token") or data.get("access_token")
        except (ValueError, AttributeError):
            token = None
        if not isinstance(token, str) or not token:
            raise UpstreamError("UNAVAILABLE", "token service returned no token", status=502)
        return token, data.get("expires_in")

    async def _send(
        self, method: str, url: str, headers: dict[str, str], auth: str | None, kind: str
    ) -> httpx.Response:
        for _ in range(MAX_REDIRECTS + 1):
            hdrs = dict(headers)
            record = logs.current.get()
            if record is not None:  # lets the upstream's logs be matched to ours
                hdrs["X-Request-Id"] = record.request_id
            # Credentials go only to the upstream itself: a redirect to a CDN or any
            # other host gets no Authorization header (it carries its own signature).
            if auth is not None and _origin(url) == self.origin:
                hdrs["Authorization"] = auth
            started = time.perf_counter()
            try:
                resp = await self._client.send(
                    self._client.build_request(method, url, headers=hdrs), stream=True
                )
            except httpx.TransportError as exc:
                self._metrics.upstream_request(
                    self.name, kind, "error", time.perf_counter() - started
                )
                raise _transport_error(exc, "upstream") from exc
            self._metrics.upstream_request(
                self.name, kind, str(resp.status_code), time.perf_counter() - started
            )
            self._metrics.rate_limit(self.name, resp.headers)
            if record is not None:
                record.upstream_status = resp.status_code
            location = resp.headers.get("location")
            if resp.status_code not in _REDIRECTS or not location:
                return resp
            await resp.aclose()
            url = urljoin(url, location)
            if resp.status_code == 303:
                method = "GET"
        raise UpstreamError("UNAVAILABLE", "upstream redirected too many times", status=502)


def _port(parts: SplitResult) -> int:
    return parts.port or (443 if parts.scheme == "https" else 80)


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        return host == "localhost"
    return True


def _origin(url: str) -> tuple[str, str]:
    parts = urlsplit(url)
    return parts.scheme, parts.netloc


def _is_timeout(exc: httpx.TransportError) -> bool:
    # The aiohttp transport maps every connection error to httpx.ConnectTimeout, so
    # the original exception decides (aiohttp's timeouts are TimeoutError subclasses).
    cause = exc.__cause__
    if cause is None:
        return isinstance(exc, httpx.TimeoutException)
    return isinstance(cause, TimeoutError)


def _transport_error(exc: httpx.TransportError, what: str) -> UpstreamError:
    if _is_timeout(exc):
        return UpstreamError("UNAVAILABLE", f"{what} timed out", status=504)
    # The message names the failure (refused, reset, DNS) but never a credential.
    return UpstreamError(
        "UNAVAILABLE", f"{what} unreachable: {type(exc).__name__}: {exc}", status=502
    )
