"""Disk full: regression tests from the review of the spill (relay) path."""

from __future__ import annotations

import asyncio
import hashlib
import os
import sqlite3
from pathlib import Path
from typing import Any

import httpx
import pytest
from conftest import MirrorFactory
from fakes.disk import fill_disk_after
from fakes.upstream import FakeUpstream, Fault


def _digest(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


# 1 -------------------------------------------------------------------------------------
async def test_failing_spilled_download_does_not_evict_its_successor_from_the_table(
    fake: tuple[FakeUpstream, str], mirror: MirrorFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A spilled download leaves `_active`; a new one (B) takes the slot. When the
    spilled one (A) then fails, `_run` pops the slot unconditionally and removes B."""
    big = os.urandom(8 << 20)
    upstream, url = fake
    digest = upstream.add_blob(big)
    upstream.faults[digest] = Fault(chunk=256 * 1024, delay=0.05)  # ~1.6 s per body
    fill_disk_after(monkeypatch, 0)
    async with mirror(url) as m, httpx.AsyncClient(base_url=m.url, timeout=30) as c:
        proxy = m.app.state.services.upstreams.route(None, "a").proxy
        downloads = proxy._downloads
        a = c.stream("GET", f"/v2/a/blobs/{digest}")
        ra = await a.__aenter__()
        it = ra.aiter_raw()
        await anext(it)  # A is under way and spilled
        monkeypatch.undo()  # space is back
        b = asyncio.create_task(c.get(f"/v2/a/blobs/{digest}"))  # B: a fresh download
        for _ in range(100):
            if downloads.active(proxy._upstream, digest) is not None:
                break
            await asyncio.sleep(0.01)
        b_dl = downloads.active(proxy._upstream, digest)
        assert b_dl is not None and not b_dl.spilled
        await a.__aexit__(None, None, None)  # A's only client leaves: A is Abandoned
        await asyncio.sleep(0.5)
        assert b_dl.state == "streaming"
        assert downloads.active(proxy._upstream, digest) is b_dl, (
            "A's failure removed B from the table"
        )
        # B is still running and must still be the shared download for this digest.
        assert b_dl.state == "streaming"
        c_resp = await c.get(f"/v2/a/blobs/{digest}")  # C should join B
        assert (await b).content == big and c_resp.content == big
        # A and B fetched it; C had to fetch it again because B was no longer findable.
        assert upstream.count("GET", f"/blobs/{digest}") == 2


# 2 -------------------------------------------------------------------------------------
async def test_relay_stall_cuts_a_reader_stalled_mid_chunk(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """A reader that stops right after the held-back byte sits inside the relay's first
    chunk; with smaller chunks after it, `room()` never finds it `< keep_from`, so the
    producer waits in RELAY_STALL rounds forever and every other client hangs."""
    from mirror import downloads
    from mirror.downloads import BlobDownload
    from mirror.reference import Digest
    from mirror.responses import read_download

    monkeypatch.setattr(downloads, "RELAY_WINDOW", 600 << 10)
    monkeypatch.setattr(downloads, "RELAY_STALL", 0.1)
    dl = BlobDownload(Digest.parse(_digest(b"x")), tmp_path / "t", "up", "a")
    dl.state, dl.size = "streaming", 64 << 20
    dl.spill()
    cursor = dl.attach()
    stalled = read_download(dl, None, cursor, 0, None)
    dl.push(b"a" * (512 << 10))  # a relay chunk larger than responses.CHUNK (256 KiB)
    assert len(await anext(stalled)) == 256 << 10  # the reader is mid-chunk; then it stalls

    async def produce() -> None:  # as _copy: write (pushed a moment later), then room()
        while True:
            await asyncio.sleep(0)
            dl.push(b"b" * 4096)  # upstream trickles in small reads
            await dl.room()

    producer = asyncio.create_task(produce())
    await asyncio.sleep(1.0)  # 10 x RELAY_STALL
    stuck_at = dl.written
    producer.cancel()
    assert cursor.lagged, f"stalled reader never cut; producer stuck at {stuck_at} bytes"


# 3 -------------------------------------------------------------------------------------
async def test_index_write_failure_on_commit_leaves_no_file_behind(
    fake: tuple[FakeUpstream, str], mirror: MirrorFactory, tmp_path: Path
) -> None:
    """commit_blob renames the temp file into blobs/, then the index write fails (full
    disk: SQLITE_FULL). `_run` unlinks `dl.path`, still the temp name: the renamed blob
    stays in blobs/, unindexed, taking space until a restart."""
    upstream, url = fake
    data = os.urandom(1 << 20)
    digest = upstream.add_blob(data)
    async with mirror(url) as m, httpx.AsyncClient(base_url=m.url, timeout=30) as c:
        storage = m.app.state.services.upstreams.route(None, "a").proxy._storage
        real = storage._index

        class FullIndex:
            def __getattr__(self, name: str) -> Any:
                return getattr(real, name)

            def set(self, key: str, value: Any) -> None:
                if key.startswith("blob/"):
                    raise sqlite3.OperationalError("database or disk is full")
                real.set(key, value)

        storage._index = FullIndex()
        r = await c.get(f"/v2/a/blobs/{digest}")
        assert r.content == data
        for _ in range(50):
            if m.metric("mirror_cache_write_failures_total", kind="blob"):
                break
            await asyncio.sleep(0.02)
        assert m.metric("mirror_cache_write_failures_total", kind="blob") == 1
        storage._index = real
    cache = tmp_path / "cache"
    left = [p for d in ("blobs", "tmp") for p in (cache / d).rglob("*") if p.is_file()]
    assert left == [], f"orphaned blob file(s): {left}"


# 4 -------------------------------------------------------------------------------------
async def test_range_on_a_spilled_chunked_download_is_served_and_stalls_nobody(
    fake: tuple[FakeUpstream, str], mirror: MirrorFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """No Content-Length: a Range request waits in dl.finished() for the size. Its cursor
    must hold the relay only from the range's start, never from byte 0, or every
    client would stall for RELAY_STALL and the Range request would then be cut."""
    from mirror import downloads

    big = os.urandom(8 << 20)
    upstream, url = fake
    digest = upstream.add_blob(big)
    upstream.faults[digest] = Fault(chunked=True, chunk=256 * 1024, delay=0.02)
    # The window holds the range's own bytes (7 MB to the end), not the whole blob.
    monkeypatch.setattr(downloads, "RELAY_WINDOW", 2 << 20)
    monkeypatch.setattr(downloads, "RELAY_STALL", 3.0)
    fill_disk_after(monkeypatch, 1 << 20)  # both requests attach before the spill
    async with mirror(url) as m, httpx.AsyncClient(base_url=m.url, timeout=30) as c:
        loop = asyncio.get_running_loop()
        t0 = loop.time()

        async def full() -> tuple[bytes, float]:
            r = await c.get(f"/v2/a/blobs/{digest}")
            return r.content, loop.time() - t0

        async def ranged() -> httpx.Response | Exception:
            try:
                return await c.get(f"/v2/a/blobs/{digest}", headers={"Range": "bytes=7000000-"})
            except httpx.HTTPError as exc:
                return exc

        (body, took), rng = await asyncio.gather(full(), ranged())
        assert upstream.count("GET", f"/blobs/{digest}") == 1
    assert body == big
    assert took < 3.0, f"the full GET was stalled for {took:.1f} s by the Range request"
    assert isinstance(rng, httpx.Response), rng
    assert (rng.status_code, rng.content) == (206, big[7000000:])


# 5 -------------------------------------------------------------------------------------
async def test_a_404_on_a_read_only_cache_is_not_a_cache_write_failure(
    fake: tuple[FakeUpstream, str],
    mirror: MirrorFactory,
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
) -> None:
    from mirror.storage import Storage

    _upstream, url = fake
    monkeypatch.setattr(Storage, "temp_path", lambda self: tmp_path / "gone" / "x")
    async with mirror(url) as m, httpx.AsyncClient(base_url=m.url, timeout=20) as c:
        r = await c.get(f"/v2/a/blobs/{_digest(b'nope')}")
        assert r.status_code == 404
        assert m.metric("mirror_cache_write_failures_total", kind="blob") == 0
