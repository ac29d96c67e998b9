from __future__ import annotations

import hashlib
import os
from pathlib import Path

from fakes.cache import commit_bytes

from mirror.diskstore import DiskStore
from mirror.reference import Digest
from mirror.store import ImageKey, Stats


async def test_recover_after_a_crash(tmp_path: Path) -> None:
    store = DiskStore(tmp_path)
    kept = await commit_bytes(store, b"kept")
    lost = await commit_bytes(store, b"file lost")
    store.blob_path(lost).unlink()  # an index entry without its file
    orphan = Digest("sha256", hashlib.sha256(b"orphan").hexdigest())
    store.blob_path(orphan).parent.mkdir(parents=True, exist_ok=True)
    store.blob_path(orphan).write_bytes(b"orphan")  # renamed in, never recorded
    store.temp_path().write_bytes(b"half a download")
    store.close()

    store = DiskStore(tmp_path)
    report = store.recover()
    assert (
        report.blobs,
        report.temp_removed,
        report.orphan_files_removed,
        report.entries_dropped,
    ) == (1, 1, 1, 1)
    # The metrics' running totals count only what survived (no scan needed).
    assert (store.usage().blobs, store.usage().blob_bytes) == (1, len(b"kept"))
    assert [b.digest for b in store.scan().blobs] == [kept]
    assert not store.blob_path(orphan).exists()
    assert list(store.tmp_dir.iterdir()) == []
    again = store.recover()  # idempotent: nothing left to repair
    assert (again.blobs, again.temp_removed, again.orphan_files_removed, again.entries_dropped) == (
        1,
        0,
        0,
        0,
    )
    store.close()


async def test_stats_and_verify(tmp_path: Path) -> None:
    clock_now = [1000.0]
    store = DiskStore(tmp_path, clock=lambda: clock_now[0])
    a = await commit_bytes(store, b"a" * 100)
    clock_now[0] = 2000.0
    b = await commit_bytes(store, b"b" * 50)
    stats = Stats.of(store.scan())
    assert (stats.blobs, stats.blob_bytes, stats.oldest, stats.newest) == (2, 150, 1000, 2000)

    with open(store.blob_path(b), "r+b") as f:  # bit rot on disk
        f.write(b"X")
    results = {e.digest: store.verify_blob(e) for e in store.scan().blobs}
    assert results == {a: True, b: False}
    assert [e.digest for e in store.scan().blobs] == [a]
    assert not store.blob_path(b).exists()
    store.close()


async def test_open_blob_drops_an_entry_whose_file_vanished(tmp_path: Path) -> None:
    store = DiskStore(tmp_path)
    d = await commit_bytes(store, b"x")
    os.unlink(store.blob_path(d))
    assert await store.open_blob(d) is None
    assert await store.blob_size(d) is None
    store.close()


async def test_pulls_from_two_processes_sharing_the_index_add_up(tmp_path: Path) -> None:
    one, two = DiskStore(tmp_path), DiskStore(tmp_path)  # as two workers would
    key = ImageKey("docker.io", "library/alpine", "3.20")
    d1, d2 = Digest("sha256", "1" * 64), Digest("sha256", "2" * 64)
    one.record_pull(key, d1)
    one.record_pull(key, d1)
    two.record_pull(key, d2)
    assert one.pulls() == []  # counted in memory until a flush
    one.flush_access()
    two.flush_access()
    [record] = one.pulls()
    assert (record.key, record.count, record.digest) == (key, 3, d2)
    two.set_pin(key, 5.0)
    assert one.pins() == {key: 5.0}
    one.drop_pulls([key])
    assert two.pulls() == []
    # Job records: written by the worker running the job, read by any.
    one.put_job("warm-a", '{"id": "warm-a"}')
    two.put_job("warm-b", '{"id": "warm-b"}')
    one.put_job("warm-a", '{"id": "warm-a", "state": "done"}')
    assert two.jobs() == {
        "warm-a": '{"id": "warm-a", "state": "done"}',
        "warm-b": '{"id": "warm-b"}',
    }
    two.drop_jobs(["warm-a", "warm-gone"])
    assert list(one.jobs()) == ["warm-b"]
    one.close()
    two.close()
