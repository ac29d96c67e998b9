"""The cluster's single flight against hostile or failing peers (mirror.cluster), and
the bucket upload's failures (mirror.objects): found by an adversarial review, each
test states what the quality bar asks for."""

from __future__ import annotations

import asyncio
import gc
import hashlib
import os
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from fakes.rawupstream import RawUpstream, Request, Script, response
from harness.redisserver import RedisServer

from mirror.cluster import Cluster
from mirror.errors import RegistryError, UpstreamError
from mirror.metrics import Metrics
from mirror.redisindex import RedisIndex
from mirror.reference import Digest
from mirror.transport import make_client

MiB = 1 << 20


def _digest(data: bytes) -> Digest:
    return Digest("sha256", hashlib.sha256(data).hexdigest())


class _Write:
    """A BlobWrite that keeps nothing (SharedSource only calls publish)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.published = 0

    def wrote(self, size: int) -> None:
        pass

    def publish(self) -> None:
        self.published += 1

    async def commit(self, size: int) -> Path:
        return self.path

    async def abort(self) -> None:
        pass


class _Body:
    def __init__(self, data: bytes) -> None:
        self._data = data
        self.size: int | None = len(data)

    async def __aiter__(self) -> AsyncIterator[bytes]:
        yield self._data

    async def mismatched(self) -> None:
        pass

    async def aclose(self) -> None:
        pass


class _Upstream:
    """Records the blob GETs a follower falls back to."""

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.opened: list[int] = []

    async def open_blob(self, repo: str, digest: Digest, max_bytes: int, start: int = 0) -> _Body:
        self.opened.append(start)
        return _Body(self.data[start:])


def _cluster(redis_server: RedisServer, prefix: str, *, read_timeout: float = 0.5) -> Cluster:
    metrics = Metrics()
    metrics.add_shared_store()
    index = RedisIndex(redis_server.url, metrics, prefix=prefix)
    return Cluster(
        index,
        None,  # type: ignore[arg-type]  # no bucket: the offset is past 0 when it matters
        metrics,
        make_client(1.0, read_timeout),
        peer_url="http://127.0.0.1:1",
        secret="s3cret",
        lease_ttl=1,
    )


async def _hold_lease(index: RedisIndex, name: str, owner: str, stop: asyncio.Event) -> None:
    """A live leader: claims the lease and renews it until told to stop."""
    assert await index.claim(name, owner, 1) is None
    while not stop.is_set():
        await asyncio.sleep(0.2)
        await index.renew(name, owner, 1)
    await index.release(name, owner)


async def test_a_peer_sending_an_endless_body_is_cut_at_the_size_limit(
    redis_server: RedisServer, tmp_path: Path
) -> None:
    """A buggy or hostile leader answers 200 with a chunked body that never ends. The
    follower must stop at max_bytes (like RemoteBlob does for the upstream), not fill
    its disk until the digest check that never comes."""
    data = b"x" * 100
    digest = _digest(data)

    def answer(req: Request) -> Script:
        head = b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n"
        chunk = b"%x\r\n%s\r\n" % (64 * 1024, b"y" * 64 * 1024)
        return Script([head, *([chunk] * 400)])  # 25 MiB and counting

    peer = RawUpstream(answer)
    prefix = f"{uuid.uuid4().hex}:"
    cluster = _cluster(redis_server, prefix)
    stop = asyncio.Event()
    async with peer.serve() as url:
        holder = asyncio.create_task(
            _hold_lease(cluster.index, f"lease:{digest}", f"{url} leader", stop)
        )
        await asyncio.sleep(0.1)
        max_bytes = 1 * MiB
        source = await cluster.source(_Upstream(data))(  # type: ignore[arg-type]
            "r", digest, max_bytes, _Write(tmp_path / "t")
        )
        got = 0
        error: BaseException | None = None
        try:
            async with asyncio.timeout(10):
                async for chunk in source:
                    got += len(chunk)
        except (UpstreamError, RegistryError) as exc:
            error = exc
        finally:
            await source.aclose()
            stop.set()
            await holder
    await cluster.index.aclose()
    await cluster.aclose()
    assert got <= max_bytes, f"follower took {got} bytes from the peer, limit {max_bytes}"
    assert error is not None


async def test_a_live_leader_whose_stream_stalls_does_not_hold_the_follower_forever(
    redis_server: RedisServer, tmp_path: Path
) -> None:
    """The leader is alive (renews its lease) but its peer stream stalls after the
    headers, every time. Each stall is a read timeout -> PeerBroke -> _next(), which
    starts a fresh deadline and follows the same leader again: the follower never
    gives up and the client hangs. Expected: a bound (e.g. no progress across N
    breaks, or the overall deadline) after which it fetches alone."""
    data = os.urandom(1000)
    digest = _digest(data)

    def answer(req: Request) -> Script:
        start = 0
        if "range" in req.headers:
            start = int(req.headers["range"].split("=")[1].rstrip("-"))
        rest = len(data) - start
        if start:
            head = response(
                206,
                b"",
                {
                    "content-range": f"bytes {start}-{len(data) - 1}/{len(data)}",
                    "content-length": str(rest),
                },
                length=False,
            )
        else:
            head = response(200, b"", {"content-length": str(rest)}, length=False)
        # The first answer sends 10 bytes; every resumed one only its headers. Then
        # silence.
        return Script([head + (b"" if start else data[:10]), 3600.0])

    peer = RawUpstream(answer)
    prefix = f"{uuid.uuid4().hex}:"
    cluster = _cluster(redis_server, prefix, read_timeout=0.3)
    stop = asyncio.Event()
    upstream = _Upstream(data)
    async with peer.serve() as url:
        holder = asyncio.create_task(
            _hold_lease(cluster.index, f"lease:{digest}", f"{url} leader", stop)
        )
        await asyncio.sleep(0.1)
        source = await cluster.source(upstream)(  # type: ignore[arg-type]
            "r", digest, 10 * MiB, _Write(tmp_path / "t")
        )
        got = b""
        try:
            # 2 * lease_ttl + 2 = 4 s is the follower's own deadline; give it 12.
            async with asyncio.timeout(12):
                async for chunk in source:
                    got += chunk
        except TimeoutError:
            pass
        finally:
            await source.aclose()
            stop.set()
            await holder
    await cluster.index.aclose()
    await cluster.aclose()
    assert got == data, (
        f"follower stuck: {len(got)} bytes after 12 s, {len(peer.requests)} peer "
        f"requests, upstream opened {upstream.opened}"
    )


async def test_once_does_not_wait_out_the_deadline_when_the_leader_failed(
    redis_server: RedisServer,
) -> None:
    """Replica A leads a manifest fetch that fails (a 404, or the upstream down during
    a revalidation: A serves stale and writes nothing). Replica B polls done_elsewhere
    until `wait` (fetch_timeout + 1 = 21 s by default) although A released the lease at
    once, then does the work itself. A 404 (or a stale answer) takes 21+ s on B."""
    prefix = f"{uuid.uuid4().hex}:"
    a = _cluster(redis_server, prefix)
    b = _cluster(redis_server, prefix)
    b.owner = "http://127.0.0.1:2 b"
    started = asyncio.Event()

    async def fails() -> str:
        started.set()
        await asyncio.sleep(0.1)
        raise UpstreamError("MANIFEST_UNKNOWN", "no such tag", status=404)

    async def nothing() -> str | None:
        return None

    task_a = asyncio.create_task(a.once("fetch:x", fails, nothing, 5))
    await started.wait()
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    with pytest.raises(UpstreamError):
        await b.once("fetch:x", fails, nothing, 5)
    took = loop.time() - t0
    with pytest.raises(UpstreamError):
        await task_a
    for c in (a, b):
        await c.index.aclose()
        await c.aclose()
    assert took < 1.5, f"the follower waited {took:.1f} s for a leader that had given up"


async def test_a_failed_upload_task_is_retrieved_when_aborted(tmp_path: Path) -> None:
    """Upload.abort() only cancels a task that is still running; one that already
    failed (S3 broke mid-upload, or its temp file never existed because the L1 could
    not create it, Downloads.get_or_start's write_error path) is never awaited: asyncio
    logs 'Task exception was never retrieved' with a traceback at GC."""
    from mirror.objects import Objects

    reported: list[dict[str, Any]] = []
    loop = asyncio.get_running_loop()
    loop.set_exception_handler(lambda _loop, ctx: reported.append(ctx))
    objects = Objects.connect(
        bucket="b",
        prefix="",
        endpoint="http://127.0.0.1:9",
        region="us-east-1",
        path_style=True,
        ca_bundle=None,
        access_key_id="k",
        secret_access_key="s",
        connect_timeout=1,
        read_timeout=1,
        metrics=Metrics(),
    )
    # The L1 could not create the temp file (full or read-only disk): publish() still
    # starts the upload, whose os.open fails.
    upload = objects.upload(_digest(b"x"), tmp_path / "never-created")
    upload.start()
    await asyncio.sleep(0.1)
    await upload.abort()
    del upload
    gc.collect()
    await asyncio.sleep(0)
    loop.set_exception_handler(None)
    assert not reported, reported[0].get("message")
