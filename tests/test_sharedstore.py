"""The shared store (mirror.sharedstore) on a real RGW and Redis: which tier answers,
L1 filled from the bucket only with verified bytes, and what /readyz says."""

from __future__ import annotations

import asyncio
import hashlib
import os
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import obstore
import pytest
from harness.redisserver import RedisServer
from harness.rgw import RadosGateway

from mirror.diskstore import DiskBlob, DiskStore
from mirror.filespan import as_bytes
from mirror.metrics import Metrics
from mirror.objects import Objects
from mirror.redisindex import RedisIndex
from mirror.reference import Digest
from mirror.sharedstore import ObjectBlob, SharedStore
from mirror.store import StoredManifest, TagEntry, TagKey

MiB = 1 << 20


def _digest(data: bytes) -> Digest:
    return Digest("sha256", hashlib.sha256(data).hexdigest())


@pytest.fixture
async def stores(
    rgw: RadosGateway, redis_server: RedisServer, tmp_path: Path
) -> AsyncIterator[tuple[SharedStore, SharedStore]]:
    """Two replicas' stores on one bucket and one Redis prefix."""
    bucket = f"s{uuid.uuid4().hex[:12]}"
    rgw.create_bucket(bucket)
    prefix = f"{bucket}:"
    made = []
    for name in ("a", "b"):
        metrics = Metrics()
        metrics.add_shared_store()
        objects = Objects.connect(
            bucket=bucket,
            prefix="",
            endpoint=rgw.endpoint,
            region="us-east-1",
            path_style=True,
            ca_bundle=None,
            access_key_id=rgw.credentials.access_key,
            secret_access_key=rgw.credentials.secret_key,
            connect_timeout=2,
            read_timeout=5,
            metrics=metrics,
        )
        index = RedisIndex(redis_server.url, metrics, prefix=prefix)
        made.append(SharedStore(DiskStore(tmp_path / name), objects, index, metrics))
    yield made[0], made[1]
    for store in made:
        await store.aclose()
        store.close()


async def _put_blob(store: SharedStore, data: bytes) -> Digest:
    """As a leading download does: write, publish, commit after verification."""
    digest = _digest(data)
    write = store.write_blob(digest)
    write.path.write_bytes(data)
    write.publish()
    write.wrote(len(data))
    await write.commit(len(data))
    return digest


async def _read(blob: DiskBlob | ObjectBlob, start: int = 0, end: int | None = None) -> bytes:
    body = blob.body(start, end)
    try:
        return b"".join([chunk async for chunk in as_bytes(body)])
    finally:
        await body.aclose()


async def test_a_blob_committed_by_one_replica_is_served_by_another_from_the_bucket_then_l1(
    stores: tuple[SharedStore, SharedStore],
) -> None:
    a, b = stores
    data = os.urandom(3 * MiB)
    digest = await _put_blob(a, data)
    assert isinstance(await a.open_blob(digest), DiskBlob)  # a's own L1
    shared = await b.open_blob(digest)
    assert isinstance(shared, ObjectBlob)
    assert await _read(shared) == data
    ranged = await b.open_blob(digest)
    assert isinstance(ranged, ObjectBlob)
    assert await _read(ranged, 100, 200) == data[100:200]
    while b._fills:  # the background copy into b's L1
        await asyncio.sleep(0.01)
    local = await b.open_blob(digest)
    assert isinstance(local, DiskBlob)
    assert await _read(local) == data
    await local.aclose()
    assert b._metrics.tier_hits.labels("shared")._value.get() == 2
    assert b._metrics.tier_hits.labels("l1")._value.get() == 1


async def test_damaged_bytes_in_the_bucket_never_reach_l1_and_are_forgotten(
    stores: tuple[SharedStore, SharedStore],
) -> None:
    a, b = stores
    data = os.urandom(MiB)
    digest = await _put_blob(a, data)
    await obstore.put_async(b.objects._store, b.objects.blob_key(digest), b"x" * len(data))
    shared = await b.open_blob(digest)
    assert isinstance(shared, ObjectBlob)
    await _read(shared, 0, 10)  # a range read in place starts the copy into L1
    while b._fills or b._dropping:
        await asyncio.sleep(0.01)
    assert await b.l1.blob_size(digest) is None
    assert await b.index.blob_size(digest) is None  # forgotten: fetched anew next time
    assert await b.open_blob(digest) is None


