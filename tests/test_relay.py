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

    async def produce() -> None:
        nonlocal written
        while not stalled.lagged:
            r.push(b"b" * 4096)  # upstream trickles in small reads
            written += 4096
            fast.pos = written
            r.moved(written)
            await r.room(written, wake)

    await asyncio.wait_for(produce(), timeout=10)
    assert stalled.lagged
    assert woken >= 1  # readers were told to look again (the cut one learns it)
    assert r.read(0, 1) is None  # the stalled reader's bytes are gone


async def test_the_last_reader_leaving_abandons_the_download() -> None:
    r = Relay()
    only = r.attach()
    only.closed = True
    with pytest.raises(Abandoned):
        await r.room(0, lambda: None)
