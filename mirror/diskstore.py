"""The local disk store: the embedded default.

Layout under the cache directory::

    index/                      the index (mirror.diskindex): tags, manifests, blob sizes
    blobs/<alg>/<hex[:2]>/<hex> one file per blob digest, shared by every repository
    tmp/                        downloads in progress; renamed into blobs/ once verified

Blobs live outside the index so that committing a multi-GB download is a rename,
never a second copy. Anything that can take long (fsync, hashing) runs in worker
threads elsewhere.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import hashlib
import logging
import os
import shutil
import time
import uuid
from collections.abc import AsyncIterator, Callable
from pathlib import Path

from mirror.diskindex import DiskIndex
from mirror.filespan import FileSpan
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

    def __init__(self, store: DiskStore, digest: Digest) -> None:
        self._store = store
        self._digest = digest
        self.path = store.temp_path()

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
        # The index first: if it cannot be opened, nothing else is created.
        super().__init__(root / "index", clock)
        for d in (self.blob_dir, self.tmp_dir):
            d.mkdir(parents=True, exist_ok=True)

    def blob_path(self, digest: Digest) -> Path:
        # Digest.parse admitted only [0-9a-f] of a fixed length: no path tricks possible.
        return self.blob_dir / digest.algorithm / digest.hex[:2] / digest.hex

    async def open_blob(self, digest: Digest) -> DiskBlob | None:
        size = await self.blob_size(digest)
        if size is None:
            return None
        try:
            fd = os.open(self.blob_path(digest), os.O_RDONLY)
        except FileNotFoundError:
            # The index outlived its file (removed by hand, or a crash): a miss.
            log.warning("cache index had %s but its file is gone; dropping the entry", digest)
            self.drop_blobs([digest])
            return None
        return DiskBlob(fd, size)

    async def blob_url(self, digest: Digest) -> str | None:
        return None  # clients reach blobs only through the mirror

    def write_blob(self, digest: Digest) -> DiskWrite:
        return DiskWrite(self, digest)

    def temp_path(self) -> Path:
        return self.tmp_dir / uuid.uuid4().hex

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
                if entry.is_file(follow_symlinks=False) and entry.stat().st_mtime < cutoff:
                    os.unlink(entry.path)
                    removed += 1
            except OSError:
                continue  # gone meanwhile, or still not removable: next round
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

    def recover(self) -> Recovery:
        """Make the cache consistent after a crash or `kill -9` at any moment.

        - `tmp/` holds downloads that never verified: all removed.
        - A blob file without an index entry was renamed into place but never recorded
          (killed mid-commit): removed rather than trusted.
        - An index entry without its file (removed by hand, lost): dropped.
        Committed files were fsynced before their rename, so what remains is verified.
        """
        started = time.perf_counter()
        temp_removed = 0
        for entry in self.tmp_dir.iterdir():
            with contextlib.suppress(FileNotFoundError):
                if entry.is_dir():
                    shutil.rmtree(entry)
                else:
                    entry.unlink()
                temp_removed += 1
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