async def test_manifests_and_tags_are_shared(stores: tuple[SharedStore, SharedStore]) -> None:
    a, b = stores
    body = b'{"schemaVersion":2}'
    manifest = StoredManifest(_digest(body), "application/vnd.oci.image.manifest.v1+json", body)
    key = TagKey("docker.io", "library/x", "1", "a")
    await a.put_manifest(manifest)
    await a.put_tag(key, TagEntry(manifest.digest, manifest.media_type, 5.0))
    assert await b.get_manifest(manifest.digest) == manifest
    assert await b.get_tag(key) == TagEntry(manifest.digest, manifest.media_type, 5.0)
    assert await b.l1.get_manifest(manifest.digest) == manifest  # copied into L1


async def test_readiness_names_each_dependency(
    stores: tuple[SharedStore, SharedStore], redis_server: RedisServer
) -> None:
    a, _ = stores
    assert a.probe() == (True, "local: ok; redis: ok; s3: ok")
    redis_server.stop()
    try:
        usable, detail = a.probe()
    finally:
        redis_server.start()
    assert usable  # a replica without Redis still serves
    assert detail == "local: ok; redis: unreachable, working alone; s3: ok"


async def test_verify_rehashes_the_bucket_and_drops_what_fails(
    stores: tuple[SharedStore, SharedStore],
) -> None:
    a, b = stores
    good = await _put_blob(a, os.urandom(MiB))
    bad = await _put_blob(a, os.urandom(MiB))
    await obstore.put_async(a.objects._store, a.objects.blob_key(bad), b"y" * MiB)
    entries = {e.digest: e for e in b.scan().blobs}
    assert await asyncio.to_thread(b.verify_blob, entries[good])
    assert not await asyncio.to_thread(b.verify_blob, entries[bad])
    assert [e.digest for e in b.scan().blobs] == [good]
    assert await b.objects.blob_size(bad) is None


async def test_a_blob_committed_while_redis_was_down_is_found_and_indexed(
    stores: tuple[SharedStore, SharedStore], redis_server: RedisServer
) -> None:
    a, b = stores
    redis_server.stop()
    try:
        orphan = await _put_blob(a, os.urandom(MiB))  # in the bucket, not in the index
        unasked = await _put_blob(a, os.urandom(MiB))
    finally:
        redis_server.start()
    for store in (a, b):
        store.index.health.until = 0.0  # past the back-off
    assert [e.digest for e in b.scan().blobs] == []
    # Asked for: found by a HEAD, served, and indexed.
    found = await b.open_blob(orphan)
    assert isinstance(found, ObjectBlob)
    await found.aclose()
    assert await b.index.blob_size(orphan) == MiB
    # Never asked for: the lifecycle round's listing indexes it (then it counts
    # against max_size and is evicted like the rest).
    assert await asyncio.to_thread(b.reconcile_bucket) == 1
    assert {e.digest for e in b.scan().blobs} == {orphan, unasked}


async def test_the_catalog_lists_every_replicas_tags_and_its_own_without_redis(
    stores: tuple[SharedStore, SharedStore], redis_server: RedisServer
) -> None:
    a, b = stores
    digest = Digest("sha256", "1" * 64)
    accept = "application/vnd.oci.image.manifest.v1+json"
    await a.put_tag(TagKey("r.test", "team/app", "1", accept), TagEntry(digest, accept, 1.0))
    await b.put_tag(TagKey("r.test", "base", "1", accept), TagEntry(digest, accept, 1.0))
    assert a.repositories() == [("r.test", "base"), ("r.test", "team/app")]
    assert a.usage().tags == 1  # this replica's new tags move the catalog's change signal
    redis_server.stop()
    try:
        # Alone, a replica lists what it cached itself rather than failing.
        assert a.repositories() == [("r.test", "team/app")]
    finally:
        redis_server.start()
