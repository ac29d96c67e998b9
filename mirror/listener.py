"""The client-facing connection guard: what a listener owes the machine it runs on.

uvicorn's HTTP protocol accepts any number of connections, waits forever for a request
that never comes, and buffers request headers of any size (32 MiB headers on 8
connections cost 379 MiB). Each connection here is held to:

- a cap on open connections (`max_connections`): past it, new ones are closed at once;
- a deadline for the request head (`header_timeout`), from the connection's start or
  the end of the previous request, so silent or trickling clients cannot hold
  descriptors (the keep-alive timeout only starts after a response);
- a size for the request head (`max_header_bytes`): past it, 431 and close.

Each refusal is counted in `mirror_client_connections_refused_total{reason}`. Over
TLS, each request's scope also carries the ASGI TLS extension (the verified client
certificate's subject, for authentication); over plain HTTP, the zero-copy extension
(`mirror.zerocopy`), which sends cached bytes with sendfile(2).
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from mirror import zerocopy
from mirror.metrics import Metrics, RefusalReason
from mirror.tls import tls_extension

log = logging.getLogger(__name__)

_TOO_LARGE = b'{"errors":[{"code":"UNSUPPORTED","message":"request head too large"}]}'
_431 = (
    b"HTTP/1.1 431 Request Header Fields Too Large\r\ncontent-type: application/json\r\n"
    b"content-length: %d\r\nconnection: close\r\n\r\n%s" % (len(_TOO_LARGE), _TOO_LARGE)
)


# The first byte of a TLS record carrying a handshake (a ClientHello).
TLS_HANDSHAKE = b"\x16"
_told_about_tls = False


def _tls_on_plain_port() -> None:
    """skopeo and podman try HTTPS first and fall back to HTTP: every pull would log
    uvicorn's "Invalid HTTP request received." Said once, at debug, with the fix."""
    global _told_about_tls
    if not _told_about_tls:
        _told_about_tls = True
        log.debug(
            "a client tried TLS on this plain-HTTP listener (skopeo and podman try HTTPS "
            "first, then HTTP); configure it for an insecure registry to skip the attempt"
        )


class HeadTooLarge(Exception):
    pass


class Limits:
    def __init__(
        self,
        metrics: Metrics,
        *,
        max_connections: int,
        header_timeout: float,
        max_header_bytes: int,
    ) -> None:
        self.metrics = metrics
        self.max_connections = max_connections
        self.header_timeout = header_timeout
        self.max_header_bytes = max_header_bytes

    def protocol(self) -> type[HttpToolsProtocol]:
        """The protocol class uvicorn instantiates per connection, bound to these limits."""
        return type("GuardedProtocol", (GuardedProtocol,), {"limits": self})


class GuardedProtocol(HttpToolsProtocol):
    limits: Limits

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._in_head = True  # from a head's start (or the connection's) to its end
        self._pending = 0  # raw bytes of an unfinished head, across reads
        self._head_size = 0  # the current head's size, from the parser's callbacks
        self._heads = 0  # heads completed on this connection
        self._head_deadline: asyncio.TimerHandle | None = None
        # The ASGI TLS extension, the same for every request of a TLS connection.
        self._tls: dict[object, object] | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        # asyncio (and uvloop) call this after the TLS handshake: the client
        # certificate, if any, is known and verified.
        ssl_object = transport.get_extra_info("ssl_object")
        if ssl_object is not None:
            self._tls = tls_extension(ssl_object)
        if len(self.connections) > self.limits.max_connections:
            self._refuse("limit")
            return
        self._await_head()

    def connection_lost(self, exc: Exception | None) -> None:
        self._stop_deadline()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if (
            self._tls is None  # over TLS these are decrypted bytes: HTTP or garbage
            and self._heads == 0
            and self._pending == 0
            and data[:1] == TLS_HANDSHAKE
        ):
            _tls_on_plain_port()
            self._refuse("tls_on_plain_port")
            return
        if self._in_head:
            # Counted from raw reads, before the parser sees them: it buffers a header
            # until the header ends, so waiting for its callbacks would let a 32 MiB
            # header into memory. Only this head's bytes count (pipelined heads may
            # follow it in the same read).
            end = data.find(b"\r\n\r\n")
            if self._pending + (len(data) if end < 0 else end + 4) > self.limits.max_header_bytes:
                self.transport.write(_431)
                self._refuse("headers_too_large")
                return
        heads = self._heads
        super().data_received(data)
        if self._in_head:
            last = data.rfind(b"\r\n\r\n") if self._heads != heads else -1
            self._pending = len(data) - last - 4 if last >= 0 else self._pending + len(data)

    def on_message_begin(self) -> None:
        super().on_message_begin()
        if self._tls is not None:
            self.scope["extensions"] = {"tls": dict(self._tls)}
        self._in_head = True
        self._head_size = 0

    def on_url(self, url: bytes) -> None:
        self._head_size += len(url)
        super().on_url(url)

    def on_header(self, name: bytes, value: bytes) -> None:
        self._head_size += len(name) + len(value) + 4
        super().on_header(name, value)

    def on_headers_complete(self) -> None:
        self._in_head = False
        self._heads += 1
        self._stop_deadline()
        if self._head_size > self.limits.max_header_bytes:
            # A later head of a pipelined read: the parser turns this into a 400.
            self.limits.metrics.refused_connections.labels("headers_too_large").inc()
            raise HeadTooLarge
        cycle = self.cycle
        super().on_headers_complete()
        if self.cycle is not cycle and self._tls is None:
            zerocopy.offer(self.cycle, self.transport)

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if self.transport.is_closing():
            return
        if self.cycle is not None and self.cycle.response_complete and self.cycle.more_body:
            # The request's body is still coming (the mirror reads none): a client
            # could trickle it forever.
            self.transport.close()
            return
        # The next request's head is due within the deadline, however slowly it comes
        # (uvicorn's keep-alive timer stops at the first byte).
        self._await_head()

    def _await_head(self) -> None:
        self._stop_deadline()
        self._head_deadline = self.loop.call_later(self.limits.header_timeout, self._head_timed_out)

    def _head_timed_out(self) -> None:
        self._head_deadline = None
        if self._in_head or self.cycle is None or self.cycle.response_complete:
            self._refuse("header_timeout")

    def _stop_deadline(self) -> None:
        if self._head_deadline is not None:
            self._head_deadline.cancel()
            self._head_deadline = None

    def _refuse(self, reason: RefusalReason) -> None:
        self.limits.metrics.refused_connections.labels(reason).inc()
        self._stop_deadline()
        if not self.transport.is_closing():
            self.transport.close()
