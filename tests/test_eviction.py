"""Eviction by content TTL and by size (LRU), with an injected clock."""

from __future__ import annotations

import os
from pathlib import Path

import httpx
from conftest import MirrorFactory, get_when_cached
from fakes.cache import commit_bytes
from fakes.clock import Clock
from fakes.upstream import FakeUpstream

from mirror.diskstore import DiskStore
from mirror.eviction import Evictor
from mirror.filespan import as_bytes

DAY = 86400.0


def _on_disk(store: DiskStore) -> int:
    return sum(p.stat().st_size for p in store.blob_dir.rglob("*") if p.is_file())


async def test_unused_content_expires_and_access_refreshes_it(tmp_path: Path) -> None:
    clock = Clock()
    store = DiskStore(tmp_path, clock)
    evictor = Evictor(
        store, None, content_ttl=7 * DAY, max_size=None, max_stale=7 * DAY, clock=clock
    )
    used, unused = await commit_bytes(store, b"used"), await commit_bytes(store, b"unused")
    clock.now += 5 * DAY
    store.touch_blob(used)  # a hit, recorded in memory only
    clock.now += 3 * DAY
    result = evictor.evict()
    assert (result.ttl_blobs, result.size_blobs) == (1, 0)
    assert [b.digest for b in store.scan().blobs] == [used]
    assert not store.blob_path(unused).exists()
    clock.now += 7 * DAY + 1
    assert evictor.evict().ttl_blobs == 1
    assert list(store.scan().blobs) == []
    store.close()


async def test_size_cap_evicts_least_recently_used_first(tmp_path: Path) -> None:
    clock = Clock()
    store = DiskStore(tmp_path, clock)
    evictor = Evictor(
        store, None, content_ttl=7 * DAY, max_size=2500, max_stale=7 * DAY, clock=clock
    )
    blobs = {}
    for name in ("a", "b", "c"):
        clock.now += 10
        blobs[name] = await commit_bytes(store, name.encode() * 1000)
    clock.now += 10
    store.touch_blob(blobs["a"])  # a is now the most recently used
    result = evictor.evict()
    assert result.size_blobs == 1
    assert {b.digest for b in store.scan().blobs} == {blobs["a"], blobs["c"]}
    assert _on_disk(store) <= 2500
    store.close()


async def test_a_reader_survives_eviction_of_its_blob(tmp_path: Path) -> None:
    store = DiskStore(tmp_path)
    data = os.urandom(100_000)
    digest = await commit_bytes(store, data)
    opened = await store.open_blob(digest)
    assert opened is not None
    body = opened.body(0, None)
    store.drop_blobs([digest])
    # POSIX: the open file stays readable
    assert b"".join([chunk async for chunk in as_bytes(body)]) == data
    await body.aclose()
    store.close()


async def test_pulling_more_than_the_cap_keeps_disk_under_it(
    fake: tuple[FakeUpstream, str], mirror: MirrorFactory, tmp_path: Path
) -> None:
    upstream, url = fake
    blob = 1024 * 1024
    digests = [upstream.add_blob(os.urandom(blob)) for _ in range(6)]
    async with mirror(url, max_size=3 * blob + 100) as m, httpx.AsyncClient(base_url=m.url) as c:
        for d in digests:
            await get_when_cached(c, f"/v2/a/blobs/{d}")
        await get_when_cached(c, f"/v2/a/blobs/{digests[0]}")  # the oldest, used again
        result = await m.app.state.components.evictor.run_once()
    assert result.size_blobs == 3
    cached = {p.name for p in (tmp_path / "cache" / "blobs").rglob("*") if p.is_file()}
    # Most recently used stayed: the re-used first blob and the last two.
    assert cached == {d.removeprefix("sha256:") for d in (digests[0], *digests[-2:])}
    disk = sum(p.stat().st_size for p in (tmp_path / "cache" / "blobs").rglob("*") if p.is_file())
    assert disk <= 3 * blob + 100
    assert m.metric("mirror_evictions_total", kind="blob", reason="size") == 3
