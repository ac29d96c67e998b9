"""One upstream download per digest across the processes sharing a cache directory.

`Downloads` coalesces a process's own requests. Across processes (`workers`, or two
`mirror serve` on one `--cache-dir`; store: disk), the digest's lease file decides
(`mirror.locks`)::

    locks/blobs/<alg>-<hex>-<u>   flock'ed by the leader; a log of its download's events
    tmp/<alg>-<hex>-<u>           the leader's temp file, one name per digest

(<u>: the upstream's name, hashed. Downloads are per upstream, as in a process: one
registry's failure or wrong bytes never fail pulls through another.)

- **Leader** (took the lease): downloads as a lone process does, into the temp file,
  and appends one JSON line per event: `leader` (its temp file's inode, upstream and
  repository), `streaming` (the upstream's size), then `committed` or `failed` (with
  the upstream's error, for followers of the same repository). Before the last event
  it unlinks the lease file (holding the lock), so a newcomer never finds a finished
  lease: it claims a new one, or finds the blob committed.
- **Follower** (the lease is held): its own `BlobDownload` is driven by `follow`,
  which reads the log and tails the temp file, never the upstream: `streaming` at the
  leader's, `progressed` as the file grows (fstat every POLL_MIN while it grows,
  backing off to POLL_MAX when idle), `verified` and `committed` only once the
  leader's commit is in the index with the right size (the leader verified it).
  Readers (`DownloadReader`, `DownloadBody`) are unchanged: the last byte waits.
- **A leader that dies**: the kernel drops its lock; a follower finds it free with no
  last event, and fails. Before `streaming` that costs its clients nothing (the
  download table asks again and leads or follows the next leader); after, their
  bodies are cut, never completed.

Readers of a follower open `/proc/self/fd/<n>` (the tail's descriptor on the temp
file), not its name: the leader may rename it into blobs/ at any moment.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import threading
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mirror import locks
from mirror.diskstore import DiskStore, unlink_temp
from mirror.download import BlobDownload
from mirror.errors import RegistryError, UpstreamError
from mirror.reference import Digest

log = logging.getLogger(__name__)

# How often a follower looks at the leader's file: every 5 ms while it grows (at
# 1 GB/s that is 5 MB a look: readers never wait on the poll), doubling to 100 ms
# while nothing happens (a leader waiting on the upstream, or dead: noticed within it).
POLL_MIN = 0.005
POLL_MAX = 0.1
PROC_FD = Path("/proc/self/fd")


class LeaderLost(Exception):
    """The leading process went away (or gave up) without committing."""


@dataclass
class Leader:
    """This process's lease on a digest: held until `end`."""

    fd: int
    path: Path
    temp: Path
    ended: bool = False

    def _record(self, event: str, **fields: Any) -> None:
        line = json.dumps({"event": event, **fields}, separators=(",", ":")) + "\n"
        # O_APPEND, one write: followers read whole lines or nothing of one.
        os.write(self.fd, line.encode())

    def detach(self) -> Path | None:
        """Rename the temp file to a random name (to remove it at leisure); None if
        it is gone, or stays (then the next leader replaces it)."""
        doomed = self.temp.with_name(uuid.uuid4().hex)
        try:
            os.rename(self.temp, doomed)
        except OSError:
            return None
        return doomed

    def streaming(self, size: int | None) -> None:
        if not self.ended:
            self._record("streaming", size=size)

    def committed(self, size: int) -> None:
        self._end("committed", size=size)

    def failed(self, exc: BaseException) -> None:
        if isinstance(exc, RegistryError):
            self._end(
                "failed",
                code=exc.code,
                message=exc.message,
                status=exc.status,
                upstream_status=getattr(exc, "upstream_status", None),
                headers=exc.headers,
            )
        else:
            self._end("failed")

    def _end(self, event: str, **fields: Any) -> None:
        if self.ended:
            return
        self.ended = True
        try:
            locks.release(self.path, self.fd)
            self._record(event, **fields)
        except OSError as exc:
            # The lock goes with the descriptor: followers see a leader gone, and fail.
            log.warning("cannot record the end of lease %s: %s", self.path.name, exc)
        finally:
            os.close(self.fd)


@dataclass
class Follower:
    """Another process leads the download: the lease's log, open to read."""

    fd: int
    temp: Path


