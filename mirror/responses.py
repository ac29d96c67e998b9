"""Blob response bodies: a cached file, or a download that is still growing.

A body is read with blocking 256 KiB `pread`s in the event loop: measured fastest for
page-cache hits (~3 GB/s, vs 0.55 GB/s with 64 KiB thread hops: docs/design.md), and the
bytes of an in-flight download were just written, so they are in the page cache.

`BlobResponse` watches for client disconnects itself (uvicorn drops writes to a gone
client silently), so a departed client stops reading at once; and it turns a failed
download into an aborted connection instead of a short, "successful" body.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator, Callable, Mapping

from starlette.responses import Response
from starlette.types import Receive, Scope, Send

from mirror.downloads import BlobDownload, Cursor
from mirror.errors import AbortResponse

# 256 KiB per read and send: each stream holds about two chunks (ours, plus the
# transport's copy of what the socket did not take yet), so 64 streams of 1 GiB peaked
# at ~111 MiB RSS with 256 KiB vs ~265 MiB with 1 MiB, at the same throughput
# (docs/benchmarks.md).
CHUNK = 256 << 10


async def read_file(fd: int, start: int, end: int) -> AsyncIterator[bytes]:
    pos = start
    while pos < end:
        chunk = os.pread(fd, min(CHUNK, end - pos), pos)
        if not chunk:
            raise AbortResponse(f"cached file shorter than its index entry ({pos} < {end})")
        pos += len(chunk)
        yield chunk


async def read_download(
    dl: BlobDownload, fd: int | None, cursor: Cursor, start: int, end: int | None
) -> AsyncIterator[bytes]:
    """Follow a download from `start` to `end` (None: to the blob's end).

    The last byte of the response is held back until the download has verified its
    digest: a client that has every byte may hang up at once, and must never have
    received a complete body whose digest failed (docs/design.md, "Blob path").
    Bytes come from the download's file, or from its relay once it has spilled.
    """
    pos = cursor.pos = start
    try:
        while True:
            event = dl.current_event()  # taken before reading state: no lost wake-ups
            if dl.state == "failed":
                raise AbortResponse(f"download of {dl.digest} failed")
            if cursor.lagged:
                raise AbortResponse(f"client fell behind the uncached relay of {dl.digest}")
            # Verified is enough to finish: the bytes are final, only the commit is left.
            final = dl.state in ("verified", "committed")
            stop = end if end is not None else dl.size
            if final:
                assert dl.size is not None
                stop = dl.size if stop is None else min(stop, dl.size)
                readable = stop
            else:
                readable = dl.written if stop is None else min(dl.written, stop)
                if stop is None or readable >= stop:
                    readable -= 1
            if pos < readable:
                chunk = _read_at(dl, fd, pos, min(CHUNK, readable - pos))
                pos = cursor.pos = pos + len(chunk)
                dl.moved()
                yield chunk
                continue
            if final and stop is not None and pos >= stop:
                return
            await event.wait()
    finally:
        cursor.closed = True
        dl.moved()


def _read_at(dl: BlobDownload, fd: int | None, pos: int, want: int) -> bytes:
    """Up to `want` bytes at `pos`: from the file below `on_disk`, else the relay."""
    chunk: bytes | None
    if pos < dl.on_disk:
        assert fd is not None
        chunk = os.pread(fd, min(want, dl.on_disk - pos), pos)
    else:
        chunk = dl.relay_read(pos, want)
        if chunk is None:
            raise AbortResponse(f"client fell behind the uncached relay of {dl.digest}")
    if not chunk:
        raise AbortResponse(f"download of {dl.digest} shrank")
    return chunk


class BlobResponse(Response):
    """Streams a blob body; closes the file whatever happens."""

    def __init__(
        self,
        status_code: int,
        headers: Mapping[str, str],
        fd: int | None,
        body: AsyncIterator[bytes] | None,
        on_chunk: Callable[[int], None],
    ) -> None:
        # Not Response.__init__: it would add `content-length: 0` for an empty body,
        # turning a blob of unknown length (chunked upstream) into a "complete" empty one.
        self.status_code = status_code
        self.background = None
        self.raw_headers = [
            (k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in headers.items()
        ]
        self._fd = fd
        self._body = body
        self._on_chunk = on_chunk

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await send(
                {
                    "type": "http.response.start",
                    "status": self.status_code,
                    "headers": self.raw_headers,
                }
            )
            if self._body is None:
                await send({"type": "http.response.body", "body": b""})
                return
            stream = asyncio.ensure_future(self._stream(send))
            watch = asyncio.ensure_future(_wait_disconnect(receive))
            try:
                await asyncio.wait({stream, watch}, return_when=asyncio.FIRST_COMPLETED)
            finally:
                stream.cancel()
                watch.cancel()
                outcome, _ = await asyncio.gather(stream, watch, return_exceptions=True)
            if isinstance(outcome, BaseException) and not isinstance(
                outcome, asyncio.CancelledError
            ):
                raise outcome
        finally:
            if self._fd is not None:
                os.close(self._fd)
                self._fd = None

    async def _stream(self, send: Send) -> None:
        assert self._body is not None
        try:
            async for chunk in self._body:
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
                self._on_chunk(len(chunk))
            await send({"type": "http.response.body", "body": b"", "more_body": False})
        finally:
            await self._body.aclose()  # type: ignore[attr-defined]


async def _wait_disconnect(receive: Receive) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass
