"""What the admin API's inventory costs on a large cache: listing, one purge, and what an
eviction round pays for pins.

    python -m bench.inventory [--images 2000]

Builds a disk cache of N single-platform images (a config blob and 3 layers each,
one base layer shared by all), then times `Inventory.images()`, `purge()` of one tag,
and `refresh_protected()` with 1% of the images pinned, against `store.scan()` (what
every eviction round already pays) measured in the same run.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import tempfile
import time
from pathlib import Path

from mirror.diskstore import DiskStore
from mirror.inventory import Inventory, Target
from mirror.reference import Digest
from mirror.store import ImageKey, StoredManifest, TagEntry, TagKey

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
ACCEPT = "application/vnd.oci.image.manifest.v1+json"


async def _blob(store: DiskStore, data: bytes) -> Digest:
    digest = Digest("sha256", hashlib.sha256(data).hexdigest())
    temp = store.temp_path()
    temp.write_bytes(data)
    await store.commit_blob(digest, temp, len(data))
    return digest


async def build(store: DiskStore, n: int) -> None:
    base = await _blob(store, b"base" * 256)
    for i in range(n):
        config = json.dumps({"os": "linux", "architecture": "amd64", "n": i}).encode()
        c = await _blob(store, config)
        layers = [
            base,
            await _blob(store, f"a{i}".encode() * 64),
            await _blob(store, f"b{i}".encode() * 64),
        ]
        manifest = {
            "schemaVersion": 2,
            "mediaType": OCI_MANIFEST,
            "config": {"digest": str(c), "size": len(config)},
            "layers": [{"digest": str(d), "size": 100} for d in layers],
        }
        body = json.dumps(manifest).encode()
        digest = Digest("sha256", hashlib.sha256(body).hexdigest())
        await store.put_manifest(StoredManifest(digest, OCI_MANIFEST, body))
        repo = f"team{i % 50}/app{i}"
        await store.put_tag(
            TagKey("docker.io", repo, "1", ACCEPT), TagEntry(digest, OCI_MANIFEST, time.time())
        )
        store.record_pull(ImageKey("docker.io", repo, "1"), digest)
    store.flush_access()


def timed(label: str, seconds: float, reference: float) -> None:
    print(f"{label:<40} {seconds * 1000:8.1f} ms  {seconds / reference:6.1f}x scan")


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--images", type=int, default=2000)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        store = DiskStore(Path(tmp))
        await build(store, args.images)
        inventory = Inventory(store)
        started = time.perf_counter()
        store.scan()
        scan = time.perf_counter() - started
        print(f"{args.images} images, {len(store.scan().blobs)} blobs")
        timed("store.scan() (every eviction round)", scan, scan)
        for label in ("images() first (reads configs)", "images() again (platforms known)"):
            started = time.perf_counter()
            listed = await inventory.images()
            timed(label, time.perf_counter() - started, scan)
        assert len(listed) == args.images
        started = time.perf_counter()
        await inventory.refresh_protected()
        timed("refresh_protected(), no pins", time.perf_counter() - started, scan)
        for image in listed[: max(1, args.images // 100)]:
            store.set_pin(image.key, time.time())
        started = time.perf_counter()
        protected = await inventory.refresh_protected()
        timed(
            f"refresh_protected(), {args.images // 100} pins", time.perf_counter() - started, scan
        )
        assert protected.digests
        started = time.perf_counter()
        purged = await inventory.purge(Target("docker.io", listed[-1].key.repo, "1"))
        timed("purge() of one tag", time.perf_counter() - started, scan)
        assert (purged.blobs, purged.blobs_kept) == (3, 1)
        store.close()


if __name__ == "__main__":
    asyncio.run(main())
