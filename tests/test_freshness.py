"""Tag TTL, HEAD revalidation and stale-if-error, with an injected clock (no sleeps)."""

from __future__ import annotations

import httpx
import pytest
from conftest import MirrorFactory
from fakes.clock import Clock
from fakes.upstream import FakeUpstream, Fault

from mirror.freshness import Freshness, TTLRule
from mirror.mediatypes import DOCKER_MANIFEST_V2

MANIFEST = {"schemaVersion": 2, "mediaType": DOCKER_MANIFEST_V2, "layers": []}
ACCEPT = {"Accept": DOCKER_MANIFEST_V2}


@pytest.mark.parametrize(
    ("repo", "tag", "ttl"),
    [
        ("library/alpine", "latest", 60),
        ("team/app", "latest", 60),
        ("library/alpine", "3.20.1", 86400),
        ("library/alpine", "edge", 300),
    ],
)
def test_first_matching_rule_wins(repo: str, tag: str, ttl: float) -> None:
    rules = (TTLRule("*:latest", 60), TTLRule("*:[0-9]*.[0-9]*", 86400))
    assert Freshness(300, 7 * 86400, rules).ttl(repo, tag) == ttl


async def test_within_ttl_none_after_ttl_one_head_moved_tag_fetched(
    fake: tuple[FakeUpstream, str], mirror: MirrorFactory
) -> None:
    upstream, url = fake
    first = upstream.add_manifest(DOCKER_MANIFEST_V2, MANIFEST, tag="v1")
    clock = Clock()
    async with mirror(url, clock=clock, tag_ttl="5m") as m, httpx.AsyncClient(base_url=m.url) as c:
        r = await c.get("/v2/a/manifests/v1", headers=ACCEPT)
        assert r.headers["x-cache"] == "MISS"
        clock.now += 299
        r = await c.get("/v2/a/manifests/v1", headers=ACCEPT)
        assert r.headers["x-cache"] == "HIT"
        assert len(upstream.requests) == 1  # within the TTL: no upstream request at all

        clock.now += 2  # expired: exactly one HEAD, the body is not fetched again
        r = await c.get("/v2/a/manifests/v1", headers=ACCEPT)
        assert (r.headers["x-cache"], r.headers["docker-content-digest"]) == ("REVALIDATED", first)
        assert [(s.method, s.path) for s in upstream.requests[1:]] == [
            ("HEAD", "/v2/a/manifests/v1")
        ]
        r = await c.get("/v2/a/manifests/v1", headers=ACCEPT)
        assert r.headers["x-cache"] == "HIT"  # revalidation restarted the TTL

        moved = upstream.add_manifest(DOCKER_MANIFEST_V2, {**MANIFEST, "v": 2}, tag="v1")
        clock.now += 301
        r = await c.get("/v2/a/manifests/v1", headers=ACCEPT)
        assert (r.headers["x-cache"], r.headers["docker-content-digest"]) == ("MISS", moved)
        assert r.content == upstream.manifests[moved][1]
    assert [s.method for s in upstream.requests] == ["GET", "HEAD", "HEAD", "GET"]
    assert m.metric("mirror_cache_requests_total", kind="manifest", result="revalidated") == 1


@pytest.mark.parametrize(
    "fault",
    [
        pytest.param(Fault(status=503), id="5xx"),
        pytest.param(Fault(status=429, retry_after="60"), id="429"),
    ],
)
async def test_upstream_trouble_serves_stale_until_max_stale(
    fake: tuple[FakeUpstream, str], mirror: MirrorFactory, fault: Fault
) -> None:
    upstream, url = fake
    digest = upstream.add_manifest(DOCKER_MANIFEST_V2, MANIFEST, tag="v1")
    clock = Clock()
    async with (
        mirror(url, clock=clock, tag_ttl=60, max_stale="1h") as m,
        httpx.AsyncClient(base_url=m.url) as c,
    ):
        assert (await c.get("/v2/a/manifests/v1", headers=ACCEPT)).status_code == 200
        upstream.faults["v1"] = fault
        clock.now += 120
        r = await c.get("/v2/a/manifests/v1", headers=ACCEPT)
        assert (r.status_code, r.headers["x-cache"]) == (200, "STALE")
        assert r.headers["docker-content-digest"] == digest
        clock.now += 3600  # older than max_stale: the upstream's error, clearly
        r = await c.get("/v2/a/manifests/v1", headers=ACCEPT)
        assert r.status_code in (429, 502)
        assert r.json()["errors"][0]["code"] in ("TOOMANYREQUESTS", "UNAVAILABLE")
    assert m.metric("mirror_cache_requests_total", kind="manifest", result="stale") == 1


async def test_upstream_unreachable_serves_stale(mirror: MirrorFactory) -> None:
    from contextlib import AsyncExitStack

    from fakes.server import serve

    upstream = FakeUpstream()
    digest = upstream.add_manifest(DOCKER_MANIFEST_V2, MANIFEST, tag="v1")
    clock = Clock()
    async with AsyncExitStack() as upstream_alive:
        url = await upstream_alive.enter_async_context(serve(upstream))
        async with (
            mirror(url, clock=clock, tag_ttl=60) as m,
            httpx.AsyncClient(base_url=m.url) as c,
        ):
            assert (await c.get("/v2/a/manifests/v1", headers=ACCEPT)).status_code == 200
            await upstream_alive.aclose()  # the upstream goes away
            clock.now += 120
            r = await c.get("/v2/a/manifests/v1", headers=ACCEPT)
            assert (r.status_code, r.headers["x-cache"]) == (200, "STALE")
            assert r.headers["docker-content-digest"] == digest
            by_digest = await c.get(f"/v2/a/manifests/{digest}", headers=ACCEPT)
            assert by_digest.headers["x-cache"] == "HIT"  # digests never need the upstream


async def test_a_404_is_an_answer_not_trouble(
    fake: tuple[FakeUpstream, str], mirror: MirrorFactory
) -> None:
    upstream, url = fake
    upstream.add_manifest(DOCKER_MANIFEST_V2, MANIFEST, tag="v1")
    clock = Clock()
    async with mirror(url, clock=clock, tag_ttl=60) as m, httpx.AsyncClient(base_url=m.url) as c:
        assert (await c.get("/v2/a/manifests/v1", headers=ACCEPT)).status_code == 200
        del upstream.manifests["v1"]  # the tag was deleted upstream
        clock.now += 120
        r = await c.get("/v2/a/manifests/v1", headers=ACCEPT)
    assert r.status_code == 404
    assert r.json()["errors"][0]["code"] == "MANIFEST_UNKNOWN"


async def test_docker_hub_rate_limit_headers_become_metrics(
    fake: tuple[FakeUpstream, str], mirror: MirrorFactory
) -> None:
    upstream, url = fake
    upstream.add_manifest(DOCKER_MANIFEST_V2, MANIFEST, tag="v1")
    upstream.rate_limit = ("100;w=21600", "76;w=21600")
    async with mirror(url) as m, httpx.AsyncClient(base_url=m.url) as c:
        await c.get("/v2/a/manifests/v1", headers=ACCEPT)
        host = url.removeprefix("http://")
        assert m.metric("mirror_upstream_ratelimit_limit", upstream=host) == 100
        assert m.metric("mirror_upstream_ratelimit_remaining", upstream=host) == 76
        assert m.metric("mirror_upstream_ratelimit_window_seconds", upstream=host) == 21600
