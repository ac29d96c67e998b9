"""The disk-full relay: the rest of a blob, from memory, to the readers already attached.

When the cache cannot take a download's bytes (ENOSPC, a read-only file system, EIO)
the download *spills*: it keeps hashing and hands each chunk to this relay instead of
the file, so attached clients still get every byte (and the digest check) while the
mirror stays up. The relay is a bounded window that moves at the pace of the slowest
attached reader; a reader that stalls it for `STALL` seconds is cut (it can resume
with Range) rather than holding everyone back.
"""

from __future__ import annotations

import asyncio
import weakref
from collections import deque
from collections.abc import Callable

# This many bytes may wait for the slowest reader; one that holds the window full
# this long is cut.
WINDOW = 32 << 20
STALL = 30.0


class Abandoned(Exception):
    """A spilled download lost its last reader: with no cache to fill, it stops."""


class Cursor:
    """One reader's position in a download: what the relay may let go of."""

    __slots__ = ("__weakref__", "closed", "lagged", "pos")

    def __init__(self) -> None:
        self.pos = 0
        self.closed = False
        self.lagged = False


class Relay:
    def __init__(self) -> None:
        self._chunks: deque[bytes] = deque()
        self.start = 0  # offset of the first byte held
        self._bytes = 0
        # Weakly held: a reader that vanishes never pins the window.
        self._cursors: weakref.WeakSet[Cursor] = weakref.WeakSet()
        self._room = asyncio.Event()

    def attach(self) -> Cursor:
        cursor = Cursor()
        self._cursors.add(cursor)
        return cursor

    def begin(self, offset: int) -> None:
        """The relay takes over at `offset`: bytes before it are in the file."""
        self.start = offset

    def push(self, chunk: bytes) -> None:
        self._chunks.append(chunk)
        self._bytes += len(chunk)

    def read(self, pos: int, limit: int) -> bytes | None:
        """Up to `limit` bytes at `pos`; None if they were let go."""
        if pos < self.start:
            return None
        offset = self.start
        for chunk in self._chunks:
            if pos < offset + len(chunk):
                return chunk[pos - offset : pos - offset + limit]
            offset += len(chunk)
        return b""

    def moved(self, written: int) -> None:
        """A reader advanced or left: drop what every live reader has read."""
        floor = min((c.pos for c in self._live()), default=written)
        while self._chunks and self.start + len(self._chunks[0]) <= floor:
            chunk = self._chunks.popleft()
            self.start += len(chunk)
            self._bytes -= len(chunk)
        self._room.set()

    async def room(self, written: Callable[[], int], wake: Callable[[], None]) -> None:
        """Wait until the window has room; cut readers that stall it for STALL.

        `written` is read when it is needed, not when the wait starts: the writer
        thread keeps relaying chunks it had queued while the producer waits, and a
        reader that fell behind them must be judged against where the bytes are now.
        `wake` tells waiting readers to look again (a cut one learns it was cut).
        """
        while True:
            live = self._live()
            if not live:
                raise Abandoned
            if self._bytes <= WINDOW:
                return
            self._room.clear()
            try:
                await asyncio.wait_for(self._room.wait(), STALL)
            except TimeoutError:
                keep_from = written() - WINDOW
                if self._chunks:
                    # A reader stalled inside the oldest chunk must go too, or nothing
                    # is freed and the producer waits forever.
                    keep_from = max(keep_from, self.start + len(self._chunks[0]))
                for cursor in live:
                    if cursor.pos < keep_from:
                        cursor.lagged = True
                self.moved(written())
                wake()

    def _live(self) -> list[Cursor]:
        return [c for c in self._cursors if not c.closed and not c.lagged]