class Sharing:
    """The leases of one upstream's downloads (one per `Downloads` table)."""

    def __init__(self, store: DiskStore, upstream: str) -> None:
        self.store = store
        self.upstream = upstream

    def claim(self, digest: Digest, repo: str) -> Leader | Follower | int | None:
        """Lead (a `Leader`: this process downloads), follow, or find the blob
        committed meanwhile (its size). None: no lease could be taken (the lock
        directory is not writable): download alone, as without other processes."""
        path = self.store.lease_path(digest, self.upstream)
        temp = self.store.leased_temp(digest, self.upstream)
        try:
            fd, leading = locks.claim(path)
        except OSError as exc:
            log.warning("cannot take the lease of %s (%s); downloading unshared", digest, exc)
            return None
        if not leading:
            return Follower(fd, temp)
        leader = Leader(fd, path, temp)
        try:
            # Committed by a leader that ended between our cache lookup and this claim.
            size = self.store.indexed_size(digest)
            if size is not None:
                leader._end("committed", size=size)
                return size
            # A dead leader's file (its followers hold their own descriptors): renamed
            # away at once, and unlinked by a thread of its own (rare), since it may be
            # many GB and this runs in the event loop.
            doomed = leader.detach()
            if doomed is not None:
                threading.Thread(target=unlink_temp, args=(doomed,), daemon=True).start()
            data = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
            try:
                ino = os.fstat(data).st_ino
            finally:
                os.close(data)
            leader._record("leader", pid=os.getpid(), ino=ino, upstream=self.upstream, repo=repo)
        except OSError as exc:
            # No temp file (a full or read-only disk): the download spills, unshared.
            log.debug("cannot start the leased download of %s: %s", digest, exc)
            leader.failed(exc)
            return None
        except BaseException:
            leader.failed(LeaderLost())
            raise
        return leader

    async def follow(self, dl: BlobDownload, follower: Follower) -> None:
        """Drive `dl` from the leader's log and temp file until it ends."""
        tail = _Tail(self, dl, follower)
        try:
            await tail.run()
        except BaseException as exc:
            if dl.running:
                dl.failed(exc)
            if not isinstance(exc, Exception):
                raise
        finally:
            tail.close()


class _Tail:
    def __init__(self, sharing: Sharing, dl: BlobDownload, follower: Follower) -> None:
        self.sharing = sharing
        self.dl = dl
        self.follower = follower
        self.offset = 0  # read so far from the log
        self.pending = b""
        self.data: int | None = None  # the leader's temp file, once found
        self.size: int | None = None
        self.streamed = False  # the leader's upstream answered

    async def run(self) -> None:
        dl, interval = self.dl, POLL_MIN
        while True:
            if self._read_log():
                return
            grew = False
            if self.data is not None and dl.state == "streaming":
                n = os.fstat(self.data).st_size
                if n > dl.on_disk:
                    dl.progressed(n)
                    grew = True
            if not grew and locks.is_free(self.follower.fd):
                # Gone: whatever it logged before its lock went is all there is.
                if not self._read_log():
                    dl.failed(LeaderLost())
                return
            await asyncio.sleep(interval)
            interval = POLL_MIN if grew else min(interval * 2, POLL_MAX)

    def _read_log(self) -> bool:
        """Apply the leader's new events; True once the download has ended."""
        while chunk := os.pread(self.follower.fd, 1 << 16, self.offset):
            self.offset += len(chunk)
            self.pending += chunk
        *lines, self.pending = self.pending.split(b"\n")
        # any() stops at the last event: nothing after it is applied.
        return any(self._apply(json.loads(line)) for line in lines)

    def _apply(self, event: dict[str, Any]) -> bool:
        dl, kind = self.dl, event.get("event")
        if kind == "leader":
            # Only the same upstream's repository may stand for this request's.
            dl.repo = event["repo"] if event["upstream"] == self.sharing.upstream else ""
            self.data = _open_inode(self.follower.temp, int(event["ino"]))
        elif kind == "streaming":
            self.size = event["size"]
            self.streamed = True
            if self.data is not None:
                dl.path = PROC_FD / str(self.data)
                dl.streaming(self.size)
        elif kind == "committed":
            self._committed(int(event["size"]))
            return True
        elif kind == "failed":
            if "code" in event and not self.streamed:
                dl.failed(
                    UpstreamError(
                        event["code"],
                        event["message"],
                        status=event["status"],
                        upstream_status=event["upstream_status"],
                        headers=event["headers"],
                    )
                )
            else:
                dl.failed(LeaderLost())
            return True
        return False

    def _committed(self, size: int) -> None:
        """The leader verified and committed: trust the index, not the log."""
        dl, store = self.dl, self.sharing.store
        final = store.blob_path(dl.digest)
        try:
            on_disk = final.stat().st_size
        except FileNotFoundError:
            on_disk = None
        if store.indexed_size(dl.digest) != size or on_disk != size:
            dl.failed(LeaderLost())  # evicted already, or not what it said: ask again
            return
        if dl.state == "starting":
            dl.path = final
            dl.streaming(size)
        dl.progressed(size)
        dl.verified(size)
        dl.committed(final)

    def close(self) -> None:
        os.close(self.follower.fd)
        if self.data is not None:
            if self.dl.path == PROC_FD / str(self.data):
                self.dl.path = self.follower.temp  # that number may be reused
            os.close(self.data)
            self.data = None


def _open_inode(path: Path, ino: int) -> int | None:
    """`path` opened for reading if it is still the file the leader created."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        return None  # committed (renamed) or failed already: its last event follows
    if os.fstat(fd).st_ino != ino:
        os.close(fd)
        return None
    return fd


def proc_fd_usable() -> bool:
    """Followers' readers open the tail's descriptor through /proc."""
    return PROC_FD.is_dir()
