"""The local disk store: the embedded default.

Layout under the cache directory::

    index/                      the index (mirror.diskindex): tags, manifests, blob sizes
    blobs/<alg>/<hex[:2]>/<hex> one file per blob digest, shared by every repository
    tmp/                        downloads in progress; renamed into blobs/ once verified:
                                <alg>-<hex>-<upstream> for a leased download
                                (mirror.sharing; the upstream's name hashed),
                                a random name otherwise
    locks/                      flock files of the processes sharing the cache (mirror.locks)

Blobs live outside the index so that committing a multi-GB download is a rename,
never a second copy. Anything that can take long (fsync, hashing) runs in worker
threads elsewhere.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import fcntl
import hashlib
import logging
import os
import re
import shutil
import time
import uuid
from collections.abc import AsyncIterator, Callable
from pathlib import Path

from mirror import locks
from mirror.diskindex import DiskIndex
from mirror.filespan import FileSpan, open_read
from mirror.reference import Digest
from mirror.store import BlobEntry, Recovery

log = logging.getLogger(__name__)


class DiskBlob:
    """A committed blob file, open. One body may be taken; closing it closes the file."""

    def __init__(self, fd: int, size: int) -> None:
        self._fd: int | None = fd
        self.size = size

    async def wait_size(self, first: int | None) -> int:
        return self.size

    def body(self, start: int, end: int | None) -> FileBody:
        return FileBody(self, start, self.size if end is None else end)

    def download(self) -> None:
        return None  # local: read in place

    async def aclose(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


class FileBody:
    """Bytes [start, end) of an open blob: one span of the file, sent with sendfile(2)
    where the server offers it (docs/design.md, "Blob path")."""

    def __init__(self, blob: DiskBlob, start: int, end: int) -> None:
        self._blob = blob
        self._start = start
        self._end = end

    async def __aiter__(self) -> AsyncIterator[FileSpan]:
        fd = self._blob._fd
        assert fd is not None
        if self._end > self._start:
            yield FileSpan(fd, self._start, self._end - self._start)

    async def aclose(self) -> None:
        await self._blob.aclose()


class DiskWrite:
    """A download's temp file in `tmp/`; a rename into `blobs/` commits it."""

    def __init__(self, store: DiskStore, digest: Digest, path: Path | None = None) -> None:
        self._store = store
        self._digest = digest
        self.path = path or store.temp_path()

    def wrote(self, size: int) -> None:
        pass

    def publish(self) -> None:
        pass  # one process, one disk: nothing to share

    async def commit(self, size: int) -> Path:
        return await self._store.commit_blob(self._digest, self.path, size)

    async def abort(self) -> None:
        # Unlinking a multi-GB file can take a while: not in the event loop.
        await asyncio.to_thread(unlink_temp, self.path)


def unlink_temp(path: Path) -> None:
    """Best effort: on a read-only or failing disk the file stays, and the store's
    sweep of old temp files removes it once it can (an error here would only be a
    second failure on top of the one being handled)."""
    try:
        path.unlink()
    except FileNotFoundError:
        pass
    except OSError as exc:
        log.warning("cannot remove temp file %s (%s); left for the sweep", path.name, exc)


