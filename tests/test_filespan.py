"""Opening and reading cached files without the event loop waiting for the disk."""

from __future__ import annotations

import asyncio
import os
import threading
from pathlib import Path

import pytest

from mirror import filespan


def _open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


async def test_a_cancelled_open_closes_the_descriptor_its_thread_opened(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "blob"
    path.write_bytes(b"x" * 4096)
    release = threading.Event()
    opened = threading.Event()
    done = threading.Event()  # the thread's open has returned its descriptor
    real_open = os.open

    def slow_open(p: object, flags: int, *args: int) -> int:
        if p != path:
            return real_open(p, flags, *args)  # type: ignore[arg-type]
        opened.set()
        release.wait(10)  # a directory lookup on a busy disk
        try:
            return real_open(p, flags, *args)
        finally:
            done.set()

    monkeypatch.setattr(os, "open", slow_open)
    before = _open_fds()
    task = asyncio.create_task(filespan.open_read(path))
    await asyncio.to_thread(opened.wait, 10)
    task.cancel()  # the client left while the name was being looked up
    with pytest.raises(asyncio.CancelledError):
        await task
    release.set()
    assert await asyncio.to_thread(done.wait, 10)
    for _ in range(200):  # the thread finishes the open; its descriptor is closed
        if _open_fds() <= before:
            break
        await asyncio.sleep(0.01)
    assert _open_fds() <= before
