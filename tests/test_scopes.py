"""Cached content by digest crosses no (upstream, repository) boundary unchecked
(mirror.scopes): over the HTTP API with the fake upstream, on the proxy directly, and
in each store (disk, Redis)."""

from __future__ import annotations

import asyncio
import hashlib
import json
import socket
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from conftest import MirrorFactory, get_when_cached, until
from fakes.clock import Clock
from fakes.server import serve
from fakes.upstream import FakeUpstream, Fault
from harness.redisserver import RedisServer

from mirror import scopes
from mirror.diskstore import DiskStore
from mirror.errors import RegistryError
from mirror.eviction import Evictor
from mirror.filespan import as_bytes
from mirror.freshness import Freshness
from mirror.mediatypes import AcceptSet
from mirror.metrics import Metrics
from mirror.objects import Objects
from mirror.proxy import Proxy
from mirror.redisindex import RedisIndex
from mirror.reference import Digest, Reference
from mirror.sharedstore import SharedStore
from mirror.store import StoredManifest
from mirror.upstream import Upstream, make_client

OCI = "application/vnd.oci.image.manifest.v1+json"
LAYER = b"a private layer " * 4096
ANY = AcceptSet.from_headers([])


def _d(data: bytes) -> Digest:
    return Digest("sha256", hashlib.sha256(data).hexdigest())


def _heads(upstream: FakeUpstream) -> int:
    return sum(r.method == "HEAD" for r in upstream.requests)


def _gets(upstream: FakeUpstream) -> int:
    return sum(r.method == "GET" for r in upstream.requests)


# -- over the HTTP API -------------------------------------------------------------------


async def test_a_known_pair_costs_nothing_an_unknown_one_one_head_then_nothing(
    fake: tuple[FakeUpstream, str], mirror: MirrorFactory
) -> None:
    upstream, url = fake
    digest = upstream.add_blob(LAYER)
    async with mirror(url) as m, httpx.AsyncClient(base_url=m.url) as c:
        await get_when_cached(c, f"/v2/team/app/blobs/{digest}")  # fetched for team/app
        before = len(upstream.requests)
        again = await c.get(f"/v2/team/app/blobs/{digest}")
        assert (again.status_code, again.content) == (200, LAYER)
        assert len(upstream.requests) == before  # the recorded pair: no upstream request
        for _ in range(2):
            other = await c.get(f"/v2/team/other/blobs/{digest}")
            assert (other.status_code, other.headers["x-cache"]) == (200, "HIT")
            assert other.content == LAYER
        head = await c.head(f"/v2/team/other/blobs/{digest}")
        assert head.status_code == 200
        # One HEAD for the new pair, then it is remembered; the bytes never again.
        assert _heads(upstream) == 1
        assert upstream.count("HEAD", f"/v2/team/other/blobs/{digest}") == 1
        assert _gets(upstream) == 1
        assert m.metric("mirror_scope_checks_total", upstream=_name(m), result="confirmed") == 1


async def test_a_refusing_upstream_gets_a_404_without_bytes_and_nothing_is_recorded(
    fake: tuple[FakeUpstream, str], mirror: MirrorFactory
) -> None:
    upstream, url = fake
    digest = upstream.add_blob(LAYER)
    manifest = upstream.add_manifest(OCI, {"mediaType": OCI, "layers": []}, tag="v1")
    upstream.hidden_repos.add("private/app")
    async with mirror(url) as m, httpx.AsyncClient(base_url=m.url) as c:
        await get_when_cached(c, f"/v2/team/app/blobs/{digest}")
        assert (await c.get("/v2/team/app/manifests/v1")).status_code == 200
        for _ in range(2):  # refused, not remembered: asked again
            blob = await c.get(f"/v2/private/app/blobs/{digest}")
            assert blob.status_code == 404
            assert blob.json()["errors"][0]["code"] == "BLOB_UNKNOWN"
            assert LAYER[:64] not in blob.content
            head = await c.head(f"/v2/private/app/blobs/{digest}")
            assert (head.status_code, head.content) == (404, b"")
            by_digest = await c.get(f"/v2/private/app/manifests/{manifest}")
            assert by_digest.status_code == 404
            assert by_digest.json()["errors"][0]["code"] == "MANIFEST_UNKNOWN"
        assert upstream.count("HEAD", f"/v2/private/app/blobs/{digest}") == 4
        assert upstream.count("HEAD", f"/v2/private/app/manifests/{manifest}") == 2
        assert not any(r.method == "GET" and "/private/" in r.path for r in upstream.requests)
        store = m.app.state.components.store
        assert not await store.has_scope(Digest.parse(digest), _name(m), "private/app")
        assert m.metric("mirror_scope_checks_total", upstream=_name(m), result="refused") == 6


