"""The blob path of a real `mirror serve` (its listener, with sendfile), attacked:
odd upstream bodies, clients that misbehave, files that change under it."""

from __future__ import annotations

import asyncio
import hashlib
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from conftest import MirrorFactory, get_when_cached, until
from fakes.server import serve
from fakes.upstream import FakeUpstream, Fault
from harness import require_root, require_tool
from harness.mirror import MirrorProcess

pytestmark = pytest.mark.e2e

MiB = 1 << 20


def sha256(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


async def test_a_chunked_upstream_blob_reaches_a_cold_client_whole(tmp_path: Path) -> None:
    # No Content-Length from upstream: the response is chunked, and the download's
    # bytes on disk must still be sent (read, since sendfile needs a known length).
    upstream = FakeUpstream()
    data = os.urandom(4 * MiB)
    digest = upstream.add_blob(data)
    upstream.faults[digest] = Fault(chunked=True, chunk=256 << 10, delay=0.01)
    async with serve(upstream) as url:
        m = MirrorProcess(tmp_path / "m", url)
        await asyncio.to_thread(m.start)
        try:
            async with httpx.AsyncClient(base_url=m.url, timeout=30) as c:
                cold = await c.get(f"/v2/lib/app/blobs/{digest}")
                assert cold.status_code == 200
                assert "content-length" not in cold.headers
                assert sha256(cold.content) == digest
                ranged = await c.get(f"/v2/lib/app/blobs/{digest}", headers={"range": "bytes=5-"})
                assert ranged.status_code == 206 and ranged.content == data[5:]
        finally:
            await asyncio.to_thread(m.stop)
        assert "Exception in ASGI application" not in m.log()


async def test_a_chunked_upstream_blob_reaches_a_follower_in_another_process(
    tmp_path: Path,
) -> None:
    upstream = FakeUpstream()
    data = os.urandom(4 * MiB)
    digest = upstream.add_blob(data)
    hold = asyncio.Event()
    upstream.faults[digest] = Fault(chunked=True, hold_last=hold)
    path = f"/v2/lib/app/blobs/{digest}"
    cache = tmp_path / "cache"
    async with serve(upstream) as url:
        a = MirrorProcess(tmp_path / "a", url, cache_dir=cache)
        b = MirrorProcess(tmp_path / "b", url, cache_dir=cache)
        await asyncio.to_thread(a.start)
        await asyncio.to_thread(b.start)
        try:
            async with httpx.AsyncClient(timeout=30) as c:
                leading = asyncio.create_task(c.get(a.url + path))
                await until(lambda: upstream.count("GET", f"/blobs/{digest}") == 1, "leader")
                following = asyncio.create_task(c.get(b.url + path))
                await until(lambda: b.metric("mirror_downloads_followed_total") == 1, "follower")
                hold.set()
                for resp in await asyncio.gather(leading, following):
                    assert resp.status_code == 200 and sha256(resp.content) == digest
        finally:
            await asyncio.to_thread(b.stop)
            await asyncio.to_thread(a.stop)
        assert upstream.count("GET", f"/blobs/{digest}") == 1


@pytest.fixture
def small_ext4(tmp_path: Path) -> Iterator[Path]:
    """A 64 MiB ext4 file system: it keeps what fallocate(2) allocated before ENOSPC
    (tmpfs gives it back, so the disk-full tests on tmpfs cannot see this)."""
    require_root("mount a loop device")
    require_tool("mkfs.ext4")
    image, mountpoint = tmp_path / "ext4.img", tmp_path / "ext4"
    with image.open("wb") as f:
        f.truncate(64 * MiB)
    subprocess.run(["mkfs.ext4", "-q", str(image)], check=True)
    mountpoint.mkdir()
    subprocess.run(["mount", "-o", "loop", str(image), str(mountpoint)], check=True)
    try:
        yield mountpoint
    finally:
        subprocess.run(["umount", "-l", str(mountpoint)], check=False)


async def test_a_download_larger_than_the_free_space_leaves_room_for_others(
    small_ext4: Path, mirror: MirrorFactory
) -> None:
    # The big blob announces more than the disk has. Its reservation must not take
    # the whole disk while it streams: a small blob fetched meanwhile is cached.
    upstream = FakeUpstream()
    big, small = os.urandom(96 * MiB), os.urandom(MiB)
    big_digest, small_digest = upstream.add_blob(big), upstream.add_blob(small)
    upstream.faults[big_digest] = Fault(chunk=64 << 10, delay=0.05)  # ~1.3 MB/s
    async with (
        serve(upstream) as url,
        mirror(url, cache_dir=small_ext4 / "cache") as m,
        httpx.AsyncClient(base_url=m.url, timeout=30) as c,
        c.stream("GET", f"/v2/lib/app/blobs/{big_digest}") as streaming,
    ):
        try:
            async for _ in streaming.aiter_raw():
                break  # the big download is under way
            host = url.removeprefix("http://")
            await until(lambda: m.metric("mirror_upstream_bytes_total", upstream=host) > 0, "up")
            first = await c.get(f"/v2/lib/app/blobs/{small_digest}")
            assert first.status_code == 200 and first.content == small
            assert m.metric("mirror_cache_write_failures_total", kind="blob") == 0
            warm = await get_when_cached(c, f"/v2/lib/app/blobs/{small_digest}")
            assert warm.content == small
        finally:
            upstream.faults[big_digest].delay = 0  # the fake sends the rest at once
