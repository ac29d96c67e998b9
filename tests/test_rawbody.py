"""Large upstream bodies read off the socket in whole blocks, through the real client."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Awaitable, Callable

import httpx
import pytest
from conftest import MirrorFactory
from fakes.disk import fill_disk_after
from fakes.rawupstream import RawUpstream, Request, Script, Step
from fakes.upstream import FakeUpstream

from mirror import rawbody
from mirror.errors import UpstreamError
from mirror.metrics import Metrics
from mirror.remoteblob import RemoteBlob
from mirror.upstream import make_client

PATH = "/v2/a/blobs/sha256:x"
MiB = 1 << 20


def _head(length: int, status: int = 200, extra: str = "") -> bytes:
    return (
        f"HTTP/1.1 {status} OK\r\ncontent-length: {length}\r\n{extra}"
        "content-type: application/octet-stream\r\n\r\n"
    ).encode()


def _serving(data: bytes, steps: Callable[[Request, bytes], list[Step]]) -> RawUpstream:
    return RawUpstream(lambda request: Script(steps(request, data)))


def _whole(request: Request, data: bytes) -> list[Step]:
    start = int(request.headers.get("range", "bytes=0-")[6:].rstrip("-") or 0)
    if start:
        extra = f"content-range: bytes {start}-{len(data) - 1}/{len(data)}\r\n"
        return [_head(len(data) - start, 206, extra), data[start:]]
    return [_head(len(data)), data]


async def _read(url: str, *, attempts: int = 0, stall: float = 30.0) -> tuple[list[bytes], Metrics]:
    client = make_client(5, 30)
    metrics = Metrics()

    def get(start: int) -> Awaitable[httpx.Response]:
        headers = {"Range": f"bytes={start}-"} if start else {}
        return client.send(client.build_request("GET", url + PATH, headers=headers), stream=True)

    try:
        blob = RemoteBlob(
            PATH,
            await get(0),
            get,
            metrics,
            "up",
            max_bytes=1 << 30,
            resume_attempts=attempts,
            stall_timeout=stall,
        )
        try:
            return [bytes(chunk) async for chunk in blob], metrics
        finally:
            await blob.aclose()
    finally:
        await client.aclose()


def _resumes(metrics: Metrics) -> float:
    return metrics.registry.get_sample_value("mirror_upstream_resumes_total") or 0.0


async def test_a_large_body_arrives_in_whole_blocks_and_its_connection_is_not_reused() -> None:
    data = os.urandom(20 * MiB + 12345)
    upstream = _serving(data, _whole)
    async with upstream.serve() as url:
        chunks, _ = await _read(url)
        again, _ = await _read(url)
    assert b"".join(chunks) == data == b"".join(again)
    # After what aiohttp had read ahead, whole 1 MiB blocks: one turn per MiB.
    assert sum(1 for c in chunks if len(c) == rawbody.BLOCK) >= 18
    assert len(chunks) <= 24
    assert upstream.connections == 2


async def test_a_small_body_is_read_through_httpx_as_before() -> None:
    data = os.urandom(rawbody.MIN_SIZE - 1)
    upstream = _serving(data, _whole)
    async with upstream.serve() as url:
        chunks, _ = await _read(url)
    assert b"".join(chunks) == data
    assert all(len(c) < rawbody.BLOCK for c in chunks) or len(chunks) > 8


async def test_a_body_cut_midway_is_resumed_from_the_next_byte() -> None:
    data = os.urandom(12 * MiB)
    cut = 5 * MiB + 777

    def steps(request: Request, data: bytes) -> list[Step]:
        if "range" in request.headers:
            return _whole(request, data)
        return [_head(len(data)), data[:cut], None]  # then the connection closes

    upstream = _serving(data, steps)
    async with upstream.serve() as url:
        chunks, metrics = await _read(url, attempts=1)
    assert hashlib.sha256(b"".join(chunks)).digest() == hashlib.sha256(data).digest()
    assert _resumes(metrics) == 1
    assert [r.headers.get("range") for r in upstream.requests] == [None, f"bytes={cut}-"]


async def test_a_body_that_ends_short_is_a_502_never_a_short_success() -> None:
    data = os.urandom(10 * MiB)
    upstream = _serving(data, lambda _r, d: [_head(len(d)), d[: 3 * MiB], None])
    async with upstream.serve() as url:
        with pytest.raises(UpstreamError) as err:
            await _read(url, attempts=0)
    assert err.value.status == 502


async def test_bytes_past_the_content_length_are_not_part_of_the_body() -> None:
    data = os.urandom(9 * MiB)
    upstream = _serving(data, lambda _r, d: [_head(len(d)), d + b"HTTP/1.1 200 OK\r\n\r\njunk"])
    async with upstream.serve() as url:
        chunks, _ = await _read(url)
    assert b"".join(chunks) == data


async def test_a_slow_upstream_shows_progress_before_a_block_fills(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # 1.2 MiB at 400 KiB/s: a 1 MiB block takes 2.5 s to fill, past the 0.8 s stall
    # watchdog. Partly filled blocks are handed on instead, so nothing is resumed.
    monkeypatch.setattr(rawbody, "MIN_SIZE", MiB)
    data = os.urandom(12 * 100 * 1024)

    def steps(_r: Request, d: bytes) -> list[Step]:
        out: list[Step] = [_head(len(d))]
        for i in range(0, len(d), 100 * 1024):
            out += [d[i : i + 100 * 1024], 0.25]
        return out

    upstream = _serving(data, steps)
    async with upstream.serve() as url:
        chunks, metrics = await _read(url, attempts=1, stall=0.8)
    assert b"".join(chunks) == data
    assert _resumes(metrics) == 0
    assert len(chunks) >= 4  # progress came in pieces, not one block at the end


async def test_through_the_mirror_a_large_blob_is_served_cached_and_spilled(
    fake: tuple[FakeUpstream, str], mirror: MirrorFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    upstream, url = fake
    cached, spilled = os.urandom(12 * MiB), os.urandom(10 * MiB)
    first, second = upstream.add_blob(cached), upstream.add_blob(spilled)
    async with mirror(url) as m, httpx.AsyncClient(base_url=m.url, timeout=30) as c:
        for _ in range(2):  # a miss, then a hit
            r = await c.get(f"/v2/a/blobs/{first}")
            assert r.status_code == 200 and r.content == cached
        fill_disk_after(monkeypatch, 0)  # the next blob is relayed from memory
        r = await c.get(f"/v2/a/blobs/{second}")
        assert r.status_code == 200 and r.content == spilled
    assert upstream.count("GET", f"/blobs/{first}") == 1