def _name(m: Any) -> str:
    name: str = m.app.state.components.settings.default_upstream_name()
    return name


async def test_an_upstream_answering_5xx_fails_closed(
    fake: tuple[FakeUpstream, str], mirror: MirrorFactory
) -> None:
    upstream, url = fake
    digest = upstream.add_blob(LAYER)
    async with mirror(url) as m, httpx.AsyncClient(base_url=m.url) as c:
        await get_when_cached(c, f"/v2/team/app/blobs/{digest}")
        upstream.faults[digest] = Fault(status=503)
        resp = await c.get(f"/v2/team/other/blobs/{digest}")
        assert (resp.status_code, resp.json()["errors"][0]["code"]) == (502, "UNAVAILABLE")
        assert LAYER[:64] not in resp.content
        # Still served to the pair that fetched it, with no upstream request.
        assert (await c.get(f"/v2/team/app/blobs/{digest}")).content == LAYER
        assert m.metric("mirror_scope_checks_total", upstream=_name(m), result="error") == 1


async def test_an_unreachable_upstream_fails_closed(mirror: MirrorFactory, tmp_path: Path) -> None:
    upstream = FakeUpstream()
    digest = upstream.add_blob(LAYER)
    async with serve(upstream) as url, mirror(url) as m, httpx.AsyncClient(base_url=m.url) as c:
        await get_when_cached(c, f"/v2/team/app/blobs/{digest}")
        manifest = upstream.add_manifest(OCI, {"mediaType": OCI, "layers": []}, tag="v1")
        assert (await c.get("/v2/team/app/manifests/v1")).status_code == 200
    async with mirror(url) as m, httpx.AsyncClient(base_url=m.url) as c:  # same cache
        resp = await c.get(f"/v2/team/other/blobs/{digest}")
        assert resp.status_code in (502, 504)
        assert resp.json()["errors"][0]["code"] == "UNAVAILABLE"
        resp = await c.get(f"/v2/team/other/manifests/{manifest}")
        assert resp.status_code in (502, 504)
        # What was recorded survived the restart: served with the upstream down.
        assert (await c.get(f"/v2/team/app/blobs/{digest}")).content == LAYER
        assert (await c.get(f"/v2/team/app/manifests/{manifest}")).status_code == 200
        assert m.metric("mirror_scope_checks_total", upstream=_name(m), result="error") == 2


# -- on the proxy ------------------------------------------------------------------------


@pytest.fixture
async def proxy(
    fake: tuple[FakeUpstream, str], tmp_path: Path
) -> AsyncIterator[tuple[Proxy, FakeUpstream, DiskStore]]:
    upstream, url = fake
    store = DiskStore(tmp_path, Clock())
    client = make_client(5.0, 5.0)
    made = Proxy(
        store,
        Upstream(url, client, Metrics()),
        Metrics(),
        freshness=Freshness(default_ttl=60, max_stale=3600),
        manifest_max_bytes=1 << 20,
    )
    yield made, upstream, store
    await made.aclose()
    await client.aclose()
    store.close()


async def _body(blob: Any) -> bytes:
    assert blob.body is not None
    try:
        return b"".join([chunk async for chunk in as_bytes(blob.body)])
    finally:
        await blob.body.aclose()


async def test_joining_another_repositorys_download_is_checked_too(
    proxy: tuple[Proxy, FakeUpstream, DiskStore],
) -> None:
    p, upstream, _ = proxy
    digest = Digest.parse(upstream.add_blob(LAYER))
    upstream.faults[str(digest)] = Fault(chunk=4096, delay=0.01)  # ~0.16 s of download
    upstream.hidden_repos.add("private/app")
    first = await p.blob("team/app", digest, None, head=False)
    assert p.downloads.active(digest) is not None
    with pytest.raises(RegistryError) as refused:
        await p.blob("private/app", digest, None, head=False)
    assert (refused.value.code, refused.value.status) == ("BLOB_UNKNOWN", 404)
    joined = await p.blob("team/other", digest, None, head=False)  # a HEAD, then joins
    assert await _body(joined) == LAYER
    assert await _body(first) == LAYER
    assert upstream.count("GET", f"/blobs/{digest}") == 1
    assert upstream.count("HEAD", f"/v2/team/other/blobs/{digest}") == 1


