"""Blob misses: streaming, verification, resume, faults (in-process fake upstream)."""

from __future__ import annotations

import asyncio
import hashlib
import os
from pathlib import Path

import httpx
import pytest
from conftest import MirrorFactory, get_when_cached, until
from fakes.disk import fill_disk_after
from fakes.upstream import FakeUpstream, Fault

BLOB = os.urandom(3 * 1024 * 1024 + 17)


def _digest(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


async def test_miss_streams_verifies_and_caches(
    fake: tuple[FakeUpstream, str], mirror: MirrorFactory
) -> None:
    upstream, url = fake
    digest = upstream.add_blob(BLOB)
    async with mirror(url) as m, httpx.AsyncClient(base_url=m.url) as c:
        cold = await c.get(f"/v2/team/app/blobs/{digest}")
        assert cold.status_code == 200
        assert cold.content == BLOB
        assert cold.headers["docker-content-digest"] == digest
        assert cold.headers["content-length"] == str(len(BLOB))
        # Shared across repositories.
        warm = await get_when_cached(c, f"/v2/other/repo/blobs/{digest}")
        assert warm.content == BLOB
        assert warm.headers["accept-ranges"] == "bytes"
    assert upstream.count("GET", f"/blobs/{digest}") == 1
    assert m.metric("mirror_cache_requests_total", kind="blob", result="hit") == 1
    assert m.metric("mirror_served_bytes_total", source="cache") == len(BLOB)


async def test_wrong_digest_aborts_and_caches_nothing(
    fake: tuple[FakeUpstream, str], mirror: MirrorFactory, tmp_path: Path
) -> None:
    upstream, url = fake
    digest = upstream.add_blob(BLOB)
    upstream.faults[digest] = Fault(wrong_bytes=True)
    async with mirror(url) as m, httpx.AsyncClient(base_url=m.url) as c:
        with pytest.raises(httpx.RemoteProtocolError):
            await c.get(f"/v2/team/app/blobs/{digest}")
        # Nothing was committed: the next request goes upstream again.
        del upstream.faults[digest]
        again = await c.get(f"/v2/team/app/blobs/{digest}")
        assert again.content == BLOB
    assert upstream.count("GET", f"/blobs/{digest}") == 2
    assert m.metric("mirror_digest_mismatches_total", kind="blob") == 1
    assert not any((tmp_path / "cache" / "tmp").iterdir())


async def test_cut_connection_resumes_with_range(
    fake: tuple[FakeUpstream, str], mirror: MirrorFactory
) -> None:
    upstream, url = fake
    digest = upstream.add_blob(BLOB)
    upstream.faults[digest] = Fault(cut_after=1024 * 1024 + 5)
    async with mirror(url) as m, httpx.AsyncClient(base_url=m.url) as c:
        r = await c.get(f"/v2/team/app/blobs/{digest}")
        assert r.status_code == 200
        assert _digest(r.content) == digest
    ranged = [s for s in upstream.requests if "range" in s.headers]
    assert len(ranged) == 1
    assert ranged[0].headers["range"].startswith("bytes=")
    assert int(ranged[0].headers["range"][6:-1]) > 0
    assert m.metric("mirror_upstream_resumes_total") == 1


async def test_cut_without_resume_aborts_client(
    fake: tuple[FakeUpstream, str], mirror: MirrorFactory
) -> None:
    upstream, url = fake
    digest = upstream.add_blob(BLOB)
    upstream.faults[digest] = Fault(cut_after=100_000, cut_times=5)
    async with mirror(url, resume_attempts=1) as m, httpx.AsyncClient(base_url=m.url) as c:
        with pytest.raises(httpx.RemoteProtocolError):
            await c.get(f"/v2/team/app/blobs/{digest}")
        # The next request starts a fresh download (which the fake cuts again).
        with pytest.raises(httpx.RemoteProtocolError):
            await c.get(f"/v2/team/app/blobs/{digest}")
    assert upstream.count("GET", f"/blobs/{digest}") == 4


async def test_429_passes_retry_after(
    fake: tuple[FakeUpstream, str], mirror: MirrorFactory
) -> None:
    upstream, url = fake
    digest = upstream.add_blob(b"x")
    upstream.faults[digest] = Fault(status=429, retry_after="17")
    async with mirror(url) as m, httpx.AsyncClient(base_url=m.url) as c:
        r = await c.get(f"/v2/team/app/blobs/{digest}")
    assert r.status_code == 429
    assert r.headers["retry-after"] == "17"
    assert r.json()["errors"][0]["code"] == "TOOMANYREQUESTS"


async def test_redirect_to_other_host_gets_no_authorization(
    fake: tuple[FakeUpstream, str], mirror: MirrorFactory
) -> None:
    from fakes.server import serve

    upstream, url = fake
    upstream.token = "secret-token"
    cdn = FakeUpstream()
    async with serve(cdn) as cdn_url:
        digest = upstream.add_blob(BLOB)
        cdn.blobs[digest] = BLOB
        upstream.faults[digest] = Fault(redirect_to=cdn_url)
        async with mirror(url) as m, httpx.AsyncClient(base_url=m.url) as c:
            r = await c.get(f"/v2/team/app/blobs/{digest}")
            assert r.status_code == 200
            assert r.content == BLOB
    # The upstream got the bearer token; the CDN host got no Authorization at all.
    assert any(s.headers.get("authorization") == "Bearer secret-token" for s in upstream.requests)
    assert [s.path for s in cdn.requests] == [f"/cdn/{digest}"]
    assert "authorization" not in cdn.requests[0].headers


async def test_range_on_uncached_blob_starts_download(
    fake: tuple[FakeUpstream, str], mirror: MirrorFactory
) -> None:
    upstream, url = fake
    digest = upstream.add_blob(BLOB)
    async with mirror(url) as m, httpx.AsyncClient(base_url=m.url) as c:
        r = await c.get(f"/v2/a/blobs/{digest}", headers={"Range": "bytes=1000-"})
        assert r.status_code == 206
        assert r.content == BLOB[1000:]
        assert r.headers["content-range"] == f"bytes 1000-{len(BLOB) - 1}/{len(BLOB)}"
        r = await c.get(f"/v2/a/blobs/{digest}", headers={"Range": "bytes=5-9"})
        assert (r.status_code, r.content) == (206, BLOB[5:10])
        r = await c.get(f"/v2/a/blobs/{digest}", headers={"Range": f"bytes={len(BLOB)}-"})
        assert r.status_code == 416
        assert r.headers["content-range"] == f"bytes */{len(BLOB)}"


async def test_concurrent_misses_share_one_download(
    fake: tuple[FakeUpstream, str], mirror: MirrorFactory
) -> None:
    upstream, url = fake
    digest = upstream.add_blob(BLOB)
    upstream.faults[digest] = Fault(delay=0.01)
    async with mirror(url) as m, httpx.AsyncClient(base_url=m.url) as c:
        bodies = await asyncio.gather(*(c.get(f"/v2/a/blobs/{digest}") for _ in range(5)))
    assert all(b.content == BLOB for b in bodies)
    assert upstream.count("GET", f"/blobs/{digest}") == 1


async def test_full_disk_still_streams_the_whole_blob_to_every_client(
    fake: tuple[FakeUpstream, str],
    mirror: MirrorFactory,
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
) -> None:
    upstream, url = fake
    digest = upstream.add_blob(BLOB)
    upstream.faults[digest] = Fault(delay=0.005, chunk=128 * 1024)  # clients attach mid-body
    fill_disk_after(monkeypatch, 1 << 20)
    async with mirror(url) as m, httpx.AsyncClient(base_url=m.url, timeout=20) as c:
        bodies = await asyncio.gather(*(c.get(f"/v2/a/blobs/{digest}") for _ in range(5)))
        assert [b.status_code for b in bodies] == [200] * 5
        assert all(b.content == BLOB for b in bodies)
        assert m.metric("mirror_cache_write_failures_total", kind="blob") == 1
        assert upstream.count("GET", f"/blobs/{digest}") == 1  # still one download
        # Nothing partial was kept: the next request is a miss, and the temp file is gone.
        again = await c.get(f"/v2/a/blobs/{digest}")
        assert again.content == BLOB
        assert again.headers["x-cache"] == "MISS"
        assert upstream.count("GET", f"/blobs/{digest}") == 2
        assert m.metric("mirror_cache_write_failures_total", kind="blob") == 2
        tmp = tmp_path / "cache" / "tmp"
        await until(lambda: not any(tmp.iterdir()), "the temp file to go")
        assert not any(p.is_file() for p in (tmp_path / "cache" / "blobs").rglob("*"))
        # Space came back: the mirror caches again without a restart.
        monkeypatch.undo()
        cached = await get_when_cached(c, f"/v2/a/blobs/{digest}")
        assert cached.content == BLOB


async def test_unwritable_cache_directory_still_serves_blobs_and_manifests(
    fake: tuple[FakeUpstream, str],
    mirror: MirrorFactory,
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
) -> None:
    import sqlite3

    from mirror.diskstore import DiskStore

    upstream, url = fake
    digest = upstream.add_blob(BLOB)
    manifest = b'{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json"}'
    upstream.manifests["v1"] = ("application/vnd.oci.image.manifest.v1+json", manifest)
    # As if the file system went read-only: no temp file, no index writes.
    monkeypatch.setattr(DiskStore, "temp_path", lambda self: tmp_path / "gone" / "x")
    monkeypatch.setattr(DiskStore, "leased_temp", lambda self, d, u: tmp_path / "gone" / "x")

    async def read_only(*args: object) -> None:
        raise sqlite3.OperationalError("attempt to write a readonly database")

    monkeypatch.setattr(DiskStore, "put_manifest", read_only)
    async with mirror(url) as m, httpx.AsyncClient(base_url=m.url, timeout=20) as c:
        blob = await c.get(f"/v2/a/blobs/{digest}")
        assert blob.status_code == 200
        assert blob.content == BLOB
        assert blob.headers["docker-content-digest"] == digest
        ranged = await c.get(f"/v2/a/blobs/{digest}", headers={"Range": "bytes=100-199"})
        assert ranged.status_code == 206
        assert ranged.content == BLOB[100:200]
        r = await c.get("/v2/a/manifests/v1")
        assert r.status_code == 200
        assert r.content == manifest
        assert m.metric("mirror_cache_write_failures_total", kind="blob") == 2
        assert m.metric("mirror_cache_write_failures_total", kind="manifest") == 1
        assert (await c.get("/v2/")).status_code == 200


async def test_full_disk_with_a_wrong_digest_still_never_completes_a_body(
    fake: tuple[FakeUpstream, str], mirror: MirrorFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    upstream, url = fake
    digest = upstream.add_blob(BLOB)
    upstream.faults[digest] = Fault(wrong_bytes=True)
    fill_disk_after(monkeypatch, 100_000)
    async with mirror(url) as m, httpx.AsyncClient(base_url=m.url, timeout=20) as c:
        results = await asyncio.gather(
            *(c.get(f"/v2/a/blobs/{digest}") for _ in range(3)), return_exceptions=True
        )
        assert all(isinstance(r, httpx.RemoteProtocolError) for r in results), results
    assert m.metric("mirror_digest_mismatches_total", kind="blob") == 1


async def test_full_disk_relay_cuts_a_stalled_reader_not_the_others(
    fake: tuple[FakeUpstream, str], mirror: MirrorFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    from mirror import relay

    big = os.urandom(48 << 20)  # well past what loopback socket buffers absorb
    upstream, url = fake
    digest = upstream.add_blob(big)
    # Slow enough that both clients attach before the disk fills at 8 MiB (~0.4 s).
    upstream.faults[digest] = Fault(chunk=1 << 20, delay=0.05)
    monkeypatch.setattr(relay, "WINDOW", 1 << 20)
    monkeypatch.setattr(relay, "STALL", 0.5)
    fill_disk_after(monkeypatch, 8 << 20)
    async with (
        mirror(url) as m,
        httpx.AsyncClient(base_url=m.url, timeout=30) as c,
        c.stream("GET", f"/v2/a/blobs/{digest}") as stalled,
    ):
        assert stalled.status_code == 200
        fast = await c.get(f"/v2/a/blobs/{digest}")
        assert fast.content == big  # the stalled reader did not hold it back for good
        with pytest.raises(httpx.RemoteProtocolError):
            await stalled.aread()  # it was cut, not handed a short "complete" body
    assert upstream.count("GET", f"/blobs/{digest}") == 1  # they shared one download
    assert m.metric("mirror_cache_write_failures_total", kind="blob") == 1


async def test_full_disk_download_stops_when_its_last_client_leaves(
    fake: tuple[FakeUpstream, str], mirror: MirrorFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    big = os.urandom(16 << 20)
    upstream, url = fake
    digest = upstream.add_blob(big)
    upstream.faults[digest] = Fault(chunk=256 * 1024, delay=0.05)  # 3.2 s for the body
    fill_disk_after(monkeypatch, 0)
    async with mirror(url) as m, httpx.AsyncClient(base_url=m.url, timeout=30) as c:
        async with c.stream("GET", f"/v2/a/blobs/{digest}") as r:
            async for _ in r.aiter_raw():
                break  # the only client hangs up after its first chunk
        await until(lambda: m.metric("mirror_downloads_in_flight") == 0, "the download to stop")
        fetched = m.metric("mirror_upstream_bytes_total", upstream=url.removeprefix("http://"))
        # Nobody is left to relay to, and nothing can be cached: the fetch stopped early.
        assert fetched < len(big) / 2


async def test_chunked_upstream_body_is_streamed_whole(
    fake: tuple[FakeUpstream, str], mirror: MirrorFactory
) -> None:
    upstream, url = fake
    digest = upstream.add_blob(BLOB)
    upstream.faults[digest] = Fault(chunked=True)
    async with mirror(url) as m, httpx.AsyncClient(base_url=m.url) as c:
        cold = await c.get(f"/v2/a/blobs/{digest}")
        assert "content-length" not in cold.headers  # unknown until the end: chunked
        assert cold.content == BLOB
        warm = await c.get(f"/v2/a/blobs/{digest}")
        assert warm.headers["content-length"] == str(len(BLOB))


async def test_refused_repository_does_not_fail_other_repositories(
    fake: tuple[FakeUpstream, str], mirror: MirrorFactory
) -> None:
    upstream, url = fake
    digest = upstream.add_blob(BLOB)
    upstream.deny_repos.add("evil/x")
    async with mirror(url) as m, httpx.AsyncClient(base_url=m.url) as c:
        evil = asyncio.create_task(c.get(f"/v2/evil/x/blobs/{digest}"))
        # The upstream holds the evil request 0.2 s: the good one joins its download.
        await until(lambda: upstream.count("GET", f"/evil/x/blobs/{digest}") == 1, "evil GET")
        good = await c.get(f"/v2/good/app/blobs/{digest}")
        assert (await evil).status_code == 404
        assert good.status_code == 200
        assert good.content == BLOB


async def test_unsatisfiable_ranges_on_cached_blobs_leak_no_descriptors(
    fake: tuple[FakeUpstream, str], mirror: MirrorFactory
) -> None:
    upstream, url = fake
    digest = upstream.add_blob(b"0123456789")
    async with mirror(url) as m, httpx.AsyncClient(base_url=m.url) as c:
        assert (await c.get(f"/v2/a/blobs/{digest}")).status_code == 200
        before = len(os.listdir("/proc/self/fd"))
        for _ in range(50):
            r = await c.get(f"/v2/a/blobs/{digest}", headers={"Range": "bytes=999-"})
            assert r.status_code == 416
            h = await c.head(f"/v2/a/blobs/{digest}", headers={"Range": "bytes=5-"})
            assert h.status_code == 206
        assert len(os.listdir("/proc/self/fd")) < before + 5


@pytest.mark.parametrize(
    ("headers", "path", "status"),
    [
        pytest.param({"Range": "bytes=" + "9" * 5000 + "-"}, "/blobs/D", 416, id="huge-range"),
        pytest.param({"Range": "bytes=²-".encode()}, "/blobs/D", 416, id="superscript-range"),
        pytest.param({}, "/tags/list?n=%C2%B2", 400, id="superscript-n"),
        pytest.param({}, "/tags/list?n=" + "9" * 5000, 400, id="huge-n"),
    ],
)
async def test_hostile_numbers_are_client_errors(
    fake: tuple[FakeUpstream, str],
    mirror: MirrorFactory,
    headers: dict[str, str],
    path: str,
    status: int,
) -> None:
    upstream, url = fake
    digest = upstream.add_blob(b"x")
    async with mirror(url) as m, httpx.AsyncClient(base_url=m.url) as c:
        r = await c.get("/v2/a" + path.replace("D", digest), headers=headers)
    assert r.status_code == status
    assert "errors" in r.json()


async def test_twenty_concurrent_cold_requests_one_upstream_get(
    fake: tuple[FakeUpstream, str], mirror: MirrorFactory
) -> None:
    upstream, url = fake
    data = os.urandom(24 * 1024 * 1024)
    digest = upstream.add_blob(data)
    upstream.faults[digest] = Fault(delay=0.002, chunk=256 * 1024)
    async with mirror(url) as m, httpx.AsyncClient(base_url=m.url, timeout=60) as c:

        async def pull() -> str:
            h = hashlib.sha256()
            async with c.stream("GET", f"/v2/team/app/blobs/{digest}") as r:
                assert r.status_code == 200
                async for chunk in r.aiter_raw():
                    h.update(chunk)
            return "sha256:" + h.hexdigest()

        digests = await asyncio.gather(*(pull() for _ in range(20)))
    assert digests == [digest] * 20
    assert upstream.count("GET", f"/blobs/{digest}") == 1
    assert m.metric("mirror_coalesced_requests_total", kind="blob") == 19
    upstream_name = url.removeprefix("http://")
    assert m.metric("mirror_upstream_bytes_total", upstream=upstream_name) == len(data)


async def test_first_client_leaving_does_not_hurt_the_others(
    fake: tuple[FakeUpstream, str], mirror: MirrorFactory
) -> None:
    upstream, url = fake
    digest = upstream.add_blob(BLOB)
    upstream.faults[digest] = Fault(delay=0.005, chunk=64 * 1024)
    async with mirror(url) as m, httpx.AsyncClient(base_url=m.url, timeout=30) as c:
        async with c.stream("GET", f"/v2/a/blobs/{digest}") as first:
            async for _ in first.aiter_raw():
                break  # the client that started the download hangs up at once
        others = await asyncio.gather(*(c.get(f"/v2/a/blobs/{digest}") for _ in range(4)))
        assert all(o.content == BLOB for o in others)
        cached = await get_when_cached(c, f"/v2/b/blobs/{digest}")
        assert cached.content == BLOB
    assert upstream.count("GET", f"/blobs/{digest}") == 1


async def test_range_on_a_blob_in_flight_waits_for_its_bytes(
    fake: tuple[FakeUpstream, str], mirror: MirrorFactory
) -> None:
    upstream, url = fake
    digest = upstream.add_blob(BLOB)
    upstream.faults[digest] = Fault(delay=0.01, chunk=64 * 1024)  # about 0.5 s in all
    async with mirror(url) as m, httpx.AsyncClient(base_url=m.url, timeout=30) as c:
        full = asyncio.create_task(c.get(f"/v2/a/blobs/{digest}"))
        host = url.removeprefix("http://")
        await until(lambda: m.metric("mirror_upstream_bytes_total", upstream=host) > 0, "bytes")
        tail = await c.get(f"/v2/a/blobs/{digest}", headers={"Range": "bytes=2000000-"})
        head = await c.get(f"/v2/a/blobs/{digest}", headers={"Range": "bytes=0-99"})
        assert (await full).content == BLOB
    assert tail.status_code == 206
    assert tail.content == BLOB[2000000:]
    assert tail.headers["content-range"] == f"bytes 2000000-{len(BLOB) - 1}/{len(BLOB)}"
    assert (head.status_code, head.content) == (206, BLOB[:100])
    assert upstream.count("GET", f"/blobs/{digest}") == 1


async def test_a_slow_client_does_not_slow_the_others(
    fake: tuple[FakeUpstream, str], mirror: MirrorFactory
) -> None:
    upstream, url = fake
    digest = upstream.add_blob(BLOB)
    async with mirror(url) as m, httpx.AsyncClient(base_url=m.url, timeout=30) as c:
        async with c.stream("GET", f"/v2/a/blobs/{digest}") as slow:
            # The slow client reads one chunk and stalls while another client pulls
            # the whole blob and the download commits.
            chunks = slow.aiter_raw()
            first = await anext(chunks)
            fast = await asyncio.wait_for(c.get(f"/v2/b/blobs/{digest}"), timeout=10)
            assert fast.content == BLOB
            rest = b"".join([chunk async for chunk in chunks])
        assert first + rest == BLOB
    assert upstream.count("GET", f"/blobs/{digest}") == 1


@pytest.mark.parametrize(
    "fault",
    [
        pytest.param(Fault(wrong_bytes=True, delay=0.01, chunk=128 * 1024), id="digest-mismatch"),
        pytest.param(
            Fault(cut_after=300_000, cut_times=10, delay=0.01, chunk=128 * 1024),
            id="cut-beyond-resume",
        ),
    ],
)
async def test_failure_cuts_every_attached_client(
    fake: tuple[FakeUpstream, str], mirror: MirrorFactory, fault: Fault
) -> None:
    upstream, url = fake
    digest = upstream.add_blob(BLOB)
    upstream.faults[digest] = fault
    async with mirror(url, resume_attempts=2) as m, httpx.AsyncClient(base_url=m.url) as c:
        results = await asyncio.gather(
            *(c.get(f"/v2/a/blobs/{digest}") for _ in range(5)), return_exceptions=True
        )
        assert all(isinstance(r, httpx.RemoteProtocolError) for r in results), results
        # Nothing was committed: after the fault is gone, a fresh download serves it.
        del upstream.faults[digest]
        assert (await c.get(f"/v2/a/blobs/{digest}")).content == BLOB


async def test_client_gets_verified_bytes_without_waiting_for_fsync(
    fake: tuple[FakeUpstream, str], mirror: MirrorFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    import threading

    upstream, url = fake
    digest = upstream.add_blob(BLOB)
    fsync_entered, disk_caught_up = threading.Event(), threading.Event()
    real_fsync = os.fsync

    def slow_fsync(fd: int) -> None:
        fsync_entered.set()
        disk_caught_up.wait(timeout=30)
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", slow_fsync)  # only the blob writer fsyncs
    async with mirror(url) as m, httpx.AsyncClient(base_url=m.url, timeout=20) as c:
        r = await c.get(f"/v2/a/blobs/{digest}")  # completes while fsync is still blocked
        assert r.content == BLOB
        assert fsync_entered.is_set()
        # Not committed yet: the next request joins the download, it is no hit.
        assert (await c.head(f"/v2/a/blobs/{digest}")).headers["x-cache"] == "MISS"
        disk_caught_up.set()
        await get_when_cached(c, f"/v2/a/blobs/{digest}")  # now the commit follows
    assert upstream.count("GET", f"/blobs/{digest}") == 1


async def test_a_body_that_breaks_for_good_is_a_plain_502_without_transport_detail(
    fake: tuple[FakeUpstream, str], mirror: MirrorFactory
) -> None:
    upstream, url = fake
    digest = upstream.add_blob(BLOB)
    # Chunked: a range must wait for the end, so it sees the download's error.
    upstream.faults[digest] = Fault(chunked=True, cut_after=500_000, cut_times=9)
    async with mirror(url, resume_attempts=0) as m, httpx.AsyncClient(base_url=m.url) as c:
        r = await c.get(f"/v2/a/blobs/{digest}", headers={"Range": "bytes=10-19"})
    assert r.status_code == 502
    assert r.json() == {"errors": [{"code": "UNAVAILABLE", "message": "upstream download failed"}]}
