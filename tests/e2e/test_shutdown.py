"""SIGTERM (docker stop, a pod deletion) while a pull is in flight: it completes, the
process exits 0, and nothing partial is left in the cache."""

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


async def test_sigterm_lets_the_pull_in_flight_finish_and_exits_0(tmp_path: Path) -> None:
    upstream = FakeUpstream()
    data = os.urandom(8 << 20)
    digest = upstream.add_blob(data)
    # About 2 s of body: SIGTERM lands mid-transfer.
    upstream.faults[digest] = Fault(chunk=256 * 1024, delay=0.06)
    async with serve(upstream) as url:
        mirror = MirrorProcess(tmp_path / "m", url, env={"MIRROR_SHUTDOWN_TIMEOUT": "20"})
        await asyncio.to_thread(mirror.start)
        try:
            received = 0
            first_bytes = asyncio.Event()
            loop = asyncio.get_running_loop()

            def pull() -> tuple[int, str]:
                nonlocal received
                h = hashlib.sha256()
                with httpx.stream("GET", f"{mirror.url}/v2/a/blobs/{digest}", timeout=30) as r:
                    for chunk in r.iter_raw():
                        h.update(chunk)
                        received += len(chunk)
                        loop.call_soon_threadsafe(first_bytes.set)
                    return r.status_code, "sha256:" + h.hexdigest()

            client = asyncio.create_task(asyncio.to_thread(pull))
            await asyncio.wait_for(first_bytes.wait(), 10)
            assert received < len(data)  # mid-body
            code = await asyncio.to_thread(mirror.terminate, signal.SIGTERM)
            status, got = await client
        finally:
            await asyncio.to_thread(mirror.stop)
    assert code == 0, mirror.log()
    assert (status, got) == (200, digest)  # the whole blob, verified by the client
    assert "Shutting down" in mirror.log()
    # Nothing partial remains: no temp files; whatever was committed verifies.
    cache = mirror.cache_dir
    assert not any((cache / "tmp").iterdir())
    verify = subprocess.run(
        [sys.executable, "-m", "mirror", "cache", "verify", "--cache-dir", str(cache)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert verify.returncode == 0, verify.stdout + verify.stderr


async def test_new_connections_are_refused_during_shutdown(tmp_path: Path) -> None:
    upstream = FakeUpstream()
    digest = upstream.add_blob(os.urandom(4 << 20))
    upstream.faults[digest] = Fault(chunk=128 * 1024, delay=0.05)
    async with serve(upstream) as url:
        mirror = MirrorProcess(tmp_path / "m", url, env={"MIRROR_SHUTDOWN_TIMEOUT": "20"})
        await asyncio.to_thread(mirror.start)
        try:
            slow = asyncio.create_task(
                asyncio.to_thread(httpx.get, f"{mirror.url}/v2/a/blobs/{digest}", timeout=30)
            )
            await asyncio.sleep(0.3)
            assert mirror._proc is not None
            mirror._proc.send_signal(signal.SIGTERM)
            await asyncio.sleep(0.3)
            with pytest.raises(httpx.ConnectError):
                await asyncio.to_thread(httpx.get, f"{mirror.url}/healthz", timeout=5)
            assert (await slow).status_code == 200
            assert mirror._proc.wait(timeout=30) == 0
        finally:
            await asyncio.to_thread(mirror.stop)
