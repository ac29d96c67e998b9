"""RemoteBlob over hand-made responses: resume, the stall watchdog, the size bound."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import httpx
import pytest

from mirror.errors import UpstreamError
from mirror.metrics import Metrics
from mirror.remoteblob import RemoteBlob


class Stream(httpx.AsyncByteStream):
    """Yields `chunks`, then hangs forever if `hang` (a connection gone silent)."""

    def __init__(self, chunks: list[bytes], hang: bool = False) -> None:
        self.chunks = chunks
        self.hang = hang

    async def __aiter__(self) -> AsyncIterator[bytes]:
        for chunk in self.chunks:
            yield chunk
        if self.hang:
            await asyncio.Event().wait()


def _blob(
    resp: httpx.Response, metrics: Metrics, *, max_bytes: int = 1 << 20, attempts: int = 1
) -> RemoteBlob:
    async def resume(offset: int) -> httpx.Response:
        rest = b"abcdef"[offset:]
        headers = {"content-range": f"bytes {offset}-5/6"}
        return httpx.Response(206, headers=headers, stream=Stream([rest]))

    return RemoteBlob(
        "/v2/a/blobs/x",
        resp,
        resume,
        metrics,
        "up",
        max_bytes=max_bytes,
        resume_attempts=attempts,
        stall_timeout=0.2,
    )


def _resumes(metrics: Metrics) -> float:
    return metrics.registry.get_sample_value("mirror_upstream_resumes_total") or 0.0


async def test_a_body_gone_silent_is_resumed_by_the_watchdog() -> None:
    metrics = Metrics()
    resp = httpx.Response(200, headers={"content-length": "6"}, stream=Stream([b"abc"], True))
    blob = _blob(resp, metrics)
    body = await asyncio.wait_for(_read(blob), timeout=5)
    assert body == b"abcdef"
    assert _resumes(metrics) == 1


async def test_a_slow_consumer_is_no_stall() -> None:
    metrics = Metrics()
    resp = httpx.Response(200, headers={"content-length": "6"}, stream=Stream([b"abc", b"def"]))
    chunks = []
    async for chunk in _blob(resp, metrics):
        chunks.append(chunk)
        await asyncio.sleep(0.3)  # longer than the watchdog: the consumer's time
    assert b"".join(chunks) == b"abcdef"
    assert _resumes(metrics) == 0


async def test_a_silent_body_past_its_resumes_is_a_plain_502() -> None:
    resp = httpx.Response(200, headers={"content-length": "6"}, stream=Stream([b"abc"], True))
    with pytest.raises(UpstreamError) as err:
        await asyncio.wait_for(_read(_blob(resp, Metrics(), attempts=0)), timeout=5)
    assert (err.value.status, err.value.message) == (502, "upstream download failed")


async def test_an_announced_length_past_the_bound_is_refused_before_a_byte() -> None:
    resp = httpx.Response(200, headers={"content-length": str(10**13)}, stream=Stream([]))
    with pytest.raises(UpstreamError, match="size limit"):
        _blob(resp, Metrics(), max_bytes=1000)


async def test_a_body_that_grows_past_the_bound_is_cut() -> None:
    resp = httpx.Response(200, stream=Stream([b"x" * 600, b"x" * 600]))  # no length
    with pytest.raises(UpstreamError, match="size limit"):
        await _read(_blob(resp, Metrics(), max_bytes=1000))


async def _read(blob: RemoteBlob) -> bytes:
    try:
        return b"".join([chunk async for chunk in blob])
    finally:
        await blob.aclose()


async def test_a_body_silent_from_its_first_byte_is_cut_too() -> None:
    resp = httpx.Response(200, headers={"content-length": "6"}, stream=Stream([], True))
    with pytest.raises(UpstreamError):
        await asyncio.wait_for(_read(_blob(resp, Metrics(), attempts=0)), timeout=5)
