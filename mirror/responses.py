"""The blob response: status, headers, and a body streamed to the client.

It knows nothing of files or downloads: the body (`mirror.store.Body`) does, and is
closed here whatever happens. What the body has on disk (`FileSpan`s) is sent with
sendfile(2) where the server offers zero-copy (`mirror.zerocopy`), else read.
It watches for client disconnects itself (uvicorn drops writes to a gone client
silently), so a departed client stops reading at once; and a
body that fails mid-way (`AbortResponse`) propagates, so the connection is cut
instead of ending a short, "successful" body.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Mapping

from starlette.responses import Response
from starlette.types import Receive, Scope, Send

from mirror import zerocopy
from mirror.filespan import FileSpan, as_bytes
from mirror.store import Body


class BlobResponse(Response):
    # A Response subclass only so that FastAPI passes it through; its __init__ is
    # not used: it would add `content-length: 0` for an empty body, turning a blob of
    # unknown length (chunked upstream) into a "complete" empty one.
    def __init__(
        self,
        status_code: int,
        headers: Mapping[str, str],
        body: Body | None,
        on_chunk: Callable[[int], None],
    ) -> None:
        self.status_code = status_code
        self.background = None
        self.raw_headers = [
            (k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in headers.items()
        ]
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
            zero_copy = zerocopy.EXTENSION in scope.get("extensions", {})
            stream = asyncio.ensure_future(self._stream(self._body, send, zero_copy))
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
            if self._body is not None:
                await self._body.aclose()

    async def _stream(self, body: Body, send: Send, zero_copy: bool) -> None:
        if not zero_copy:  # TLS, or an ASGI caller without the extension: read spans
            async for piece in as_bytes(body):
                await self._send(send, piece)
        else:
            async for chunk in body:
                if not isinstance(chunk, FileSpan):
                    await self._send(send, chunk)  # a relay's bytes (perhaps a bytearray)
                    continue
                async for window in chunk.windows():
                    try:
                        await send(
                            {
                                "type": zerocopy.MESSAGE,
                                "file": window,
                                "offset": window.offset,
                                "count": window.count,
                                "more_body": True,
                            }
                        )
                    except zerocopy.ClientGone:
                        return  # nothing more leaves, and what did not is not counted
                    self._on_chunk(window.count)
        await send({"type": "http.response.body", "body": b"", "more_body": False})

    async def _send(self, send: Send, chunk: bytes) -> None:
        await send({"type": "http.response.body", "body": chunk, "more_body": True})
        self._on_chunk(len(chunk))


async def _wait_disconnect(receive: Receive) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass
