"""The remote store: one upstream registry, and the one module that talks to upstreams.

It speaks the registry API for the proxy (`get_manifest`, `head_manifest`,
`head_blob`, `open_blob`, `tags`) and hides the transport: authentication (the
policy is `mirror.auth`'s), redirects (Docker Hub answers blob GETs with a 307 to a CDN
host, which must never see our `Authorization`), resuming a broken blob body with
Range, bounded reads, and the mapping of every transport failure and upstream status
to the error table, once, here.
"""

from __future__ import annotations

import logging
import ssl
import time
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass
from urllib.parse import urlencode, urljoin, urlsplit

import httpx

from mirror import dockerhub, logs
from mirror.auth import Credentials, UpstreamAuth, parse_www_authenticate
from mirror.errors import RegistryError, UpstreamError
from mirror.metrics import Metrics, UpstreamKind
from mirror.ranges import parse_length
from mirror.reference import Digest, Reference

log = logging.getLogger(__name__)

__all__ = ["Credentials", "RemoteBlob", "RemoteManifest", "Upstream", "make_client"]

MAX_REDIRECTS = 5
_REDIRECTS = frozenset({301, 302, 303, 307, 308})
_NOT_FOUND = {"manifest": "MANIFEST_UNKNOWN", "blob": "BLOB_UNKNOWN"}


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
class RemoteManifest:
    body: bytes
    content_type: str | None
    digest: Digest | None  # what the upstream's Docker-Content-Digest names, if valid


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
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.url = url.rstrip("/")
        parts = urlsplit(self.url)
        self.name = name or parts.netloc  # as clients call it: docker.io, ghcr.io
        # Credentials go only to this origin: scheme included, so an https upstream's
        # token never follows a redirect to plain http on the same host.
        self.origin = (parts.scheme, parts.netloc)
        self.docker_hub = dockerhub.is_hub(self.name, self.url)
        self._client = client
        self._metrics = metrics
        self._resume_attempts = resume_attempts
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
        await self._client.aclose()

    # -- the remote store -------------------------------------------------------------

    async def get_manifest(
        self, repo: str, ref: Reference, accept: str | None, max_bytes: int
    ) -> RemoteManifest:
        resp = await self._request("GET", f"/v2/{repo}/manifests/{ref}", repo, "manifest", accept)
        too_big = UpstreamError("MANIFEST_INVALID", "manifest exceeds the size limit", status=502)
        body = await _read(resp, max_bytes, too_big)
        return RemoteManifest(
            body, resp.headers.get("content-type"), _digest(resp.headers, "docker-content-digest")
        )

    async def head_manifest(self, repo: str, ref: Reference, accept: str | None) -> Digest | None:
        """The digest the upstream names for `ref` now (a HEAD: free on Docker Hub)."""
        resp = await self._request("HEAD", f"/v2/{repo}/manifests/{ref}", repo, "manifest", accept)
        await resp.aclose()
        return _digest(resp.headers, "docker-content-digest")

    async def head_blob(self, repo: str, digest: Digest) -> int | None:
        resp = await self._request("HEAD", f"/v2/{repo}/blobs/{digest}", repo, "blob")
        await resp.aclose()
        return parse_length(resp.headers.get("content-length"))

    async def open_blob(self, repo: str, digest: Digest) -> RemoteBlob:
        """The blob's body, streaming; a broken read resumes with Range inside."""
        resp = await self._request("GET", f"/v2/{repo}/blobs/{digest}", repo, "blob")
        return RemoteBlob(self, repo, digest, resp)

    async def tags(
        self, repo: str, n: int | None, last: str | None, max_bytes: int
    ) -> tuple[bytes, str | None]:
        """One page of the tag list, and the upstream's `Link` to the next."""
        query = {k: str(v) for k, v in (("n", n), ("last", last)) if v is not None}
        path = f"/v2/{repo}/tags/list" + (f"?{urlencode(query)}" if query else "")
        resp = await self._request("GET", path, repo, "tags")
        too_big = UpstreamError("UNAVAILABLE", "tag list too large", status=502)
        body = await _read(resp, max_bytes, too_big)
        return body, resp.headers.get("link")

    # -- requests ---------------------------------------------------------------------

    async def _request(
        self,
        method: str,
        path: str,
        repo: str,
        kind: UpstreamKind,
        accept: str | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> httpx.Response:
        """A response with a success status, streaming (the caller closes it); any
        other status, or a transport failure, raises UpstreamError."""
        hdrs = dict(headers or {})
        if accept is not None:
            hdrs["Accept"] = accept
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
        if resp.status_code >= 400:
            await resp.aclose()
            raise _status_error(resp, kind)
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

    async def _get_token(
        self, realm: str, params: dict[str, str], headers: dict[str, str]
    ) -> tuple[int, bytes]:
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
        return resp.status_code, resp.content


class RemoteBlob:
    """A blob body from upstream. When a read breaks (reset, timeout), it asks again
    from the next byte with `Range`, up to `resume_attempts` times, so callers see
    one unbroken stream or an error."""

    def __init__(self, upstream: Upstream, repo: str, digest: Digest, resp: httpx.Response):
        self._upstream = upstream
        self._path = f"/v2/{repo}/blobs/{digest}"
        self._repo = repo
        self._resp = resp
        self.size = parse_length(resp.headers.get("content-length"))

    async def __aiter__(self) -> AsyncIterator[bytes]:
        up = self._upstream
        fetched = up._metrics.upstream_bytes.labels(up.name)
        offset = attempts = 0
        while True:
            try:
                async for chunk in self._resp.aiter_raw():
                    offset += len(chunk)
                    fetched.inc(len(chunk))
                    yield chunk
                return
            except httpx.TransportError as exc:
                if attempts >= up._resume_attempts:
                    log.warning(
                        "upstream body of %s broke at %d bytes: %r", self._path, offset, exc
                    )
                    # The upstream answered, then broke: not "unreachable", and not a
                    # timeout to report as 504 either; no transport detail for clients.
                    raise UpstreamError(
                        "UNAVAILABLE", "upstream download failed", status=502
                    ) from exc
                attempts += 1
                log.warning(
                    "upstream body of %s broke at %d bytes (%r); resuming (%d/%d)",
                    self._path,
                    offset,
                    exc,
                    attempts,
                    up._resume_attempts,
                )
                up._metrics.resumes.inc()
            finally:
                await self._resp.aclose()
            self._resp = await up._request(
                "GET", self._path, self._repo, "blob", headers={"Range": f"bytes={offset}-"}
            )
            if self._resp.status_code != 206 or not self._resp.headers.get(
                "content-range", ""
            ).startswith(f"bytes {offset}-"):
                await self._resp.aclose()
                raise UpstreamError("UNAVAILABLE", "upstream cannot resume the blob", status=502)

    async def aclose(self) -> None:
        await self._resp.aclose()


async def _read(resp: httpx.Response, max_bytes: int, too_big: UpstreamError) -> bytes:
    """The whole body, refused once it passes `max_bytes` (announced or streamed)."""
    try:
        length = parse_length(resp.headers.get("content-length"))
        if length is not None and length > max_bytes:
            raise too_big
        body = bytearray()
        async for chunk in resp.aiter_raw():
            body += chunk
            if len(body) > max_bytes:
                raise too_big
        return bytes(body)
    finally:
        await resp.aclose()


def _status_error(resp: httpx.Response, kind: UpstreamKind) -> UpstreamError:
    """An upstream error status, as the error table names it."""
    status = resp.status_code
    if status == 404:
        code = _NOT_FOUND.get(kind, "NAME_UNKNOWN")
        return UpstreamError(code, f"{kind} unknown to upstream", upstream_status=404)
    if status == 401:
        return UpstreamError(
            "UNAUTHORIZED", "upstream refused our credentials", upstream_status=401
        )
    if status == 403:
        return UpstreamError("DENIED", "upstream denied access", upstream_status=403)
    if status == 429:
        headers = {}
        if "retry-after" in resp.headers:
            headers["Retry-After"] = resp.headers["retry-after"]
        return UpstreamError(
            "TOOMANYREQUESTS", "upstream rate limit reached", upstream_status=429, headers=headers
        )
    return UpstreamError(
        "UNAVAILABLE", f"upstream answered {status}", status=502, upstream_status=status
    )


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
