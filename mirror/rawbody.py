"""A large upstream body read straight off the socket into 1 MiB blocks.

aiohttp parses an HTTP body into a `bytes` object per socket read, and its
`read(n)` joins those into chunks of up to n: an allocation and a copy of every byte
on top of the kernel's own copy, and a Python turn per 64-256 KiB. For a blob body of
known length the parser has nothing left to do once the head is read, so the
connection's transport is handed to a `BufferedProtocol` here: the kernel copies
each read into the free end of a 1 MiB `bytearray` (`recv_into`), and only full
blocks go on to the download (its writer thread hashes and writes them as they are).

Measured reading a 1 GiB body from loopback (bench/transport.py): 0.38-0.46 CPU-s per
GB through httpx on aiohttp, 0.20-0.27 with this.

- Only for bodies of at least `MIN_SIZE` with a Content-Length, read through the
  mirror's own client (`mirror.transport`); anything else, or an aiohttp whose
  internals moved, is read through httpx as before.
- The connection is closed after the body, never returned to the pool: it was taken
  from aiohttp's parser. One new connection per large blob costs nothing measurable.
- A slow upstream still shows progress: a partly filled block is handed on when the
  next one has been waited for `flush` seconds, so the stall watchdog (`RemoteBlob`)
  sees bytes, not the block size.
- A break is an `httpx.ReadError` (reset) or `httpx.RemoteProtocolError` (the body
  ended short), like httpx's own, once the bytes that did arrive are handed on: the
  body is resumed from the next byte, as before.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
from collections.abc import AsyncIterator

import aiohttp
import httpx

from mirror.transport import aiohttp_response

BLOCK = 1 << 20
MIN_SIZE = 8 << 20
# Full blocks waiting for the download: past this, reading pauses (memory per body).
MAX_QUEUED = 4


def take(resp: httpx.Response, flush: float) -> AsyncIterator[bytes] | None:
    """The rest of `resp`'s body, read off its socket; None if it cannot be taken."""
    length = resp.headers.get("content-length")
    if length is None or not length.isdigit() or int(length) < MIN_SIZE:
        return None
    if resp.headers.get("content-encoding", "identity") != "identity":
        return None
    aio = aiohttp_response(resp)
    if aio is None:
        return None
    content = aio.content
    try:
        buffered: collections.deque[bytes] = content._buffer
        consumed = content.total_bytes - content._size  # already handed to httpx
        connection = aio.connection
        transport = None if connection is None else connection.transport
    except AttributeError:
        return None
    if (
        consumed != 0
        or transport is None
        or transport.is_closing()
        or content.exception() is not None
        or content.is_eof()
    ):
        return None
    return _chunks(aio, transport, buffered, int(length), flush)


async def _chunks(
    aio: aiohttp.ClientResponse,
    transport: asyncio.Transport,
    buffered: collections.deque[bytes],
    length: int,
    flush: float,
) -> AsyncIterator[bytes]:
    # What aiohttp read ahead of us, in order, then the socket's own bytes.
    early = list(buffered)
    buffered.clear()
    aio.content._size = 0
    left = length - sum(len(chunk) for chunk in early)
    try:
        if left < 0:
            raise httpx.RemoteProtocolError("upstream sent more than its Content-Length")
        reader = _BlockReader(transport, left)
        for chunk in early:
            yield chunk
        transport.set_protocol(reader)
        transport.resume_reading()
        while (block := await reader.next(flush)) is not None:
            yield block
    finally:
        # Taken from aiohttp's parser: never back into the pool.
        aio.close()


class _BlockReader(asyncio.BufferedProtocol):
    def __init__(self, transport: asyncio.Transport, left: int) -> None:
        self._transport = transport
        self._left = left  # bytes of the body not yet read
        self._block = bytearray(min(BLOCK, left))
        self._filled = 0
        self._ready: collections.deque[bytearray] = collections.deque()
        self._error: Exception | None = None
        self._wake: asyncio.Future[None] | None = None
        self._paused = False
        self._spare: bytearray | None = None  # for bytes past the body, if any: ignored

    # -- the transport's side -----------------------------------------------------------

    def get_buffer(self, sizehint: int) -> memoryview:
        if self._left == 0:
            if self._spare is None:
                self._spare = bytearray(65536)
            return memoryview(self._spare)
        return memoryview(self._block)[self._filled :]

    def buffer_updated(self, nbytes: int) -> None:
        if self._left == 0:
            return  # past the body: the connection is closed after it, never reused
        self._filled += nbytes
        self._left -= nbytes
        if self._filled == len(self._block):
            self._ready.append(self._block)
            self._block = bytearray(min(BLOCK, self._left))
            self._filled = 0
            if len(self._ready) >= MAX_QUEUED and not self._paused:
                self._paused = True
                self._transport.pause_reading()
            self._wakeup()

    def eof_received(self) -> bool:
        if self._left:
            self._fail(
                httpx.RemoteProtocolError(
                    "peer closed connection without sending complete message body"
                )
            )
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        if self._left:
            self._fail(httpx.ReadError(f"connection lost: {exc!r}" if exc else "connection lost"))

    def _fail(self, error: Exception) -> None:
        if self._error is None:
            self._error = error
        self._wakeup()

    def _wakeup(self) -> None:
        if self._wake is not None and not self._wake.done():
            self._wake.set_result(None)

    # -- the reader's side --------------------------------------------------------------

    async def next(self, flush: float) -> bytes | None:
        """The next full block (a partial one after `flush` seconds), None at the end."""
        while True:
            if self._ready:
                block = self._ready.popleft()
                if self._paused and len(self._ready) < MAX_QUEUED // 2:
                    self._paused = False
                    self._transport.resume_reading()
                return block  # type: ignore[return-value]  # a bytes-like the writer keeps
            if self._error is not None:
                if self._filled:
                    return self._partial()  # what arrived before the break is kept
                raise self._error
            if self._left == 0 and self._filled == 0:
                return None
            self._wake = asyncio.get_running_loop().create_future()
            waited = False
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(flush):
                    await self._wake
                waited = True
            if not waited and self._filled and not self._ready:
                return self._partial()  # a slow upstream: progress shows

    def _partial(self) -> bytes:
        """The filled part of the current block; the rest stays for the next bytes."""
        part, self._block = self._block[: self._filled], self._block[self._filled :]
        self._filled = 0
        return part  # type: ignore[return-value]  # a bytes-like the writer keeps
