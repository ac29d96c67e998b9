"""The disk-full relay: a window that moves at its slowest live reader's pace."""

from __future__ import annotations

import asyncio

import pytest

from mirror import relay
from mirror.relay import Abandoned, Relay


def test_reads_come_from_the_window_until_everyone_has_read_them() -> None:
    r = Relay()
    r.begin(100)  # bytes before 100 are in the file
    slow, fast = r.attach(), r.attach()
    r.push(b"abcd")
    r.push(b"efgh")
    assert r.read(102, 3) == b"cd"  # within one chunk
    assert r.read(104, 10) == b"efgh"
    assert r.read(108, 10) == b""  # not yet arrived
    assert r.read(99, 1) is None  # never held: in the file
    slow.pos, fast.pos = 104, 108
    r.moved(108)
    assert r.read(100, 4) is None  # everyone read it: let go
    assert r.read(104, 4) == b"efgh"


async def test_a_reader_stalled_mid_chunk_is_cut_and_the_others_go_on(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A reader that stops inside the window's first chunk, followed by smaller
    chunks: cutting only readers behind `written - WINDOW` would never free the chunk,
    and the producer (and every other client) would wait forever."""
    monkeypatch.setattr(relay, "WINDOW", 600 << 10)
    monkeypatch.setattr(relay, "STALL", 0.05)
    r = Relay()
    stalled, fast = r.attach(), r.attach()
    written = 512 << 10
    r.push(b"a" * written)  # one large chunk...
    stalled.pos = 256 << 10  # ...that the stalled reader is in the middle of
    woken = 0

    def wake() -> None:
        nonlocal woken
        woken += 1

    def now() -> int:
        return written

    async def produce() -> None:
        nonlocal written
        while not stalled.lagged:
            r.push(b"b" * 4096)  # upstream trickles in small reads
            written += 4096
            fast.pos = written
            r.moved(written)
            await r.room(now, wake)

    await asyncio.wait_for(produce(), timeout=10)
    assert stalled.lagged
    assert woken >= 1  # readers were told to look again (the cut one learns it)
    assert r.read(0, 1) is None  # the stalled reader's bytes are gone


async def test_the_last_reader_leaving_abandons_the_download() -> None:
    r = Relay()
    only = r.attach()
    only.closed = True
    with pytest.raises(Abandoned):
        await r.room(lambda: 0, lambda: None)


async def test_a_stall_is_judged_by_the_bytes_relayed_while_waiting(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The writer thread goes on relaying what it had queued while the producer waits:
    a reader that falls a window behind meanwhile is cut after one stall, not two."""
    monkeypatch.setattr(relay, "WINDOW", 100)
    monkeypatch.setattr(relay, "STALL", 0.2)
    r = Relay()
    behind, ahead = r.attach(), r.attach()
    written = 110
    for _ in range(11):
        r.push(b"x" * 10)
    behind.pos, ahead.pos = 50, 110
    loop = asyncio.get_running_loop()
    started = loop.time()
    waiting = asyncio.create_task(r.room(lambda: written, lambda: None))
    await asyncio.sleep(0)  # the producer is waiting now
    for _ in range(5):  # queued chunks still arrive
        r.push(b"x" * 10)
        written += 10
    await asyncio.wait_for(waiting, timeout=5)
    assert behind.lagged
    assert loop.time() - started < 0.35  # one stall
