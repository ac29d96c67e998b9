"""Two `mirror serve` processes on one cache directory: one upstream download per
digest between them (the other follows the leader's temp file), one eviction round
at a time."""

from __future__ import annotations

import asyncio
import fcntl
import hashlib
import os
import signal
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import httpx
import pytest
from fakes.server import serve
from fakes.upstream import FakeUpstream, Fault
from harness.mirror import MirrorProcess

pytestmark = pytest.mark.e2e

MiB = 1 << 20


def sha256(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


@asynccontextmanager
async def two_mirrors(
    tmp_path: Path, url: str, env: dict[str, str] | None = None
) -> AsyncIterator[tuple[MirrorProcess, MirrorProcess]]:
    cache = tmp_path / "cache"
    a = MirrorProcess(tmp_path / "a", url, cache_dir=cache, env=env)
    b = MirrorProcess(tmp_path / "b", url, cache_dir=cache, env=env)
    await asyncio.to_thread(a.start)
    try:
        await asyncio.to_thread(b.start)
        try:
            yield a, b
        finally:
            await asyncio.to_thread(b.stop)
    finally:
        await asyncio.to_thread(a.stop)


async def until(condition: object, timeout: float = 20.0) -> None:
    """Wait for `condition()` (polled: it is another process's state)."""
    assert callable(condition)
    async with asyncio.timeout(timeout):
        while not condition():
            await asyncio.sleep(0.01)


class Reader:
    """One client's GET, read in the background: what it got, and how it ended."""

    def __init__(self, base: str, path: str) -> None:
        self.data = bytearray()
        self.status: int | None = None
        self.error: BaseException | None = None
        self.task = asyncio.create_task(self._read(base, path))

    async def _read(self, base: str, path: str) -> None:
        try:
            async with (
                httpx.AsyncClient(base_url=base, timeout=60) as c,
                c.stream("GET", path) as r,
            ):
                self.status = r.status_code
                async for chunk in r.aiter_raw():
                    self.data += chunk
        except httpx.HTTPError as exc:
            self.error = exc


def followed(*mirrors: MirrorProcess) -> float:
    return sum(m.metric("mirror_downloads_followed_total") for m in mirrors)


async def test_sixteen_cold_clients_on_two_processes_cause_one_upstream_get(
    tmp_path: Path,
) -> None:
    upstream = FakeUpstream()
    data = os.urandom(8 * MiB)
    digest = upstream.add_blob(data)
    upstream.faults[digest] = Fault(chunk=256 << 10, delay=0.01)  # ~0.3 s
    async with serve(upstream) as url, two_mirrors(tmp_path, url) as (a, b):
        readers = [Reader((a, b)[i % 2].url, f"/v2/lib/app/blobs/{digest}") for i in range(16)]
        await asyncio.gather(*(r.task for r in readers))
        assert [(r.status, r.error) for r in readers] == [(200, None)] * 16
        assert all(sha256(bytes(r.data)) == digest for r in readers)
        assert upstream.count("GET", f"/blobs/{digest}") == 1
        assert followed(a, b) == 1  # the other process read the leader's file
        # Cached once, by the leader: a warm GET from either process.
        for m in (a, b):
            async with httpx.AsyncClient(base_url=m.url, timeout=30) as c:
                warm = await c.get(f"/v2/lib/app/blobs/{digest}")
            assert sha256(warm.content) == digest
        assert upstream.count("GET", f"/blobs/{digest}") == 1


async def test_a_followers_client_waits_for_the_leaders_commit_for_its_last_byte(
    tmp_path: Path,
) -> None:
    upstream = FakeUpstream()
    data = os.urandom(2 * MiB)
    digest = upstream.add_blob(data)
    hold = asyncio.Event()
    upstream.faults[digest] = Fault(hold_last=hold)
    path = f"/v2/lib/app/blobs/{digest}"
    async with serve(upstream) as url, two_mirrors(tmp_path, url) as (a, b):
        leading = Reader(a.url, path)
        await until(lambda: upstream.count("GET", f"/blobs/{digest}") == 1)
        following = Reader(b.url, path)
        await until(lambda: len(following.data) == len(data) - 1)
        await until(lambda: len(leading.data) == len(data) - 1)
        await asyncio.sleep(0.3)  # time enough to send a byte it must not send
        assert not following.task.done() and len(following.data) == len(data) - 1
        hold.set()
        await asyncio.gather(leading.task, following.task)
        assert sha256(bytes(following.data)) == digest and following.error is None
        assert sha256(bytes(leading.data)) == digest
        assert upstream.count("GET", f"/blobs/{digest}") == 1
        assert b.metric("mirror_downloads_followed_total") == 1


async def test_killing_the_leader_cuts_followers_and_the_next_request_fetches_again(
    tmp_path: Path,
) -> None:
    upstream = FakeUpstream()
    data = os.urandom(16 * MiB)
    digest = upstream.add_blob(data)
    upstream.faults[digest] = Fault(chunk=64 << 10, delay=0.01)  # ~2.5 s
    path = f"/v2/lib/app/blobs/{digest}"
    async with serve(upstream) as url, two_mirrors(tmp_path, url) as (a, b):
        leading = Reader(a.url, path)
        await until(lambda: upstream.count("GET", f"/blobs/{digest}") == 1)
        following = [Reader(b.url, path) for _ in range(3)]
        await until(lambda: all(len(r.data) > MiB for r in following))
        a.stop(signal.SIGKILL)
        await asyncio.gather(leading.task, *(r.task for r in following))
        for r in following:
            assert r.error is not None or len(r.data) < len(data)  # cut, never complete
            assert r.error is not None
        del upstream.faults[digest]
        async with httpx.AsyncClient(base_url=b.url, timeout=30) as c:
            again = await c.get(path)
        assert again.status_code == 200 and sha256(again.content) == digest
        assert upstream.count("GET", f"/blobs/{digest}") == 2
        blobs = [p.name for p in (tmp_path / "cache" / "blobs").rglob("*") if p.is_file()]
        assert blobs == [digest.removeprefix("sha256:")]
        assert list((tmp_path / "cache" / "tmp").iterdir()) == []


async def test_a_digest_mismatch_completes_no_body_in_either_process(tmp_path: Path) -> None:
    upstream = FakeUpstream()
    data = os.urandom(4 * MiB)
    digest = upstream.add_blob(data)
    upstream.faults[digest] = Fault(wrong_bytes=True, chunk=256 << 10, delay=0.02)
    path = f"/v2/lib/app/blobs/{digest}"
    async with serve(upstream) as url, two_mirrors(tmp_path, url) as (a, b):
        first = Reader(a.url, path)
        await until(lambda: upstream.count("GET", f"/blobs/{digest}") == 1)
        readers = [first, *(Reader(m.url, path) for m in (a, b, b))]
        await asyncio.gather(*(r.task for r in readers))
        for r in readers:
            assert r.error is not None and len(r.data) < len(data)
        assert upstream.count("GET", f"/blobs/{digest}") == 1
        assert b.metric("mirror_downloads_followed_total") == 1
        assert not [p for p in (tmp_path / "cache" / "blobs").rglob("*") if p.is_file()]
        async with httpx.AsyncClient(base_url=b.url, timeout=30) as c:
            head = await c.head(path)
        assert head.status_code == 200  # asked upstream (a HEAD), not served from cache
        assert upstream.count("HEAD", f"/blobs/{digest}") == 1


async def test_a_leaders_upstream_error_reaches_followers_of_the_same_repository(
    tmp_path: Path,
) -> None:
    upstream = FakeUpstream()
    digest = upstream.add_blob(b"private layer")
    upstream.deny_repos.add("lib/denied")  # a 404 after 0.2 s
    async with serve(upstream) as url, two_mirrors(tmp_path, url) as (a, b):
        leading = Reader(a.url, f"/v2/lib/denied/blobs/{digest}")
        await until(lambda: upstream.count("GET", f"/blobs/{digest}") == 1)
        same = Reader(b.url, f"/v2/lib/denied/blobs/{digest}")
        other = Reader(b.url, f"/v2/lib/open/blobs/{digest}")
        await asyncio.gather(leading.task, same.task, other.task)
        assert (leading.status, same.status) == (404, 404)
        # Another repository's refusal says nothing about this one: it asked itself.
        assert other.status == 200 and bytes(other.data) == b"private layer"
        assert upstream.count("GET", f"/lib/denied/blobs/{digest}") == 1
        assert upstream.count("GET", f"/lib/open/blobs/{digest}") == 1


async def test_eviction_rounds_run_in_one_process_at_a_time(tmp_path: Path) -> None:
    upstream = FakeUpstream()
    digest = upstream.add_blob(os.urandom(64 << 10))
    env = {"MIRROR_EVICTION_INTERVAL": "0.2", "MIRROR_CONTENT_TTL": "1"}
    async with serve(upstream) as url, two_mirrors(tmp_path, url, env) as (a, b):
        lock = os.open(tmp_path / "cache" / "locks" / "evict.lock", os.O_RDWR)
        try:
            fcntl.flock(lock, fcntl.LOCK_EX)  # as a third process running a long round
            ran = [m.metric("mirror_eviction_rounds_total", result="ran") for m in (a, b)]
            async with httpx.AsyncClient(base_url=a.url, timeout=30) as c:
                assert (await c.get(f"/v2/lib/app/blobs/{digest}")).status_code == 200
            skipped = [m.metric("mirror_eviction_rounds_total", result="skipped") for m in (a, b)]
            await until(
                lambda: all(
                    m.metric("mirror_eviction_rounds_total", result="skipped") >= s + 8
                    for m, s in zip((a, b), skipped, strict=True)
                )
            )
            # Past content_ttl, but no round ran: still cached.
            assert [m.metric("mirror_eviction_rounds_total", result="ran") for m in (a, b)] == ran
            assert [p for p in (tmp_path / "cache" / "blobs").rglob("*") if p.is_file()]
        finally:
            os.close(lock)
        await until(lambda: not any((tmp_path / "cache" / "blobs").rglob("*/*/*")))
        evicted = sum(m.metric("mirror_evictions_total", kind="blob", reason="ttl") for m in (a, b))
        assert evicted == 1
