"""`Proxy` over a disk store in a temporary directory and the fake upstream: no mirror
server, no routes, just the store-over-stores logic."""

from __future__ import annotations

import hashlib
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import pytest
from conftest import until
from fakes.clock import Clock
from fakes.upstream import FakeUpstream, Fault

from mirror.diskstore import DiskStore
from mirror.errors import RegistryError, UpstreamError
from mirror.filespan import as_bytes
from mirror.freshness import Freshness
from mirror.mediatypes import AcceptSet
from mirror.metrics import Metrics
from mirror.policy import RepoPolicy
from mirror.proxy import Blob, Proxy
from mirror.ranges import parse_range
from mirror.reference import Digest, Reference
from mirror.store import StoredManifest, TagEntry, TagKey
from mirror.upstream import Upstream, make_client

OCI = "application/vnd.oci.image.manifest.v1+json"
INDEX = "application/vnd.oci.image.index.v1+json"
ANY = AcceptSet.from_headers([])
DATA = bytes(range(256)) * 4096  # 1 MiB
T = TypeVar("T")


@dataclass
class Setup:
    proxy: Proxy
    store: DiskStore
    upstream: FakeUpstream
    clock: Clock


@pytest.fixture
async def setup(fake: tuple[FakeUpstream, str], tmp_path: Path) -> AsyncIterator[Setup]:
    upstream, url = fake
    clock = Clock()
    store = DiskStore(tmp_path, clock)
    client = make_client(5.0, 5.0)
    proxy = Proxy(
        store,
        Upstream(url, client, Metrics()),
        Metrics(),
        freshness=Freshness(default_ttl=60, max_stale=3600),
        policy=RepoPolicy(deny=("secret/*",)),
        manifest_max_bytes=1 << 20,
        clock=clock,
    )
    yield Setup(proxy, store, upstream, clock)
    await proxy.aclose()
    await client.aclose()
    store.close()


async def _read(blob: Blob) -> bytes:
    assert blob.body is not None
    try:
        return b"".join([chunk async for chunk in as_bytes(blob.body)])
    finally:
        await blob.body.aclose()


async def test_a_tag_is_fetched_once_then_served_then_revalidated_with_a_head(
    setup: Setup,
) -> None:
    digest = setup.upstream.add_manifest(OCI, {"mediaType": OCI, "n": 1}, tag="v1")
    ref = Reference(tag="v1")
    results = [(await setup.proxy.manifest("app", ref, ANY)).result for _ in range(2)]
    assert results == ["miss", "hit"]
    setup.clock.now += 61  # past the tag TTL
    again = await setup.proxy.manifest("app", ref, ANY)
    assert (again.result, str(again.stored.digest)) == ("revalidated", digest)
    assert setup.upstream.count("GET", "/manifests/v1") == 1
    assert setup.upstream.count("HEAD", "/manifests/v1") == 1


async def test_a_moved_tag_is_fetched_and_a_failing_upstream_serves_it_stale(
    setup: Setup,
) -> None:
    setup.upstream.add_manifest(OCI, {"mediaType": OCI, "n": 1}, tag="v1")
    ref = Reference(tag="v1")
    await setup.proxy.manifest("app", ref, ANY)
    moved = setup.upstream.add_manifest(OCI, {"mediaType": OCI, "n": 2}, tag="v1")
    setup.clock.now += 61
    fresh = await setup.proxy.manifest("app", ref, ANY)
    assert (fresh.result, str(fresh.stored.digest)) == ("miss", moved)
    setup.upstream.faults["v1"] = Fault(status=503)
    setup.clock.now += 61
    stale = await setup.proxy.manifest("app", ref, ANY)
    assert (stale.result, str(stale.stored.digest)) == ("stale", moved)
    setup.clock.now += 3600  # past max_stale: the upstream's error goes to the client
    with pytest.raises(UpstreamError) as err:
        await setup.proxy.manifest("app", ref, ANY)
    assert err.value.status == 502


async def test_content_by_digest_is_served_from_the_store_without_upstream(
    setup: Setup,
) -> None:
    digest = setup.upstream.add_manifest(OCI, {"mediaType": OCI}, tag="v1")
    await setup.proxy.manifest("app", Reference(tag="v1"), ANY)
    by_digest = await setup.proxy.manifest("app", Reference(digest=Digest.parse(digest)), ANY)
    assert by_digest.result == "hit"
    assert hashlib.sha256(by_digest.stored.body).hexdigest() == digest.removeprefix("sha256:")
    assert len(setup.upstream.requests) == 1
    # Another repository is asked whether it holds the digest (tests/test_scopes.py).
    other = await setup.proxy.manifest("other", Reference(digest=Digest.parse(digest)), ANY)
    assert other.result == "hit"
    assert [r.method for r in setup.upstream.requests] == ["GET", "HEAD"]


async def test_a_client_that_cannot_read_an_index_never_gets_one(setup: Setup) -> None:
    setup.upstream.add_manifest(INDEX, {"mediaType": INDEX, "manifests": []}, tag="multi")
    schema2_only = AcceptSet.from_headers(["application/vnd.docker.distribution.manifest.v2+json"])
    with pytest.raises(RegistryError) as err:
        await setup.proxy.manifest("app", Reference(tag="multi"), schema2_only)
    assert err.value.code == "MANIFEST_UNKNOWN"


