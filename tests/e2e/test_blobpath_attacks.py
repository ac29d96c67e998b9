"""The blob path of a real `mirror serve` (its listener, with sendfile), attacked:
odd upstream bodies, clients that misbehave, files that change under it."""

from __future__ import annotations

import asyncio
import hashlib
import os
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
