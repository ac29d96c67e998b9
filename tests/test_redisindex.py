"""The shared index (mirror.redisindex) against a real Redis."""

from __future__ import annotations

import logging
import uuid
from collections.abc import AsyncIterator

import pytest
from harness.redisserver import RedisServer

from mirror.metrics import Metrics
from mirror.redisindex import IndexUnavailable, RedisIndex
from mirror.reference import Digest
from mirror.store import ImageKey, TagEntry, TagKey

D1 = Digest("sha256", "1" * 64)
D2 = Digest("sha256", "2" * 64)
MT = "application/vnd.oci.image.manifest.v1+json"


@pytest.fixture
async def index(redis_server: RedisServer) -> AsyncIterator[RedisIndex]:
    metrics = Metrics()
    metrics.add_shared_store()
    index = RedisIndex(redis_server.url, metrics, prefix=f"{uuid.uuid4().hex}:")
    yield index
    await index.aclose()


async def test_tags_blobs_and_manifests_round_trip_and_scan(index: RedisIndex) -> None:
    key = TagKey("docker.io", "library/alpine", "3.20", "application/vnd.oci.image.index.v1+json")
    assert await index.get_tag(key) is None
    await index.put_tag(key, TagEntry(D1, MT, 1000.5))
    assert await index.get_tag(key) == TagEntry(D1, MT, 1000.5)
    await index.add_blob(D2, 1234, 2000.0)
    assert await index.blob_size(D2) == 1234
    assert await index.blob_size(D1) is None
    await index.add_manifest(D1, MT, 2000.0)
    index.touch({D2: 2500.0}, {D1: 2600.0})
    index.touch({D2: 2400.0}, {})  # a replica flushing late never moves time back
    scan = index.scan()
    assert [(b.digest, b.size, b.stored_at, b.atime) for b in scan.blobs] == [
        (D2, 1234, 2000.0, 2500.0)
    ]
    assert scan.manifests == [(D1, 2600.0)]
    assert scan.tags == [(key, 1000.5)]
    index.drop_blobs([D2])
    index.drop_manifests([D1])
    index.drop_tags([key])
    assert index.scan() == type(scan)([], [], [])


async def test_a_lease_has_one_holder_who_alone_renews_and_releases(index: RedisIndex) -> None:
    assert await index.claim("lease:x", "a", 5) is None  # taken by a
    assert await index.claim("lease:x", "b", 5) == "a"
    assert not await index.renew("lease:x", "b", 5)
    assert await index.renew("lease:x", "a", 5)
    await index.release("lease:x", "b")  # not b's to release
    assert await index.claim("lease:x", "b", 5) == "a"
    await index.release("lease:x", "a")
    assert await index.claim("lease:x", "b", 5) is None
    assert index.try_lock("evict", "a", 5)
    assert not index.try_lock("evict", "b", 5)


async def test_a_redis_that_is_down_fails_fast_logs_once_and_recovers(
    redis_server: RedisServer, caplog: pytest.LogCaptureFixture
) -> None:
    metrics = Metrics()
    metrics.add_shared_store()
    index = RedisIndex(redis_server.url, metrics, prefix=f"{uuid.uuid4().hex}:")
    redis_server.stop()
    try:
        with caplog.at_level(logging.INFO):
            for _ in range(5):
                with pytest.raises(IndexUnavailable):
                    await index.blob_size(D1)
            assert not index.ping_sync()
            assert caplog.text.count("redis unavailable") == 1
            assert metrics.shared_degraded.labels("redis")._value.get() == 1
            assert metrics.redis_errors._value.get() >= 1
    finally:
        redis_server.start()
    index.health.until = 0.0  # the back-off is over
    with caplog.at_level(logging.INFO):
        assert index.ping_sync()
        assert await index.blob_size(D1) is None
    assert "redis reachable again" in caplog.text
    assert metrics.shared_degraded.labels("redis")._value.get() == 0
    await index.aclose()


async def test_pull_counts_add_up_across_replicas_and_pins_round_trip(
    index: RedisIndex, redis_server: RedisServer
) -> None:
    other = RedisIndex(redis_server.url, Metrics(), prefix=index._p)  # a second replica
    alpine = ImageKey("docker.io", "library/alpine", "3.20")
    by_digest = ImageKey("docker.io", "library/alpine", str(D2))
    index.add_pulls({alpine: (D1, 3, 100.0)})
    other.add_pulls({alpine: (D2, 2, 200.0), by_digest: (D2, 1, 150.0)})
    records = sorted(index.pulls(), key=lambda r: str(r.key))
    assert [(r.key, r.digest, r.count, r.last) for r in records] == [
        (alpine, D2, 5, 200.0),
        (by_digest, D2, 1, 150.0),
    ]
    index.drop_pulls([alpine])
    assert [r.key for r in other.pulls()] == [by_digest]
    assert index.pins() == {}
    index.set_pin(alpine, 300.5)
    assert other.pins() == {alpine: 300.5}
    other.set_pin(alpine, None)
    assert index.pins() == {}
    index.put_job("warm-a", '{"id": "warm-a"}')
    other.put_job("warm-b", '{"id": "warm-b"}')
    assert other.jobs() == {"warm-a": '{"id": "warm-a"}', "warm-b": '{"id": "warm-b"}'}
    other.drop_jobs(["warm-a"])
    other.drop_jobs([])
    assert index.jobs() == {"warm-b": '{"id": "warm-b"}'}
    key = TagKey("docker.io", "library/alpine", "3.20", "application/vnd.oci.image.index.v1+json")
    await index.put_tag(key, TagEntry(D1, MT, 1000.5))
    assert other.tag_entries() == [(key, TagEntry(D1, MT, 1000.5))]
    await other.aclose()
