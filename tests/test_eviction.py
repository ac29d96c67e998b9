"""Eviction by content TTL and by size (LRU), with an injected clock."""

from __future__ import annotations

import os
from pathlib import Path

import httpx
import pytest
from conftest import MirrorFactory, get_when_cached
from fakes.cache import commit_bytes
from fakes.clock import Clock
from fakes.upstream import FakeUpstream

from mirror.config import parse_size
from mirror.eviction import Evictor
from mirror.storage import Storage

DAY = 86400.0


def _on_disk(storage: Storage) -> int:
    return sum(p.stat().st_size for p in storage.blob_dir.rglob("*") if p.is_file())


def test_unused_content_expires_and_access_refreshes_it(tmp_path: Path) -> None:
    clock = Clock()
    storage = Storage(tmp_path, clock)
    evictor = Evictor(
        storage, None, content_ttl=7 * DAY, max_size=None, max_stale=7 * DAY, clock=clock
    )
    used, unused = commit_bytes(storage, b"used"), commit_bytes(storage, b"unused")
    clock.now += 5 * DAY
    evictor.touch(f"blob/{used}")  # a hit, recorded in memory only
    clock.now += 3 * DAY
    result = evictor.evict(evictor._touched)
    assert (result.ttl_blobs, result.size_blobs) == (1, 0)
    assert [b.digest for b in storage.iter_blobs()] == [used]
    assert not storage.blob_path(unused).exists()
    clock.now += 7 * DAY + 1
    assert evictor.evict().ttl_blobs == 1
    assert list(storage.iter_blobs()) == []
    storage.close()


def test_size_cap_evicts_least_recently_used_first(tmp_path: Path) -> None:
    clock = Clock()
    storage = Storage(tmp_path, clock)
    evictor = Evictor(
        storage, None, content_ttl=7 * DAY, max_size=2500, max_stale=7 * DAY, clock=clock
    )
    blobs = {}
    for name in ("a", "b", "c"):
        clock.now += 10
        blobs[name] = commit_bytes(storage, name.encode() * 1000)
    clock.now += 10
    evictor.touch(f"blob/{blobs['a']}")  # a is now the most recently used
    result = evictor.evict(evictor._touched)
    assert result.size_blobs == 1
    assert {b.digest for b in storage.iter_blobs()} == {blobs["a"], blobs["c"]}
    assert _on_disk(storage) <= 2500
    storage.close()


def test_a_reader_survives_eviction_of_its_blob(tmp_path: Path) -> None:
    storage = Storage(tmp_path)
    data = os.urandom(100_000)
    digest = commit_bytes(storage, data)
    opened = storage.open_blob(digest)
    assert opened is not None
    fd, size = opened
    storage.drop_blob(digest)
    assert os.pread(fd, size, 0) == data  # POSIX: the open file stays readable
    os.close(fd)
    storage.close()


@pytest.mark.parametrize(
    ("text", "size"),
    [
        ("50GiB", 50 * 2**30),
        ("500MB", 500 * 10**6),
        ("1.5TiB", int(1.5 * 2**40)),
        (1024, 1024),
        ("none", None),
        ("0", None),
        ("2048", 2048),
    ],
)
def test_sizes(text: object, size: int | None) -> None:
    assert parse_size(text) == size


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
        result = await m.app.state.evictor.run_once()
    assert result.size_blobs == 3
    cached = {p.name for p in (tmp_path / "cache" / "blobs").rglob("*") if p.is_file()}
    # Most recently used stayed: the re-used first blob and the last two.
    assert cached == {d.removeprefix("sha256:") for d in (digests[0], *digests[-2:])}
    disk = sum(p.stat().st_size for p in (tmp_path / "cache" / "blobs").rglob("*") if p.is_file())
    assert disk <= 3 * blob + 100
    assert m.metric("mirror_evictions_total", kind="blob", reason="size") == 3
