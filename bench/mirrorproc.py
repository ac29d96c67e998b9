"""A real `mirror serve` process for benchmarks, and the CPU it spends.

A real process, not an in-process server: a client and a server in one asyncio loop
see ~40 ms of delayed ACKs per sequential keep-alive request (docs/benchmarks.md).
"""

from __future__ import annotations

import asyncio
import os
import socket
import subprocess
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import httpx


@asynccontextmanager
async def mirror_process(
    upstream: str, cache_dir: Path, env: dict[str, str] | None = None
) -> AsyncIterator[tuple[httpx.AsyncClient, int]]:
    """`mirror serve` on 127.0.0.1, ready; (a client of it, its pid). The machine's own
    MIRROR_* settings are left out; the access log is off."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    environment = {k: v for k, v in os.environ.items() if not k.startswith("MIRROR_")}
    environment.update(MIRROR_ACCESS_LOG="false", MIRROR_LOG_LEVEL="warning", **(env or {}))
    cmd = [sys.executable, "-m", "mirror", "serve", "--listen", f"127.0.0.1:{port}"]
    cmd += ["--cache-dir", str(cache_dir), "--upstream", upstream]
    proc = subprocess.Popen(cmd, env=environment)
    try:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=30) as c:
            for _ in range(400):
                try:
                    if (await c.get("/readyz")).status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                await asyncio.sleep(0.05)
            yield c, proc.pid
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def cpu_seconds(pid: int) -> float:
    """utime + stime of one process, from /proc (the mirror's alone, not the client's)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
