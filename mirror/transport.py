"""The upstream transport: httpx's API on aiohttp, with every failure mapped at this edge.

Together with `mirror.upstream` the only code that speaks HTTP to upstreams. Three
things are settled here, once, so the remote store above sees one kind of error:

- **Speed.** httpx's own transport reads bodies at ~0.6 GB/s (CPU bound); on aiohttp
  with 1 MiB reads it reaches ~2.9 GB/s once malloc is tuned (mirror/tuning.py;
  bench/transport.py, docs/benchmarks.md).
- **Errors.** The aiohttp transport lets some of aiohttp's own exceptions through (an
  invalid status line, a bad header, a broken chunk): a hostile or broken upstream
  would become a 500. Every exception from the transport, on the request or in the
  body, becomes an `httpx.TransportError`, which `transport_error` turns into a 502
  or 504 that stale content may answer for.
- **Answers.** An error status becomes the error table's code (`status_error`), and a
  body read into memory is bounded (`read_bounded`).
- **Pool hygiene.** aiohttp checks a pooled connection for leftovers when it is
  released, not when it is reused: bytes that arrive on an idle keep-alive connection
  (an extra response, a body after a HEAD, bytes past Content-Length) would be read
  as the next request's response. A connection with anything unread is never reused.
"""

from __future__ import annotations

import os
import re
import ssl
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import httpx
from aiohttp.connector import Connection
from httpx_aiohttp import AiohttpTransport
from httpx_aiohttp.transport import AiohttpResponseStream

from mirror.errors import UpstreamError
from mirror.metrics import UpstreamKind
from mirror.ranges import parse_length

MAX_CONNECTIONS = 256
_NOT_FOUND = {"manifest": "MANIFEST_UNKNOWN", "blob": "BLOB_UNKNOWN"}
_RETRY_AFTER_RE = re.compile(
    r"[0-9]{1,10}|[A-Za-z]{3}, [0-9]{2} [A-Za-z]{3} [0-9]{4} [0-9:]{8} GMT"
)


def make_client(
    connect_timeout: float, read_timeout: float, *, verify: ssl.SSLContext | bool = True
) -> httpx.AsyncClient:
    """One pooled client per upstream for the app's lifetime."""
    # The transport reads 16 KiB at a time by default; aiohttp's read(n) returns
    # whatever is buffered up to n, so a large n costs nothing on slow links.
    AiohttpResponseStream.CHUNK_SIZE = 1 << 20
    timeout = httpx.Timeout(
        connect=connect_timeout, read=read_timeout, write=read_timeout, pool=connect_timeout
    )
    # trust_env off: no HTTP(S)_PROXY or netrc from the environment may see our
    # credentials or reroute an upstream.
    context = httpx.create_ssl_context(verify=verify, trust_env=False)

    def session() -> aiohttp.ClientSession:
        connector = _CleanConnector(limit=MAX_CONNECTIONS, ssl=context)
        return aiohttp.ClientSession(connector=connector)

    return httpx.AsyncClient(
        transport=_Transport(client=session),
        timeout=timeout,
        follow_redirects=False,  # followed by hand: see Upstream._send
        # Byte-exact bodies: a content-encoded blob would not match its digest.
        headers={"Accept-Encoding": "identity", "User-Agent": "mirror"},
    )


def transport_error(exc: httpx.TransportError, what: str) -> UpstreamError:
    """A transport failure as clients and logs should read it: what failed, in words
    (the transport calls a refused connection and a DNS failure both ConnectTimeout,
    and says `ssl:default` for plain http). 504 for a timeout, else 502."""
    if _is_timeout(exc):
        return UpstreamError("UNAVAILABLE", f"{what} timed out", status=504)
    if isinstance(exc, httpx.RemoteProtocolError):
        return UpstreamError("UNAVAILABLE", f"{what} sent an invalid response", status=502)
    cause = exc.__cause__
    if isinstance(cause, aiohttp.ClientConnectorDNSError):
        reason = f"cannot resolve {cause.host}"
    elif isinstance(cause, aiohttp.ClientConnectorCertificateError):
        reason = f"its TLS certificate is not trusted ({cause.certificate_error})"
    elif isinstance(cause, aiohttp.ClientConnectorSSLError):
        reason = (
            f"TLS handshake with {cause.host}:{cause.port} failed; if it speaks plain HTTP, "
            "use an http:// URL"
        )
    elif isinstance(cause, aiohttp.ClientConnectorError):
        port = f":{cause.port}" if cause.port else ""
        error = cause.os_error
        why = os.strerror(error.errno).lower() if error.errno else str(error)
        reason = f"cannot connect to {cause.host}{port}: {why}"
    elif isinstance(cause, aiohttp.ServerDisconnectedError | ConnectionError):
        reason = "the connection was closed"
    else:
        reason = str(exc) or type(exc).__name__
    # The reason names host and failure, never a credential (URLs carry none).
    return UpstreamError("UNAVAILABLE", f"{what} unreachable: {reason}", status=502)


