"""Start-up recovery time and eviction throughput for a cache of N blobs.

    .venv/bin/python bench/recovery.py [--entries 100000]

Builds a cache of N committed tiny blobs plus a few crash leftovers (temp files, orphan
files, entries without files), then times `DiskStore.recover()` as `mirror serve` runs it,
and an eviction round that must remove half of the blobs to get under `max_size`.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import tempfile
import time
from pathlib import Path

from mirror.diskstore import DiskStore
from mirror.eviction import Evictor
from mirror.reference import Digest


async def build(root: Path, entries: int) -> None:
    storage = DiskStore(root)
    for i in range(entries):
        data = i.to_bytes(8, "big")
        digest = Digest("sha256", hashlib.sha256(data).hexdigest())
        temp = storage.temp_path()
        temp.write_bytes(data)
        await storage.commit_blob(digest, temp, len(data))
    for i in range(10):  # leftovers of a kill -9
        storage.temp_path().write_bytes(b"partial")
        orphan = Digest("sha256", hashlib.sha256(f"orphan{i}".encode()).hexdigest())
        storage.blob_path(orphan).parent.mkdir(parents=True, exist_ok=True)
        storage.blob_path(orphan).write_bytes(b"orphan")
    storage.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--entries", type=int, default=100_000)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="recovery-") as tmp:
        root = Path(tmp)
        started = time.perf_counter()
        asyncio.run(build(root, args.entries))
        print(f"built {args.entries} entries in {time.perf_counter() - started:.1f} s")
        storage = DiskStore(root)
        report = storage.recover()
        again = storage.recover()
        evictor = Evictor(
            storage, None, content_ttl=7 * 86400, max_size=args.entries * 4, max_stale=7 * 86400
        )
        evicted = evictor.evict()
        storage.close()
    print("| entries | recovery s | removed temp | removed orphans | dropped entries |")
    print("|---:|---:|---:|---:|---:|")
    print(
        f"| {report.blobs} | {report.seconds:.2f} | {report.temp_removed} | "
        f"{report.orphan_files_removed} | {report.entries_dropped} |"
    )
    print(f"| {again.blobs} (clean cache) | {again.seconds:.2f} | 0 | 0 | 0 |")
    print()
    rate = evicted.size_blobs / evicted.seconds
    print(
        f"eviction round over {report.blobs} blobs: {evicted.size_blobs} evicted by size "
        f"in {evicted.seconds:.2f} s ({rate:,.0f} blobs/s)"
    )


if __name__ == "__main__":
    main()
