"""The on-disk cache: the one module that imports diskcache.

Layout under the cache directory::

    index/                      diskcache: tag entries, manifests by digest, blob sizes
    blobs/<alg>/<hex[:2]>/<hex> one file per blob digest, shared by every repository
    tmp/                        downloads in progress; renamed into blobs/ once verified

Blobs live outside diskcache so that committing a multi-GB download is a rename,
never a second copy. Index calls are small SQLite operations (tens of µs) and run
inline; anything that can take long (fsync, hashing) runs in worker threads elsewhere.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import diskcache

from mirror.reference import Digest

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class StoredManifest:
    digest: str
    media_type: str
    body: bytes


@dataclass(frozen=True, slots=True)
class TagEntry:
    digest: str
    media_type: str
    stored_at: float  # wall-clock seconds, from the injected clock


class Storage:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.blob_dir = root / "blobs"
        self.tmp_dir = root / "tmp"
        for d in (self.blob_dir, self.tmp_dir):
            d.mkdir(parents=True, exist_ok=True)
        self._clear_tmp()
        # eviction_policy "none": diskcache must never drop index rows on its own,
        # or blob files would lose their entries behind our back.
        self._index: Any = diskcache.Cache(
            str(root / "index"), eviction_policy="none", size_limit=2**62
        )

    def close(self) -> None:
        self._index.close()

    def _clear_tmp(self) -> None:
        # Leftovers of a crash or kill: never verified, never served.
        for entry in self.tmp_dir.iterdir():
            with contextlib.suppress(FileNotFoundError):
                if entry.is_dir():
                    shutil.rmtree(entry)
                else:
                    entry.unlink()

    # -- manifests --------------------------------------------------------------------

    def get_manifest(self, digest: Digest) -> StoredManifest | None:
        value = self._index.get(f"manifest/{digest}")
        if value is None:
            return None
        media_type, body = cast(tuple[str, bytes], value)
        return StoredManifest(str(digest), media_type, body)

    def put_manifest(self, manifest: StoredManifest) -> None:
        self._index.set(f"manifest/{manifest.digest}", (manifest.media_type, manifest.body))

    # -- tags -------------------------------------------------------------------------

    @staticmethod
    def _tag_key(upstream: str, repo: str, tag: str, accept_key: str) -> str:
        return f"tag/{upstream}/{repo}:{tag}#{accept_key}"

    def get_tag(self, upstream: str, repo: str, tag: str, accept_key: str) -> TagEntry | None:
        value = self._index.get(self._tag_key(upstream, repo, tag, accept_key))
        if value is None:
            return None
        digest, media_type, stored_at = cast(tuple[str, str, float], value)
        return TagEntry(digest, media_type, stored_at)

    def put_tag(self, upstream: str, repo: str, tag: str, accept_key: str, entry: TagEntry) -> None:
        self._index.set(
            self._tag_key(upstream, repo, tag, accept_key),
            (entry.digest, entry.media_type, entry.stored_at),
        )

    # -- blobs ------------------------------------------------------------------------

    def blob_path(self, digest: Digest) -> Path:
        # Digest.parse admitted only [0-9a-f] of a fixed length: no path tricks possible.
        return self.blob_dir / digest.algorithm / digest.hex[:2] / digest.hex

    def blob_size(self, digest: Digest) -> int | None:
        size = self._index.get(f"blob/{digest}")
        return None if size is None else int(size)

    def open_blob(self, digest: Digest) -> tuple[int, int] | None:
        """Open a cached blob: (fd, size), or None on a miss. The caller closes fd."""
        size = self.blob_size(digest)
        if size is None:
            return None
        try:
            fd = os.open(self.blob_path(digest), os.O_RDONLY)
        except FileNotFoundError:
            # The index outlived its file (removed by hand, or a crash): a miss.
            log.warning("cache index had %s but its file is gone; dropping the entry", digest)
            self._index.delete(f"blob/{digest}")
            return None
        return fd, size

    def temp_path(self) -> Path:
        return self.tmp_dir / uuid.uuid4().hex

    def commit_blob(self, digest: Digest, temp: Path, size: int) -> Path:
        """Adopt a verified temp file: a rename, atomic on one file system."""
        final = self.blob_path(digest)
        final.parent.mkdir(parents=True, exist_ok=True)
        os.replace(temp, final)
        self._index.set(f"blob/{digest}", size)
        return final