async def read_bounded(resp: httpx.Response, max_bytes: int, too_big: UpstreamError) -> bytes:
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
    except httpx.TransportError as exc:
        # Cut mid-body: the upstream's trouble (a stale copy may answer), not ours.
        raise transport_error(exc, "upstream") from exc
    finally:
        await resp.aclose()


def status_error(resp: httpx.Response, kind: UpstreamKind) -> UpstreamError:
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
        retry_after = resp.headers.get("retry-after", "").strip()
        # Passed on to clients only as what it may be: seconds or an HTTP date.
        if _RETRY_AFTER_RE.fullmatch(retry_after):
            headers["Retry-After"] = retry_after
        return UpstreamError(
            "TOOMANYREQUESTS", "upstream rate limit reached", upstream_status=429, headers=headers
        )
    return UpstreamError(
        "UNAVAILABLE", f"upstream answered {status}", status=502, upstream_status=status
    )


def _is_timeout(exc: httpx.TransportError) -> bool:
    # The aiohttp transport maps every connection error to httpx.ConnectTimeout, so
    # the original exception decides (aiohttp's timeouts are TimeoutError subclasses).
    cause = exc.__cause__
    if cause is None:
        return isinstance(exc, httpx.TimeoutException)
    return isinstance(cause, TimeoutError)


class _CleanConnector(aiohttp.TCPConnector):
    async def _get(self, *args: Any, **kwargs: Any) -> Connection | None:
        while (conn := await super()._get(*args, **kwargs)) is not None:
            protocol = conn.protocol
            if protocol is not None and not protocol.should_close:
                return conn
            conn.close()  # unread bytes, a framing error, an unfinished body
        return None


class _Transport(AiohttpTransport):
    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        try:
            response = await super().handle_async_request(request)
        except httpx.TransportError:
            raise
        except Exception as exc:  # at the edge, anything the transport raises is its failure
            raise httpx.RemoteProtocolError(_describe(exc), request=request) from exc
        response.stream = _MappedStream(response.stream)
        return response


class _MappedStream(httpx.AsyncByteStream):
    def __init__(self, inner: httpx.AsyncByteStream | httpx.SyncByteStream) -> None:
        assert isinstance(inner, httpx.AsyncByteStream)
        self._inner = inner

    async def __aiter__(self) -> AsyncIterator[bytes]:
        try:
            async for chunk in self._inner:
                yield chunk
        except httpx.TransportError:
            raise
        except Exception as exc:
            raise httpx.RemoteProtocolError(_describe(exc)) from exc

    async def aclose(self) -> None:
        try:
            await self._inner.aclose()
        except httpx.TransportError:
            raise
        except Exception as exc:
            raise httpx.RemoteProtocolError(_describe(exc)) from exc


def aiohttp_response(resp: httpx.Response) -> aiohttp.ClientResponse | None:
    """The aiohttp response behind a streamed httpx response of `make_client`'s, if any
    (`mirror.rawbody` takes its socket for large bodies)."""
    stream = getattr(resp.stream, "_stream", None)  # httpx's BoundAsyncStream wraps ours
    if isinstance(stream, _MappedStream) and isinstance(stream._inner, AiohttpResponseStream):
        response: aiohttp.ClientResponse = stream._inner._aiohttp_response
        return response
    return None


def _describe(exc: Exception) -> str:
    # Only the type and a bounded message: it may quote what the upstream sent, and a
    # URL's query (a CDN's pre-signed signature) is cut from it before it is logged.
    return f"{type(exc).__name__}: {_QUERY.sub('?…', str(exc))[:200]!r}"


_QUERY = re.compile(r"\?[^\s'\"]*")
