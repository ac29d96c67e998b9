"""The remote store: one upstream registry.

It speaks the registry API for the proxy (`get_manifest`, `head_manifest`,
`head_blob`, `open_blob`, `tags`) and hides HTTP: authentication (the policy is
`mirror.auth`'s), redirects (Docker Hub answers blob GETs with a 307 to a CDN host,
which must never see our `Authorization`), a deadline per exchange, and one log line
when the upstream starts failing and one when it recovers. With `mirror.transport`
(the client, its failures, statuses and bounded reads) and `mirror.remoteblob` (blob
bodies), the only code that talks to upstreams.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import time
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass
from typing import Literal, Protocol
from urllib.parse import parse_qsl, urlencode, urljoin, urlsplit

import httpx

from mirror import dockerhub, logs, referrers
from mirror.auth import Credentials, UpstreamAuth, parse_www_authenticate
from mirror.budget import Budget
from mirror.errors import RegistryError, UpstreamError
from mirror.mediatypes import OCI_INDEX
from mirror.metrics import Metrics, UpstreamKind
from mirror.ranges import parse_length
from mirror.reference import Digest, Reference
from mirror.remoteblob import RemoteBlob
from mirror.store import BlobSource
from mirror.transport import make_client, read_bounded, status_error, transport_error

log = logging.getLogger(__name__)

__all__ = [
    "Credentials",
    "ManifestHead",
    "RemoteManifest",
    "RemoteStore",
    "Upstream",
    "make_client",
]

MAX_REDIRECTS = 5
_REDIRECTS = frozenset({301, 302, 303, 307, 308})
# Tokens are a few KB (a JWT); anything near this is not a token.
TOKEN_MAX_BYTES = 1 << 20
# Pages of one referrers answer followed at most (each within manifest_max_bytes overall).
REFERRERS_MAX_PAGES = 50


class InvalidResponse(UpstreamError):
    """The upstream's answer to the request itself could not be parsed."""


@dataclass(frozen=True, slots=True)
class RemoteManifest:
    body: bytes
    content_type: str | None
    digest_header: str | None  # the upstream's Docker-Content-Digest, as sent
    # Seconds since the answering side last confirmed a tag with its registry (the
    # `Age` a mirror tier sends; 0 from a registry): the tag is that old already.
    age: float = 0.0


@dataclass(frozen=True, slots=True)
class ManifestHead:
    digest: Digest | None  # what the upstream names for the reference now
    age: float = 0.0  # as RemoteManifest.age


# Ages beyond this are nonsense (a clock gone wild): treated as "just now".
MAX_AGE = 365 * 86400


_SECONDS_RE = re.compile(r"[0-9]{1,12}")


def parse_age(value: str | None) -> float:
    # ASCII digits only: str.isdigit() also takes "²", which int() refuses.
    if not value or not _SECONDS_RE.fullmatch(value.strip()):
        return 0.0
    age = int(value.strip())
    return float(age) if age <= MAX_AGE else 0.0


def freshness_header(max_age: float | None) -> dict[str, str]:
    """Asked of a mirror tier: a tag older than this must be revalidated first, so an
    edge's TTL and a tier's do not add up."""
    return {} if max_age is None else {"Cache-Control": f"max-age={max(0, int(max_age))}"}