class DiskStore(DiskIndex):
    def __init__(self, root: Path, clock: Callable[[], float] = time.time) -> None:
        self.root = root
        self.blob_dir = root / "blobs"
        self.tmp_dir = root / "tmp"
        self.lease_dir = root / "locks" / "blobs"
        # The index first: if it cannot be opened, nothing else is created.
        super().__init__(root / "index", clock)
        for d in (self.blob_dir, self.tmp_dir, self.lease_dir):
            d.mkdir(parents=True, exist_ok=True)
        self.serving = locks.FileLock(root / "locks" / "serving.lock")
        self.evicting = locks.FileLock(root / "locks" / "evict.lock")

    def close(self) -> None:
        self.serving.close()
        self.evicting.close()
        super().close()

    def blob_path(self, digest: Digest) -> Path:
        # Digest.parse admitted only [0-9a-f] of a fixed length: no path tricks possible.
        return self.blob_dir / digest.algorithm / digest.hex[:2] / digest.hex

    async def open_blob(self, digest: Digest) -> DiskBlob | None:
        size = await self.blob_size(digest)
        if size is None:
            return None
        try:
            fd = await open_read(self.blob_path(digest))
        except FileNotFoundError:
            # The index outlived its file (removed by hand, or a crash): a miss.
            log.warning("cache index had %s but its file is gone; dropping the entry", digest)
            self.drop_blobs([digest])
            return None
        return DiskBlob(fd, size)

    async def blob_url(self, digest: Digest) -> str | None:
        return None  # clients reach blobs only through the mirror

    def write_blob(self, digest: Digest, temp: Path | None = None) -> DiskWrite:
        """Into `temp` (a leased download's own name), else a random temp name."""
        return DiskWrite(self, digest, temp)

    def temp_path(self) -> Path:
        return self.tmp_dir / uuid.uuid4().hex

    def leased_temp(self, digest: Digest, upstream: str) -> Path:
        """The temp file of the download of `digest` from `upstream` that holds its
        lease: one name, so that other processes find it. Per upstream, as downloads
        are: one registry's wrong bytes never fail another's pulls."""
        return self.tmp_dir / _leased_name(digest, upstream)

    def lease_path(self, digest: Digest, upstream: str) -> Path:
        return self.lease_dir / _leased_name(digest, upstream)

    def _held(self, digest: Digest) -> bool:
        """Whether a live process holds a lease on `digest` (from any upstream)."""
        prefix = f"{digest.algorithm}-{digest.hex}-"
        return any(locks.is_held(p) for p in self.lease_dir.glob(prefix + "*"))

    def _remove_leased_temp(self, path: Path) -> bool:
        """Remove a leased download's temp file unless a live process holds its lease.
        Under the lease's lock: a leader claiming it meanwhile creates its file after
        this one is gone, never before."""
        lease = self.lease_dir / path.name
        fd = os.open(lease, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            if not locks.try_flock(fd, fcntl.LOCK_EX) or not locks.names_inode(lease, fd):
                return False
            path.unlink(missing_ok=True)
            os.unlink(lease)
            return True
        finally:
            os.close(fd)

    async def commit_blob(self, digest: Digest, temp: Path, size: int) -> Path:
        """Adopt a verified temp file: a rename, atomic on one file system."""
        final = self.blob_path(digest)
        final.parent.mkdir(parents=True, exist_ok=True)
        os.replace(temp, final)
        try:
            self._add_blob(digest, size, self._clock())
        except BaseException:
            # An unindexed file would hold its space, unseen, until the next recovery.
            final.unlink(missing_ok=True)
            raise
        return final

    def drop_blobs(self, digests: list[Digest]) -> None:
        """Index rows in one transaction, then the files. Open readers keep reading
        (POSIX unlink semantics)."""
        self._pop_blobs(digests)
        for digest in digests:
            with contextlib.suppress(FileNotFoundError):
                self.blob_path(digest).unlink()

    def sweep_temp(self, older_than: float) -> int:
        # Wall-clock file times, not the injected clock: the file system keeps them.
        cutoff = time.time() - older_than
        removed = 0
        for entry in os.scandir(self.tmp_dir):
            try:
                if not entry.is_file(follow_symlinks=False) or entry.stat().st_mtime >= cutoff:
                    continue
                if _LEASED.fullmatch(entry.name):
                    # A leased download's: never while its leader lives, however slow.
                    removed += self._remove_leased_temp(Path(entry.path))
                else:
                    os.unlink(entry.path)
                    removed += 1
            except OSError:
                continue  # gone meanwhile, or still not removable: next round
        self._clear_leases()
        if removed:
            log.info("removed %d stale temp files", removed)
        return removed

    def verify_blob(self, entry: BlobEntry) -> bool:
        digest = entry.digest
        h = hashlib.new(digest.algorithm)
        size = 0
        try:
            with open(self.blob_path(digest), "rb") as f:
                while chunk := f.read(1 << 20):
                    h.update(chunk)
                    size += len(chunk)
        except FileNotFoundError:
            self.drop_blobs([digest])
            return False
        if h.hexdigest() == digest.hex and size == entry.size:
            return True
        log.error("cached blob %s failed verification; removed", digest)
        self.drop_blobs([digest])
        return False

    def _clear_leases(self) -> int:
        """Remove lease files no live process holds (left by leaders that died)."""
        return sum(locks.clear_if_free(Path(e.path)) for e in os.scandir(self.lease_dir))

    def recover(self) -> Recovery:
        """Make the cache consistent after a crash or `kill -9` at any moment.

        - `tmp/` holds downloads that never verified: all removed.
        - A blob file without an index entry was renamed into place but never recorded
          (killed mid-commit): removed rather than trusted.
        - An index entry without its file (removed by hand, lost): dropped.
        Committed files were fsynced before their rename, so what remains is verified.

        Other processes may be serving from this cache (workers, or a restarted one):
        every server holds `locks/serving.lock` shared from here on. A process that can
        take it exclusively is alone and recovers everything; otherwise it leaves
        what live processes own: temp files of held leases, random-named temp files
        (the hourly sweep takes those once old), and blob files being committed
        under a held lease.
        """
        started = time.perf_counter()
        alone = self.serving.try_exclusive()
        try:
            return self._recover(alone, started)
        finally:
            self.serving.shared()

    def _recover(self, alone: bool, started: float) -> Recovery:
        temp_removed = 0
        for entry in self.tmp_dir.iterdir():
            if not alone and entry.is_file() and _LEASED.fullmatch(entry.name):
                temp_removed += self._remove_leased_temp(entry)
                continue
            if not alone:
                continue  # random names: maybe a live process's; the sweep takes them
            with contextlib.suppress(FileNotFoundError):
                if entry.is_dir():
                    shutil.rmtree(entry)
                else:
                    entry.unlink()
                temp_removed += 1
        self._clear_leases()
        scan = self.scan()
        indexed = {str(b.digest): b for b in scan.blobs}
        on_disk = set()
        orphans = 0
        for algorithm_dir in _subdirs(self.blob_dir):
            for prefix_dir in _subdirs(Path(algorithm_dir.path)):
                for file in os.scandir(prefix_dir.path):
                    digest = f"{algorithm_dir.name}:{file.name}"
                    if digest in indexed:
                        on_disk.add(digest)
                        continue
                    if not alone and (
                        self._held(Digest.parse(digest))
                        or self.indexed_size(Digest.parse(digest)) is not None
                    ):
                        # Being committed (renamed, its entry comes next; the lease is
                        # held until then), or committed since the scan.
                        on_disk.add(digest)
                        continue
                    with contextlib.suppress(FileNotFoundError):
                        os.unlink(file.path)
                    orphans += 1
        self.reconcile(scan)
        # Through drop_blobs: one transaction, and the usage totals follow.
        missing = [indexed[d].digest for d in indexed.keys() - on_disk]
        self.drop_blobs(missing)
        return Recovery(
            len(on_disk), temp_removed, orphans, len(missing), time.perf_counter() - started
        )

    def probe(self) -> tuple[bool, str]:
        """A full disk is not unusable: hits still serve and misses stream uncached, so
        taking the mirror out of service would only send every node upstream. A cache
        that cannot be written at all (read-only, gone, wrong owner) is unusable."""
        path = self.tmp_dir / f".probe-{uuid.uuid4().hex}"
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            try:
                os.write(fd, b"\0")
            finally:
                os.close(fd)
                path.unlink(missing_ok=True)
        except OSError as exc:
            if exc.errno in (errno.ENOSPC, errno.EDQUOT):
                return True, "full: serving cached content, new content uncached"
            return False, f"not writable: {exc.strerror or exc}"
        return True, "ok"


def _subdirs(path: Path) -> list[os.DirEntry[str]]:
    return [e for e in os.scandir(path) if e.is_dir(follow_symlinks=False)]


_LEASED = re.compile(r"[a-z0-9]+-[0-9a-f]+-[0-9a-f]{12}")  # random temp names: hex only


def _leased_name(digest: Digest, upstream: str) -> str:
    # Upstream names hold ":" and "."; a hash keeps file names plain.
    tag = hashlib.sha256(upstream.encode()).hexdigest()[:12]
    return f"{digest.algorithm}-{digest.hex}-{tag}"
