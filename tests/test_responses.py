"""`BlobResponse` driven as ASGI, with bodies that count what happens to them."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest
from starlette.types import Message

from mirror.errors import AbortResponse
from mirror.responses import BlobResponse


class Body:
    """Yields `chunks`; then fails, or waits for `release` before ending."""

    def __init__(self, chunks: list[bytes], fail: bool = False) -> None:
        self.chunks = chunks
        self.fail = fail
        self.release = asyncio.Event()
        self.closed = 0

    async def __aiter__(self) -> AsyncIterator[bytes]:
        for chunk in self.chunks:
            yield chunk
        if self.fail:
            raise AbortResponse("digest did not verify")
        await self.release.wait()

    async def aclose(self) -> None:
        self.closed += 1


async def _run(response: BlobResponse, disconnect: asyncio.Event | None = None) -> list[Message]:
    sent: list[Message] = []
    never = asyncio.Event()

    async def receive() -> Message:
        await (disconnect or never).wait()
        return {"type": "http.disconnect"}

    async def send(message: Message) -> None:
        sent.append(message)

    await response({"type": "http"}, receive, send)
    return sent


async def test_the_body_streams_then_completes_and_is_closed() -> None:
    body = Body([b"ab", b"cd"])
    body.release.set()
    counted: list[int] = []
    sent = await _run(BlobResponse(200, {"Content-Length": "4"}, body, counted.append))
    assert sent[0]["headers"] == [(b"content-length", b"4")]
    assert [m.get("body") for m in sent[1:]] == [b"ab", b"cd", b""]
    assert sent[-1]["more_body"] is False
    assert counted == [2, 2]
    assert body.closed == 1


async def test_a_body_that_fails_midway_cuts_the_response_and_is_closed() -> None:
    body = Body([b"ab"], fail=True)
    sent: list[Message] = []
    with pytest.raises(AbortResponse):
        sent = await _run(BlobResponse(200, {}, body, lambda n: None))
    # The body never "completes": the server must close the connection instead.
    assert not any(m.get("more_body") is False for m in sent)
    assert body.closed == 1


async def test_a_client_that_leaves_stops_the_body_at_once() -> None:
    body = Body([b"ab"])  # then waits forever: only the disconnect can end it
    gone = asyncio.Event()
    sent = await asyncio.wait_for(
        _run(BlobResponse(200, {}, body, lambda n: gone.set()), gone), timeout=5
    )
    assert [m.get("body") for m in sent[1:]] == [b"ab"]
    assert body.closed == 1


async def test_no_body_sends_headers_only_and_adds_no_length() -> None:
    # A chunked upstream's HEAD has no length: a `content-length: 0` would be a lie.
    sent = await _run(BlobResponse(200, {"Docker-Content-Digest": "d"}, None, lambda n: None))
    assert sent[0]["headers"] == [(b"docker-content-digest", b"d")]
    assert sent[1] == {"type": "http.response.body", "body": b""}
