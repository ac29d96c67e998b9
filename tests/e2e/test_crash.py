"""kill -9 in the middle of a download, restart, pull again."""

from __future__ import annotations

import asyncio
import hashlib
import os
import signal
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
from fakes.server import serve
from fakes.upstream import FakeUpstream, Fault
from harness.mirror import MirrorProcess

pytestmark = pytest.mark.e2e


async def test_kill_9_mid_body_then_restart_serves_only_verified_content(
    tmp_path: Path,
) -> None:
    upstream = FakeUpstream()
    data = os.urandom(16 * 1024 * 1024)
    digest = upstream.add_blob(data)
    upstream.faults[digest] = Fault(delay=0.01, chunk=64 * 1024)  # ~2.5 s in all
    async with serve(upstream) as url:
        mirror = MirrorProcess(tmp_path / "m", url)
        await asyncio.to_thread(mirror.start)
        try:
            received = 0
            with pytest.raises(httpx.HTTPError):
                async with (
                    httpx.AsyncClient(base_url=mirror.url, timeout=30) as c,
                    c.stream("GET", f"/v2/a/blobs/{digest}") as r,
                ):
                    async for chunk in r.aiter_raw():
                        received += len(chunk)
                        if received > 2 * 1024 * 1024:
                            mirror.stop(signal.SIGKILL)  # mid-body, mid-download
            assert 0 < received < len(data)
            assert any((mirror.cache_dir / "tmp").iterdir())  # a partial download is left

            del upstream.faults[digest]
            restarted = MirrorProcess(tmp_path / "m2", url, cache_dir=mirror.cache_dir)
            await asyncio.to_thread(restarted.start)
            try:
                async with httpx.AsyncClient(base_url=restarted.url, timeout=30) as c:
                    again = await c.get(f"/v2/a/blobs/{digest}")
                assert "sha256:" + hashlib.sha256(again.content).hexdigest() == digest
                assert "removed 1 temp files" in restarted.log()
            finally:
                await asyncio.to_thread(restarted.stop)
        finally:
            await asyncio.to_thread(mirror.stop)

    assert list((mirror.cache_dir / "tmp").iterdir()) == []
    blob_files = [p for p in (mirror.cache_dir / "blobs").rglob("*") if p.is_file()]
    assert [p.name for p in blob_files] == [digest.removeprefix("sha256:")]
    verify = subprocess.run(
        [sys.executable, "-m", "mirror", "cache", "verify", "--cache-dir", str(mirror.cache_dir)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert verify.returncode == 0, verify.stdout + verify.stderr
    assert "verified 1 blobs: 1 ok, 0 removed" in verify.stdout
