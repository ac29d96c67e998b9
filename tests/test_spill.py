"""Disk full: a download that spills to the relay, against the fake upstream."""

from __future__ import annotations

import asyncio
import hashlib
import os
import sqlite3
from pathlib import Path
from typing import Any

import httpx
import pytest
from conftest import MirrorFactory, until
from fakes.disk import fill_disk_after
from fakes.upstream import FakeUpstream, Fault

from mirror.diskindex import DiskIndex
from mirror.diskstore import DiskStore
from mirror.reference import Digest


def _digest(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


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
        downloads = m.app.state.components.router.route(None, "a").proxy.downloads
        key = Digest.parse(digest)
        a = c.stream("GET", f"/v2/a/blobs/{digest}")
        ra = await a.__aenter__()
        it = ra.aiter_raw()
        await anext(it)  # A is under way and spilled
        monkeypatch.undo()  # space is back
        b = asyncio.create_task(c.get(f"/v2/a/blobs/{digest}"))  # B: a fresh download
        await until(lambda: downloads.active(key) is not None, "B in the table")
        b_dl = downloads.active(key)
        assert b_dl is not None and not b_dl.spilled
        await a.__aexit__(None, None, None)  # A's only client leaves: A is Abandoned
        await until(lambda: m.metric("mirror_downloads_in_flight") == 1, "A to end")
        assert b_dl.state == "streaming"
        assert downloads.active(key) is b_dl, "A's failure removed B from the table"
        # B is still running and must still be the shared download for this digest.
        assert b_dl.state == "streaming"
        c_resp = await c.get(f"/v2/a/blobs/{digest}")  # C should join B
        assert (await b).content == big and c_resp.content == big
        # A and B fetched it; C had to fetch it again because B was no longer findable.
        assert upstream.count("GET", f"/blobs/{digest}") == 2


async def test_index_write_failure_on_commit_leaves_no_file_behind(
    fake: tuple[FakeUpstream, str],
    mirror: MirrorFactory,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The commit renames the temp file into blobs/, then the index write fails (full
    disk: SQLITE_FULL): the renamed file must go too, or it stays in blobs/,
    unindexed, taking space until a restart."""
    upstream, url = fake
    data = os.urandom(1 << 20)
    digest = upstream.add_blob(data)

    def index_full(*args: Any) -> None:
        raise sqlite3.OperationalError("database or disk is full")

    monkeypatch.setattr(DiskIndex, "_add_blob", index_full)
    async with mirror(url) as m, httpx.AsyncClient(base_url=m.url, timeout=30) as c:
        r = await c.get(f"/v2/a/blobs/{digest}")
        assert r.content == data
        await until(
            lambda: m.metric("mirror_cache_write_failures_total", kind="blob") > 0, "a failure"
        )
        assert m.metric("mirror_cache_write_failures_total", kind="blob") == 1
    cache = tmp_path / "cache"
    left = [p for d in ("blobs", "tmp") for p in (cache / d).rglob("*") if p.is_file()]
    assert left == [], f"orphaned blob file(s): {left}"


async def test_range_on_a_spilled_chunked_download_is_served_and_stalls_nobody(
    fake: tuple[FakeUpstream, str], mirror: MirrorFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """No Content-Length: a Range request waits in dl.finished() for the size. Its cursor
    must hold the relay only from the range's start, never from byte 0, or every
    client would stall for relay.STALL and the Range request would then be cut."""
    from mirror import relay

    big = os.urandom(8 << 20)
    upstream, url = fake
    digest = upstream.add_blob(big)
    upstream.faults[digest] = Fault(chunked=True, chunk=256 * 1024, delay=0.02)
    # The window holds the range's own bytes (7 MB to the end), not the whole blob.
    monkeypatch.setattr(relay, "WINDOW", 2 << 20)
    monkeypatch.setattr(relay, "STALL", 3.0)
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


async def test_a_404_on_a_read_only_cache_is_not_a_cache_write_failure(
    fake: tuple[FakeUpstream, str],
    mirror: MirrorFactory,
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
) -> None:
    _upstream, url = fake
    monkeypatch.setattr(DiskStore, "temp_path", lambda self: tmp_path / "gone" / "x")
    monkeypatch.setattr(DiskStore, "leased_temp", lambda self, d, u: tmp_path / "gone" / "x")
    async with mirror(url) as m, httpx.AsyncClient(base_url=m.url, timeout=20) as c:
        r = await c.get(f"/v2/a/blobs/{_digest(b'nope')}")
        assert r.status_code == 404
        assert m.metric("mirror_cache_write_failures_total", kind="blob") == 0