async def test_concurrent_checks_of_one_pair_share_one_head(
    proxy: tuple[Proxy, FakeUpstream, DiskStore],
) -> None:
    p, upstream, store = proxy
    digest = Digest.parse(upstream.add_blob(LAYER))
    await _body(await p.blob("team/app", digest, None, head=False))
    await until(lambda: p.downloads.active(digest) is None, "the commit")
    blobs = await asyncio.gather(
        *(p.blob("team/other", digest, None, head=True) for _ in range(10))
    )
    assert {b.size for b in blobs} == {len(LAYER)}
    assert upstream.count("HEAD", f"/v2/team/other/blobs/{digest}") == 1
    assert await store.has_scope(digest, p.name, "team/other")


async def test_a_pulled_image_records_what_it_references_so_a_pull_asks_nothing_more(
    proxy: tuple[Proxy, FakeUpstream, DiskStore],
) -> None:
    p, upstream, store = proxy
    config, layer = b'{"architecture":"amd64"}', LAYER
    for data in (config, layer):
        upstream.add_blob(data)
    foreign = _d(b"a non-distributable layer")
    subject = _d(b"some other manifest")
    image = {
        "mediaType": OCI,
        "config": {"mediaType": "c", "digest": str(_d(config)), "size": len(config)},
        "layers": [
            {"mediaType": "l", "digest": str(_d(layer)), "size": len(layer)},
            {"mediaType": "l", "digest": str(foreign), "size": 1, "urls": ["http://x/"]},
        ],
        "subject": {"mediaType": OCI, "digest": str(subject), "size": 1},
    }
    upstream.add_manifest(OCI, image, tag="v1")
    # The blobs are cached already, for another repository (a shared base image).
    for data in (config, layer):
        await _body(await p.blob("base/image", _d(data), None, head=False))
    await until(lambda: not any(p.downloads.active(_d(d)) for d in (config, layer)), "commits")
    before = len(upstream.requests)
    manifest = await p.manifest("team/app", Reference(tag="v1"), ANY)
    for data in (config, layer):
        assert await _body(await p.blob("team/app", _d(data), None, head=False)) == data
    assert [r.method for r in upstream.requests[before:]] == ["GET"]  # the manifest only
    assert await store.has_scope(manifest.stored.digest, p.name, "team/app")
    # A subject, or a layer the registry never checked (`urls`), proves nothing.
    assert not await store.has_scope(subject, p.name, "team/app")
    assert not await store.has_scope(foreign, p.name, "team/app")


async def test_a_manifest_by_digest_for_an_unknown_pair_is_asked_once(
    proxy: tuple[Proxy, FakeUpstream, DiskStore],
) -> None:
    p, upstream, _ = proxy
    digest = upstream.add_manifest(OCI, {"mediaType": OCI, "layers": []}, tag="v1")
    ref = Reference(digest=Digest.parse(digest))
    await p.manifest("team/app", Reference(tag="v1"), ANY)
    assert (await p.manifest("team/app", ref, ANY)).result == "hit"
    for _ in range(2):
        assert (await p.manifest("team/other", ref, ANY)).result == "hit"
    assert [(r.method, r.path) for r in upstream.requests if r.method == "HEAD"] == [
        ("HEAD", f"/v2/team/other/manifests/{digest}")
    ]


# -- the stores ------------------------------------------------------------------------


