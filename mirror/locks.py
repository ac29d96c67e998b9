"""flock(2) locks on files in the cache directory, for the processes that share it.

The kernel releases a flock when its holder exits, however it exits (kill -9 too), so
no lock outlives its process and none needs an expiry time (compare the Redis leases
of replicas, `mirror.cluster`). A flock belongs to an open file description: two
opens in one process exclude each other like two processes do.

    locks/serving.lock          held shared by each `mirror serve`; exclusive during the
                                start-up recovery of a process that found itself alone
    locks/evict.lock            held by the process running an eviction round
    locks/blobs/<alg>-<hex>-<u> a blob download's lease (`claim`): held by the process
                                fetching it, and the log of its events (`mirror.sharing`)

A lease file is one leadership. Whoever deletes one holds its lock while unlinking,
and whoever locks one checks that its path still names the inode it locked (`claim`):
so a lock taken on a deleted file is never mistaken for the live lease.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
from collections.abc import Iterator
from pathlib import Path

# A claim that keeps finding its lease file replaced gives up after this many tries
# (each replacement is a download ending or a dead leader's file being cleared).
CLAIM_TRIES = 50


def try_flock(fd: int, operation: int) -> bool:
    """Take `operation` (LOCK_EX or LOCK_SH) without waiting; False if held elsewhere."""
    try:
        fcntl.flock(fd, operation | fcntl.LOCK_NB)
    except OSError as exc:
        if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
            return False
        raise
    return True


def names_inode(path: Path, fd: int) -> bool:
    """Whether `path` still names the file open as `fd`."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return False
    own = os.fstat(fd)
    return (st.st_ino, st.st_dev) == (own.st_ino, own.st_dev)


def claim(path: Path) -> tuple[int, bool]:
    """Open the lease file at `path`: (fd, True) if this open now holds it (exclusive,
    a fresh empty file), (fd, False) if another holds it (the fd reads its log).

    An unheld file with content was left by a leader that died: it is removed and the
    claim starts over on a new file, so followers of the dead leader (who hold the old
    inode) see its lock free and never a new leader's events.
    """
    for _ in range(CLAIM_TRIES):
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o644)
        try:
            held = try_flock(fd, fcntl.LOCK_EX)
            if not names_inode(path, fd):
                os.close(fd)  # that lease ended (or was cleared) meanwhile: the next one
                continue
            if held and os.fstat(fd).st_size > 0:
                os.unlink(path)
                os.close(fd)
                continue
            return fd, held
        except BaseException:
            os.close(fd)
            raise
    raise OSError(errno.EBUSY, f"lease {path.name} kept changing")


def release(path: Path, fd: int) -> None:
    """Remove the held lease file at `path` (if it is still ours); the fd stays open."""
    if names_inode(path, fd):
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)


def is_free(fd: int) -> bool:
    """Whether no one holds an exclusive lock on `fd`'s file (its holder has gone).
    The probe's own shared lock is dropped at once."""
    if not try_flock(fd, fcntl.LOCK_SH):
        return False
    fcntl.flock(fd, fcntl.LOCK_UN)
    return True


def is_held(path: Path) -> bool:
    """Whether a live process holds the lease file at `path` (no file: not held)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        return False
    try:
        return not is_free(fd)
    finally:
        os.close(fd)


def clear_if_free(path: Path) -> bool:
    """Remove the lease file at `path` unless a live process holds it; True if removed."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        return False
    try:
        if not try_flock(fd, fcntl.LOCK_EX) or not names_inode(path, fd):
            return False
        os.unlink(path)
        return True
    finally:
        os.close(fd)


class FileLock:
    """A named lock file that lives as long as the cache directory."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._fd: int | None = None

    def _open(self) -> int:
        if self._fd is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        return self._fd

    def try_exclusive(self) -> bool:
        return try_flock(self._open(), fcntl.LOCK_EX)

    def shared(self) -> None:
        """Hold it shared (waiting for an exclusive holder), converting an exclusive
        hold: not atomic (flock(2)), so another may take it exclusively in between."""
        fcntl.flock(self._open(), fcntl.LOCK_SH)

    @contextlib.contextmanager
    def exclusive(self, *, wait: bool) -> Iterator[bool]:
        """Hold it exclusively for the block; without `wait`, yields False (held
        elsewhere, nothing to do) instead of waiting."""
        fd = self._open()
        if wait:
            fcntl.flock(fd, fcntl.LOCK_EX)
        elif not try_flock(fd, fcntl.LOCK_EX):
            yield False
            return
        try:
            yield True
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # releases whatever this open held
            self._fd = None
