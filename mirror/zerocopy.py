"""The ASGI `http.response.zerocopysend` extension for uvicorn's HTTP protocol.

uvicorn has none: a body goes through Python as bytes, read from the page cache into a
buffer and copied again into the socket (two copies per byte, and the event loop's
time). With this extension a response hands over an open file, an offset and a
count, and the bytes go from the page cache to the socket with sendfile(2), on the
connection's own (non-blocking) socket:

- the transport's buffer is drained first (the head, or earlier body bytes, or a
  chunk's size line when the response is chunked), so the file's bytes follow them
  in order;
- when the socket is full, the send waits for it to be writable on a duplicate
  descriptor: the loop refuses a reader or writer on a descriptor a transport owns;
- a client that hangs up ends the send with `ClientGone` (an OSError, as ASGI 2.4
  asks of a send to a closed connection; uvicorn's own sends drop the bytes
  silently): a response would otherwise go on "sending", and counting, every
  window of a blob in the page cache without once waiting; a file shorter than
  promised cuts the connection (`AbortResponse`), never ends a short "complete" body.

Offered on plain-HTTP connections only: over TLS the bytes must be encrypted in user
space anyway. Whether each window is in the page cache is the caller's business
(`mirror.filespan`): sendfile of a cold page would block the loop on the disk.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Awaitable, Callable
from typing import Any

from uvicorn.protocols.http.httptools_impl import RequestResponseCycle

from mirror.errors import AbortResponse

EXTENSION = "http.response.zerocopysend"
MESSAGE = "http.response.zerocopysend"

Send = Callable[[Any], Awaitable[None]]


class ClientGone(OSError):
    """The client hung up: nothing more of this response can leave."""


def offer(cycle: RequestResponseCycle, transport: asyncio.Transport) -> None:
    """Offer the extension to the request of `cycle` and handle its messages."""
    cycle.scope.setdefault("extensions", {})[EXTENSION] = {}
    send = cycle.send

    async def send_or_sendfile(message: Any) -> None:
        if message["type"] == MESSAGE:
            await _sendfile(cycle, transport, send, message)
        else:
            await send(message)

    cycle.send = send_or_sendfile  # type: ignore[method-assign]


async def _sendfile(
    cycle: RequestResponseCycle, transport: asyncio.Transport, send: Send, message: Any
) -> None:
    if cycle.flow.write_paused and not cycle.disconnected:
        await cycle.flow.drain()
    if cycle.disconnected:
        raise ClientGone
    if not cycle.response_started or cycle.response_complete:
        raise RuntimeError(f"unexpected ASGI message {MESSAGE!r}")
    if cycle.scope["method"] == "HEAD":
        raise RuntimeError(f"{MESSAGE!r} needs a body")
    fd = message["file"].fileno()
    offset = message.get("offset")
    if offset is None:
        offset = os.lseek(fd, 0, os.SEEK_CUR)
    count = message.get("count")
    if count is None:
        count = os.fstat(fd).st_size - offset
    # Chunked (no Content-Length: a blob of a chunked upstream) frames the file's
    # bytes as one chunk; an empty one would end the body.
    chunked = cycle.chunked_encoding and count > 0
    if not cycle.chunked_encoding and count > cycle.expected_content_length:
        raise RuntimeError("Response content longer than Content-Length")
    if chunked:
        transport.write(b"%x\r\n" % count)
    await _drained(cycle, transport)
    if cycle.disconnected:
        raise ClientGone
    sock = transport.get_extra_info("socket")
    if sock is None:
        raise RuntimeError("no socket to send the file to")
    if not await _send_all(transport, sock.fileno(), fd, offset, count):
        cycle.disconnected = True  # uvicorn's own later writes are dropped
        raise ClientGone
    if chunked:
        transport.write(b"\r\n")
    elif not cycle.chunked_encoding:
        cycle.expected_content_length -= count
    # The cycle's own bookkeeping: completion, keep-alive, the next request.
    await send(
        {"type": "http.response.body", "body": b"", "more_body": message.get("more_body", False)}
    )


async def _drained(cycle: RequestResponseCycle, transport: asyncio.Transport) -> None:
    """Wait until the transport has written everything it buffered."""
    if not transport.get_write_buffer_size():
        return
    low, high = transport.get_write_buffer_limits()
    # The protocol is paused at once (size > 0) and resumed once the buffer is empty.
    transport.set_write_buffer_limits(high=0, low=0)
    try:
        while transport.get_write_buffer_size() and not cycle.disconnected:
            await cycle.flow.drain()
    finally:
        transport.set_write_buffer_limits(high=high, low=low)


async def _send_all(
    transport: asyncio.Transport, sock: int, fd: int, offset: int, count: int
) -> bool:
    """Send [offset, offset+count) of `fd`; False if the client hung up."""
    loop = asyncio.get_running_loop()
    # A duplicate names this connection's socket for as long as the send lasts: the
    # transport may close its own descriptor meanwhile, and the number could then be
    # reused by a new connection, which must never receive these bytes.
    dup = os.dup(sock)
    end = offset + count
    try:
        while offset < end:
            try:
                sent = os.sendfile(dup, fd, offset, end - offset)
            except BlockingIOError:
                await _writable(loop, dup)
                if transport.is_closing():
                    return False  # closed while we waited (the client left, a shutdown)
                continue
            except (BrokenPipeError, ConnectionResetError):
                return False
            if sent == 0:
                raise AbortResponse(f"file shorter than expected ({offset} < {end})")
            offset += sent
        return True
    finally:
        # Never left open: it would keep the connection alive past its close.
        os.close(dup)


async def _writable(loop: asyncio.AbstractEventLoop, fd: int) -> None:
    ready = loop.create_future()

    def wake() -> None:
        if not ready.done():
            ready.set_result(None)

    loop.add_writer(fd, wake)
    try:
        await ready
    finally:
        loop.remove_writer(fd)