class RemoteStore(Protocol):
    """What the proxy asks of the remote side: one registry (`Upstream`), or a chain of
    mirror tiers in front of it (`mirror.tiers.Tiers`)."""

    name: str
    docker_hub: bool

    async def get_manifest(
        self,
        repo: str,
        ref: Reference,
        accept: str | None,
        max_bytes: int,
        max_age: float | None = None,
        *,
        refresh: bool = False,
    ) -> RemoteManifest: ...

    async def head_manifest(
        self, repo: str, ref: Reference, accept: str | None, max_age: float | None = None
    ) -> ManifestHead: ...

    async def head_blob(self, repo: str, digest: Digest) -> int | None: ...

    async def open_blob(
        self, repo: str, digest: Digest, max_bytes: int, start: int = 0
    ) -> BlobSource: ...

    async def tags(
        self, repo: str, n: int | None, last: str | None, max_bytes: int
    ) -> tuple[bytes, str | None]: ...

    async def referrers(self, repo: str, digest: Digest, max_bytes: int) -> bytes | None:
        """The referrers index of `digest` (unfiltered); None: no referrers API."""
        ...

    async def aclose(self) -> None: ...


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
        resume_attempts: int = 3,
        fetch_timeout: float = 30.0,
        stall_timeout: float = 60.0,
        clock: Callable[[], float] = time.monotonic,
        ns: str | None = None,
        budget: Budget | None = None,
    ) -> None:
        self.url = url.rstrip("/")
        # The registry's pull budget (a tier's answers from its cache spend none).
        self.budget = budget
        # A mirror tier is asked for the registry it stands in for (`?ns=`), as
        # containerd asks a mirror: a central tier with several upstreams routes it.
        self._ns = ns
        parts = urlsplit(self.url)
        self.name = name or parts.netloc  # as clients call it: docker.io, ghcr.io
        # Credentials go only to this origin: scheme included, so an https upstream's
        # token never follows a redirect to plain http on the same host.
        self.origin = (parts.scheme, parts.netloc)
        self.docker_hub = dockerhub.is_hub(self.name, self.url)
        self._client = client
        self._metrics = metrics
        self._resume_attempts = resume_attempts
        self._fetch_timeout = fetch_timeout
        self._trouble: str | None = None  # why the upstream is failing, while it is
        self._stall_timeout = stall_timeout
        self.auth = UpstreamAuth(
            self.name,
            self.url,
            metrics,
            self._get_token,
            credentials=credentials,
            token_hosts=token_hosts,
            other_upstreams=other_upstreams,
            clock=clock,
        )

    async def aclose(self) -> None:
        """Close the connection pool: this upstream owns its client."""
        if self.budget is not None:
            self.budget.close()
        await self._client.aclose()

    @contextlib.asynccontextmanager
    async def _deadline(self) -> AsyncIterator[None]:
        """One deadline for a whole exchange (token, redirects, body), so an upstream
        that trickles a byte at a time under the read timeout cannot hold a client, or
        everybody waiting for the same tag, for longer."""
        try:
            async with asyncio.timeout(self._fetch_timeout) as deadline:
                yield
        except TimeoutError:
            if not deadline.expired():
                raise
            raise UpstreamError(
                "UNAVAILABLE", f"upstream took longer than {self._fetch_timeout:.0f} s", status=504
            ) from None

    # -- the remote store -------------------------------------------------------------

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
        """`refresh`: the GET would refresh a tag the cache can still serve stale, which
        the rate-limit budget may put off; a miss has nothing else to answer with."""
        too_big = UpstreamError("MANIFEST_INVALID", "manifest exceeds the size limit", status=502)
        async with self._deadline():
            path = f"/v2/{repo}/manifests/{ref}"
            resp = await self._request(
                "GET",
                path,
                repo,
                "manifest",
                accept,
                freshness_header(max_age),
                pull="refresh" if refresh else "miss",
            )
            body = await read_bounded(resp, max_bytes, too_big)
        headers = resp.headers
        return RemoteManifest(
            body,
            headers.get("content-type"),
            headers.get("docker-content-digest"),
            self._age(headers),
        )

    async def head_manifest(
        self, repo: str, ref: Reference, accept: str | None, max_age: float | None = None
    ) -> ManifestHead:
        """The digest the upstream names for `ref` now (a HEAD: free on Docker Hub)."""
        path = f"/v2/{repo}/manifests/{ref}"
        fresh = freshness_header(max_age)
        async with self._deadline():
            try:
                resp = await self._request(
                    "HEAD", path, repo, "manifest", accept, fresh, pull="miss"
                )
            except InvalidResponse as exc:
                # A common server bug sends a body after a HEAD answer, which wrecks
                # the answer: ask with GET instead, and read only its headers. Only the
                # HEAD's own answer counts (a token service's failure is no reason to
                # spend a rate-limited GET).
                log.warning(
                    "upstream %s answered a HEAD badly (%s); asking with GET",
                    self.name,
                    exc.message,
                )
                resp = await self._request(
                    "GET", path, repo, "manifest", accept, fresh, pull="miss"
                )
        await resp.aclose()
        return ManifestHead(_digest(resp.headers, "docker-content-digest"), self._age(resp.headers))

    def _age(self, headers: Mapping[str, str]) -> float:
        """A mirror tier's `Age`; a registry's (or a CDN's in front of it) means
        nothing about when the tag was confirmed: 0."""
        return parse_age(headers.get("age")) if self._ns is not None else 0.0

    async def head_blob(self, repo: str, digest: Digest) -> int | None:
        async with self._deadline():
            resp = await self._request("HEAD", f"/v2/{repo}/blobs/{digest}", repo, "blob")
        await resp.aclose()
        return parse_length(resp.headers.get("content-length"))

    async def open_blob(
        self, repo: str, digest: Digest, max_bytes: int, start: int = 0
    ) -> RemoteBlob:
        """The blob's body from byte `start`, streaming (RemoteBlob: resume, watchdog,
        size bound). A `start` past 0 takes over a download another replica began."""
        path = f"/v2/{repo}/blobs/{digest}"

        async def get(offset: int) -> httpx.Response:
            # Always with Range: RemoteBlob accepts only a 206 for a resume, and a body
            # that broke before its first byte resumes from 0.
            headers = {"Range": f"bytes={offset}-"}
            async with self._deadline():
                return await self._request("GET", path, repo, "blob", headers=headers)

        if start:
            resp = await get(start)
        else:
            async with self._deadline():
                resp = await self._request("GET", path, repo, "blob")
        try:
            if start and (
                resp.status_code != 206
                or not resp.headers.get("content-range", "").startswith(f"bytes {start}-")
            ):
                raise UpstreamError(
                    "UNAVAILABLE",
                    "upstream cannot resume the blob",
                    status=502,
                    upstream_status=resp.status_code,  # an answer, not an outage
                )
            return RemoteBlob(
                path,
                resp,
                get,
                self._metrics,
                self.name,
                max_bytes=max_bytes,
                resume_attempts=self._resume_attempts,
                stall_timeout=self._stall_timeout,
                start=start,
            )
        except UpstreamError:
            await resp.aclose()
            raise

    async def tags(
        self, repo: str, n: int | None, last: str | None, max_bytes: int
    ) -> tuple[bytes, str | None]:
        """One page of the tag list, and the upstream's `Link` to the next."""
        query = {k: str(v) for k, v in (("n", n), ("last", last)) if v is not None}
        path = f"/v2/{repo}/tags/list" + (f"?{urlencode(query)}" if query else "")
        too_big = UpstreamError("UNAVAILABLE", "tag list too large", status=502)
        async with self._deadline():
            resp = await self._request("GET", path, repo, "tags")
            body = await read_bounded(resp, max_bytes, too_big)
        return body, resp.headers.get("link")

    async def referrers(self, repo: str, digest: Digest, max_bytes: int) -> bytes | None:
        """The upstream's referrers index for `digest`, or None where it answers 404:
        it has no referrers API (Distribution 2.x), and the tag schema applies."""
        too_big = UpstreamError("MANIFEST_INVALID", "referrers index too large", status=502)
        first = f"/v2/{repo}/referrers/{digest}"
        path: str | None = first
        listed: list[dict[str, object]] = []
        left = max_bytes
        async with self._deadline():
            # The spec lets a registry page its answer (`Link: <...>; rel="next"`): the
            # mirror caches the whole list, so it follows the pages (on this upstream,
            # within the one size bound) rather than keep the first as if complete.
            for page in range(REFERRERS_MAX_PAGES):
                assert path is not None
                try:
                    resp = await self._request("GET", path, repo, "manifest", OCI_INDEX)
                except UpstreamError as exc:
                    if exc.upstream_status == 404 and page == 0:
                        return None
                    raise
                body = await read_bounded(resp, left, too_big)
                left -= len(body)
                listed += referrers.descriptors(body)
                path = self._next_page(resp.headers.get("link"), first)
                if path is None:
                    return referrers.index(listed)
        raise UpstreamError("MANIFEST_INVALID", "referrers answer has too many pages", status=502)

    def _next_page(self, link: str | None, first: str) -> str | None:
        """The path of the next page of a referrers answer, or None at the end. A link
        off this upstream or off this referrers list is refused, not followed."""
        if not link:
            return None
        target, sep, rest = link.strip().partition(">")
        if not sep or 'rel="next"' not in rest.replace(" ", ""):
            return None
        url = urlsplit(urljoin(self.url + first, target.lstrip().removeprefix("<")))
        if (url.scheme, url.netloc) != self.origin or url.path != urlsplit(self.url + first).path:
            raise UpstreamError(
                "MANIFEST_INVALID", "referrers answer links off its own list", status=502
            )
        # The upstream's own query (its cursor), minus the `ns` that _request adds.
        query = urlencode([(k, v) for k, v in parse_qsl(url.query) if k != "ns"])
        return first + (f"?{query}" if query else "")

    # -- requests ---------------------------------------------------------------------

    async def _request(
        self,
        method: str,
        path: str,
        repo: str,
        kind: UpstreamKind,
        accept: str | None = None,
        headers: Mapping[str, str] | None = None,
        *,
        pull: Pull | None = None,
    ) -> httpx.Response:
        """A response with a success status, streaming (the caller closes it); any
        other status, or a transport failure, raises UpstreamError.

        `pull`: a manifest request, which the rate-limit budget hears the answer to
        (GET or HEAD, and its 429), and which, as a GET, it may keep from being sent:
        a `miss` only once the limit is spent, a `refresh` already under the reserve."""
        if pull is not None and self.budget is not None and method == "GET":
            self.budget.spend(refresh=pull == "refresh")
        hdrs = dict(headers or {})
        if accept is not None:
            hdrs["Accept"] = accept
        if self._ns is not None:
            path += ("&" if "?" in path else "?") + urlencode({"ns": self._ns})
        scope = f"repository:{repo}:pull"
        auth = await self.auth.authorization(scope)
        resp = await self._send(method, self.url + path, hdrs, auth, kind)
        if resp.status_code == 401:
            challenge = parse_www_authenticate(resp.headers.get("www-authenticate", ""))
            await resp.aclose()
            from_upstream = _origin(str(resp.request.url)) == self.origin
            if not self.auth.learn(challenge, from_upstream=from_upstream):
                raise UpstreamError(
                    "UNAUTHORIZED", "upstream requires authentication", upstream_status=401
                )
            assert challenge is not None
            auth = await self.auth.authorization(scope, rejected=auth, asked=challenge.scope)
            resp = await self._send(method, self.url + path, hdrs, auth, kind)
        if pull is not None and self.budget is not None:
            self.budget.observe(resp.status_code, resp.headers)
        if resp.status_code >= 400:
            await resp.aclose()
            raise status_error(resp, kind)
        return resp

    async def _send(
        self, method: str, url: str, headers: dict[str, str], auth: str | None, kind: UpstreamKind
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
                error = transport_error(exc, "upstream")
                self._health(error.message)
                if isinstance(exc, httpx.RemoteProtocolError):
                    raise InvalidResponse(error.code, error.message, status=error.status) from exc
                raise error from exc
            self._metrics.upstream_request(
                self.name, kind, str(resp.status_code), time.perf_counter() - started
            )
            self._health(f"answered {resp.status_code}" if resp.status_code >= 500 else None)
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

    @property
    def trouble(self) -> str | None:
        """Why the last request failed (a transport error, a 5xx); None: it answered."""
        return self._trouble

    def _health(self, trouble: str | None) -> None:
        """One log line when the upstream starts failing, and one when it recovers:
        not one per request (the access log has those)."""
        if trouble is not None and self._trouble is None:
            log.warning("upstream %s (%s) is failing: %s", self.name, self.url, trouble)
        elif trouble is None and self._trouble is not None:
            log.info("upstream %s answers again", self.name)
        self._trouble = trouble

    async def _get_token(
        self, realm: str, params: dict[str, str], headers: dict[str, str]
    ) -> tuple[int, bytes]:
        started = time.perf_counter()
        request = self._client.build_request("GET", realm, params=params, headers=headers)
        try:
            resp = await self._client.send(request, stream=True)
        except httpx.TransportError as exc:
            self._metrics.upstream_request(
                self.name, "token", "error", time.perf_counter() - started
            )
            raise transport_error(exc, "token service") from exc
        self._metrics.upstream_request(
            self.name, "token", str(resp.status_code), time.perf_counter() - started
        )
        if resp.headers.get("content-encoding", "identity").strip().lower() != "identity":
            # We ask for identity; a compressed answer could decode to any size.
            await resp.aclose()
            raise UpstreamError("UNAVAILABLE", "token service sent an encoded body", status=502)
        too_big = UpstreamError("UNAVAILABLE", "token response too large", status=502)
        return resp.status_code, await read_bounded(resp, TOKEN_MAX_BYTES, too_big)


# What a manifest request is to the rate-limit budget (`Upstream._request`).
Pull = Literal["miss", "refresh"]


def _digest(headers: Mapping[str, str], name: str) -> Digest | None:
    value = headers.get(name)
    if not value:
        return None
    try:
        return Digest.parse(value.strip())
    except RegistryError:
        return None


def _origin(url: str) -> tuple[str, str]:
    parts = urlsplit(url)
    return parts.scheme, parts.netloc