async def test_a_blob_miss_streams_verified_bytes_then_the_store_answers(
    setup: Setup,
) -> None:
    digest = Digest.parse(setup.upstream.add_blob(DATA))
    cold = await setup.proxy.blob("app", digest, None, head=False)
    assert (cold.source, cold.size) == ("upstream", len(DATA))
    download = setup.proxy.downloads.active(digest)
    assert await _read(cold) == DATA
    assert download is not None
    await until(lambda: download.state == "committed", "the commit")
    assert await setup.store.blob_size(digest) == len(DATA)
    warm = await setup.proxy.blob("other/repo", digest, parse_range("bytes=10-19"), head=False)
    assert warm.source == "cache" and warm.range is not None
    assert warm.range.content_range(len(DATA)) == f"bytes 10-19/{len(DATA)}"
    assert await _read(warm) == DATA[10:20]
    assert setup.upstream.count("GET", f"/blobs/{digest}") == 1


async def test_a_head_miss_asks_for_the_size_and_starts_no_download(setup: Setup) -> None:
    digest = Digest.parse(setup.upstream.add_blob(DATA))
    head = await setup.proxy.blob("app", digest, None, head=True)
    assert (head.size, head.body, head.source) == (len(DATA), None, "upstream")
    assert setup.proxy.downloads.active(digest) is None
    assert setup.upstream.count("GET", f"/blobs/{digest}") == 0
    assert setup.upstream.count("HEAD", f"/blobs/{digest}") == 1


async def test_a_wrong_digest_cuts_the_reader_and_stores_nothing(setup: Setup) -> None:
    from mirror.errors import AbortResponse

    digest = Digest.parse(setup.upstream.add_blob(DATA))
    setup.upstream.faults[str(digest)] = Fault(wrong_bytes=True)
    blob = await setup.proxy.blob("app", digest, None, head=False)
    with pytest.raises(AbortResponse):
        await _read(blob)
    assert await setup.store.blob_size(digest) is None


async def test_a_denied_repository_costs_no_upstream_request(setup: Setup) -> None:
    with pytest.raises(RegistryError) as err:
        await setup.proxy.manifest("secret/app", Reference(tag="v1"), ANY)
    assert err.value.code == "DENIED"
    assert setup.upstream.requests == []


async def test_official_docker_hub_names_are_not_rewritten_elsewhere(setup: Setup) -> None:
    body, link = await setup.proxy.tags("alpine", 2, None)
    assert json.loads(body)["name"] == "alpine"  # not library/alpine: no Hub here
    assert link is not None
    assert setup.upstream.requests[0].query == "n=2"


async def test_a_background_revalidation_another_replica_did_counts_a_moved_tag_as_moved(
    fake: tuple[FakeUpstream, str], tmp_path: Path
) -> None:
    """With replicas, the background revalidation may be done by another one (its
    entry is read back): the metric says what happened to the tag, not who asked."""
    upstream, url = fake
    upstream.add_manifest(OCI, {"mediaType": OCI, "n": 1}, tag="v1")
    moved = StoredManifest(Digest("sha256", hashlib.sha256(b"{}").hexdigest()), OCI, b"{}")
    clock = Clock()
    store = DiskStore(tmp_path, clock)
    client = make_client(5.0, 5.0)
    metrics = Metrics()
    metrics.add_upstream("hub")
    metrics.add_registry("hub")

    class ElsewhereCluster:
        """Another replica holds the lease, and its revalidation found the tag moved."""

        async def once(
            self,
            name: str,
            work: Callable[[], Awaitable[T]],
            done_elsewhere: Callable[[], Awaitable[T | None]],
            wait: float,
        ) -> T:
            if not name.startswith("reval:"):
                return await work()
            await store.put_manifest(moved)
            key = TagKey(proxy.name, "app", "v1", ANY.cache_key)
            await store.put_tag(key, TagEntry(moved.digest, OCI, clock()))
            found = await done_elsewhere()
            assert found is not None
            return found

    proxy = Proxy(
        store,
        Upstream(url, client, metrics, name="hub"),
        metrics,
        freshness=Freshness(default_ttl=60, max_stale=3600, stale_while_revalidate=600),
        manifest_max_bytes=1 << 20,
        clock=clock,
        cluster=ElsewhereCluster(),
    )
    try:
        assert (await proxy.manifest("app", Reference(tag="v1"), ANY)).result == "miss"
        clock.now += 61
        assert (await proxy.manifest("app", Reference(tag="v1"), ANY)).result == "updating"

        def counted(result: str) -> float | None:
            return metrics.registry.get_sample_value(
                "mirror_background_revalidations_total",
                {"upstream": proxy.name, "result": result},
            )

        await until(lambda: bool(counted("moved") or counted("unchanged")), "the revalidation")
        assert (counted("moved"), counted("unchanged")) == (1, 0)
    finally:
        await proxy.aclose()
        await client.aclose()
        store.close()
