from __future__ import annotations

import hashlib
import os
from pathlib import Path

from fakes.cache import commit_bytes

from mirror.reference import Digest
from mirror.storage import Storage


def test_recover_after_a_crash(tmp_path: Path) -> None:
    storage = Storage(tmp_path)
    kept = commit_bytes(storage, b"kept")
    lost = commit_bytes(storage, b"file lost")
    storage.blob_path(lost).unlink()  # an index entry without its file
    orphan = Digest("sha256", hashlib.sha256(b"orphan").hexdigest())
    storage.blob_path(orphan).parent.mkdir(parents=True, exist_ok=True)
    storage.blob_path(orphan).write_bytes(b"orphan")  # renamed in, never recorded
    storage.temp_path().write_bytes(b"half a download")
    storage.close()

    storage = Storage(tmp_path)
    report = storage.recover()
    assert (
        report.blobs,
        report.temp_removed,
        report.orphan_files_removed,
        report.entries_dropped,
    ) == (1, 1, 1, 1)
    # The metrics' running totals count only what survived (no scan needed).
    assert (storage.usage().blobs, storage.usage().blob_bytes) == (1, len(b"kept"))
    assert [b.digest for b in storage.iter_blobs()] == [kept]
    assert not storage.blob_path(orphan).exists()
    assert list(storage.tmp_dir.iterdir()) == []
    again = storage.recover()  # idempotent: nothing left to repair
    assert (again.blobs, again.temp_removed, again.orphan_files_removed, again.entries_dropped) == (
        1,
        0,
        0,
        0,
    )
    storage.close()


def test_stats_and_verify(tmp_path: Path) -> None:
    clock_now = [1000.0]
    storage = Storage(tmp_path, clock=lambda: clock_now[0])
    a = commit_bytes(storage, b"a" * 100)
    clock_now[0] = 2000.0
    b = commit_bytes(storage, b"b" * 50)
    stats = storage.stats()
    assert (stats.blobs, stats.blob_bytes, stats.oldest, stats.newest) == (2, 150, 1000, 2000)

    with open(storage.blob_path(b), "r+b") as f:  # bit rot on disk
        f.write(b"X")
    results = {e.digest: storage.verify_blob(e) for e in storage.iter_blobs()}
    assert results == {a: True, b: False}
    assert [e.digest for e in storage.iter_blobs()] == [a]
    assert not storage.blob_path(b).exists()
    storage.close()


def test_open_blob_drops_an_entry_whose_file_vanished(tmp_path: Path) -> None:
    storage = Storage(tmp_path)
    d = commit_bytes(storage, b"x")
    os.unlink(storage.blob_path(d))
    assert storage.open_blob(d) is None
    assert storage.blob_size(d) is None
    storage.close()