async def test_the_disk_store_keeps_scopes_until_their_content_goes(tmp_path: Path) -> None:
    clock = Clock()
    store = DiskStore(tmp_path, clock)
    blob, unpulled, manifest = _d(b"blob"), _d(b"never pulled"), _d(b"manifest")
    try:
        write = store.write_blob(blob)
        write.path.write_bytes(b"blob")
        await write.commit(4)
        await store.put_manifest(StoredManifest(manifest, OCI, b"{}"))
        await store.add_scopes([blob, unpulled, manifest], "u", "team/app")
        assert await store.has_scope(blob, "u", "team/app")
        assert not await store.has_scope(blob, "u", "team/other")
        assert not await store.has_scope(blob, "v", "team/app")
        store.drop_blobs([blob])
        assert not await store.has_scope(blob, "u", "team/app")
        evictor = Evictor(store, None, content_ttl=100, max_size=None, max_stale=100, clock=clock)
        evictor.evict()  # what no content holds survives while it may still be pulled
        assert await store.has_scope(unpulled, "u", "team/app")
        clock.now += 50
        store.touch_manifest(manifest)
        clock.now += 60
        evictor.evict()
        assert not await store.has_scope(unpulled, "u", "team/app")
        assert await store.has_scope(manifest, "u", "team/app")  # still cached
        # A base layer in thousands of repositories keeps the most recent pairs.
        for n in range(scopes_max() + 10):
            clock.now += 1
            await store.add_scopes([blob], "u", f"repo{n}")
        assert not await store.has_scope(blob, "u", "repo0")
        assert await store.has_scope(blob, "u", f"repo{scopes_max() + 9}")
    finally:
        store.close()


def scopes_max() -> int:
    from mirror.diskindex import MAX_SCOPES

    return MAX_SCOPES


def _objects(metrics: Metrics) -> Objects:
    # Never reached by these tests: scopes live in Redis alone.
    return Objects.connect(
        bucket="unused",
        prefix="",
        endpoint="http://127.0.0.1:9",
        region="us-east-1",
        path_style=True,
        ca_bundle=None,
        access_key_id="x",
        secret_access_key="y",
        connect_timeout=1,
        read_timeout=1,
        metrics=metrics,
    )


async def test_replicas_share_scopes_in_redis_and_drop_them_with_the_content(
    redis_server: RedisServer, tmp_path: Path
) -> None:
    prefix = f"{uuid.uuid4().hex}:"
    made = []
    for name in ("a", "b"):
        metrics = Metrics()
        index = RedisIndex(redis_server.url, metrics, prefix=prefix)
        made.append(SharedStore(DiskStore(tmp_path / name), _objects(metrics), index, metrics))
    a, b = made
    blob, unpulled = _d(b"blob"), _d(b"never pulled")
    try:
        await a.add_scopes([blob, unpulled], "u", "team/app")
        assert await b.has_scope(blob, "u", "team/app")  # the other replica knows
        assert not await b.has_scope(blob, "u", "team/other")
        assert a.drop_scopes({unpulled}, before=1e12) == 1  # nothing holds blob
        assert not await b.has_scope(blob, "u", "team/app")
        assert await b.has_scope(unpulled, "u", "team/app")
        b.index.drop_blobs([unpulled])
        assert not await a.has_scope(unpulled, "u", "team/app")
    finally:
        for store in made:
            await store.aclose()
            store.close()


async def test_without_redis_only_this_processs_confirmations_count(tmp_path: Path) -> None:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()  # nothing listens there
    metrics = Metrics()
    index = RedisIndex(f"redis://127.0.0.1:{port}/0", metrics)
    store = SharedStore(DiskStore(tmp_path), _objects(metrics), index, metrics)
    digest = _d(b"blob")
    try:
        await store.add_scopes([digest], "u", "team/app")  # lost, but no error
        assert not await store.has_scope(digest, "u", "team/app")
        memory = scopes.Scopes(store, "u", metrics)
        await memory.record([digest], "team/app")
        assert await memory.known(digest, "team/app")
        assert not await memory.known(digest, "team/other")
    finally:
        await store.aclose()
        store.close()


async def test_a_tier_is_asked_with_ns(mirror: MirrorFactory) -> None:
    """A mirror tier in front of the registry answers the HEAD for it."""
    registry, tier = FakeUpstream(), FakeUpstream()
    digest = registry.add_blob(LAYER)
    tier.add_blob(LAYER)
    async with serve(registry) as r_url, serve(tier) as t_url:
        upstreams = [
            {"name": "reg.test", "url": r_url, "mirrors": [{"name": "central", "url": t_url}]}
        ]
        async with (
            mirror(None, upstreams=json.loads(json.dumps(upstreams))) as m,
            httpx.AsyncClient(base_url=m.url) as c,
        ):
            await get_when_cached(c, f"/v2/team/app/blobs/{digest}")
            assert (await c.get(f"/v2/team/other/blobs/{digest}")).content == LAYER
    assert tier.count("HEAD", f"/v2/team/other/blobs/{digest}") == 1
    assert all("ns=reg.test" in r.query for r in tier.requests)
    assert registry.count("HEAD", "/blobs/") == 0
