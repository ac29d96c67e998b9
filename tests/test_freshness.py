"""Tag TTL, HEAD revalidation and stale-if-error, with an injected clock (no sleeps)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from contextlib import contextmanager

import httpx
import pytest
from conftest import MirrorFactory, until
from fakes.clock import Clock
from fakes.upstream import FakeUpstream, Fault

from mirror import proxy
from mirror.config import Settings
from mirror.freshness import Freshness, TagFreshness, TTLRule
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


# -- stale-while-revalidate ------------------------------------------------------------


def test_a_rule_names_its_own_window_or_takes_the_default() -> None:
    rules = (TTLRule("*:latest", 60, 3600), TTLRule("*:edge", 30))
    freshness = Freshness(300, 86400, rules, stale_while_revalidate=120)
    assert freshness.of("app", "latest") == TagFreshness(60, 3600)
    assert freshness.of("app", "edge") == TagFreshness(30, 120)
    assert freshness.of("app", "1.0") == TagFreshness(300, 120)


def test_an_upstream_overrides_the_window_and_keeps_the_rest() -> None:
    settings = Settings(
        upstreams=[
            {"name": "docker.io", "stale_while_revalidate": "1h"},
            {"name": "ghcr.io"},
        ],
        stale_while_revalidate="5m",
        tag_ttl_rules=[{"pattern": "*:latest", "ttl": "1m", "stale_while_revalidate": "2h"}],
        refresh_ahead_pulls=3,
    )
    default = settings.freshness()
    hub, ghcr = (u.freshness(default) for u in settings.resolved_upstreams())
    assert hub.of("library/alpine", "3.20") == TagFreshness(300, 3600)
    assert hub.of("library/alpine", "latest") == TagFreshness(60, 7200)
    assert ghcr.of("org/app", "1.0") == TagFreshness(300, 300)
    assert hub.refresh_ahead_pulls == ghcr.refresh_ahead_pulls == 3


async def test_within_the_window_answered_at_once_then_one_head(
    fake: tuple[FakeUpstream, str], mirror: MirrorFactory
) -> None:
    upstream, url = fake
    digest = upstream.add_manifest(DOCKER_MANIFEST_V2, MANIFEST, tag="v1")
    clock = Clock()
    gate = asyncio.Event()
    async with (
        mirror(url, clock=clock, tag_ttl=60, stale_while_revalidate="1h") as m,
        httpx.AsyncClient(base_url=m.url) as c,
    ):
        assert (await c.get("/v2/a/manifests/v1", headers=ACCEPT)).headers["x-cache"] == "MISS"
        upstream.manifest_gate = gate  # the upstream answers nothing until the gate opens
        clock.now += 61
        before = len(upstream.requests)
        with _opened_at_the_end(gate):
            answers = [
                await c.get("/v2/a/manifests/v1", headers=ACCEPT, timeout=5) for _ in range(3)
            ]
            # Answered while the upstream had answered nothing: nobody waited for it.
            assert upstream.count("HEAD", "/manifests/v1") <= 1
        assert [(r.status_code, r.headers["x-cache"]) for r in answers] == [(200, "UPDATING")] * 3
        assert {r.headers["docker-content-digest"] for r in answers} == {digest}
        assert all(r.content == upstream.manifests[digest][1] for r in answers)
        await until(
            lambda: m.metric("mirror_background_revalidations_total", **_unchanged(url)) == 1,
            "the background revalidation",
        )
        # Three requests, one revalidation: a HEAD, no body fetched again.
        assert [(s.method, s.path) for s in upstream.requests[before:]] == [
            ("HEAD", "/v2/a/manifests/v1")
        ]
        r = await c.get("/v2/a/manifests/v1", headers=ACCEPT)
        assert r.headers["x-cache"] == "HIT"  # the background HEAD restarted the TTL
    assert m.metric("mirror_cache_requests_total", kind="manifest", result="updating") == 3


async def test_after_the_window_the_request_waits_for_the_head(
    fake: tuple[FakeUpstream, str], mirror: MirrorFactory
) -> None:
    upstream, url = fake
    upstream.add_manifest(DOCKER_MANIFEST_V2, MANIFEST, tag="v1")
    clock = Clock()
    gate = asyncio.Event()
    async with (
        mirror(url, clock=clock, tag_ttl=60, stale_while_revalidate="1h") as m,
        httpx.AsyncClient(base_url=m.url) as c,
    ):
        await c.get("/v2/a/manifests/v1", headers=ACCEPT)
        upstream.manifest_gate = gate
        clock.now += 60 + 3600
        waiting = asyncio.create_task(c.get("/v2/a/manifests/v1", headers=ACCEPT))
        with _opened_at_the_end(gate):
            await until(lambda: upstream.count("HEAD", "/manifests/v1") == 1, "the HEAD")
            await asyncio.sleep(0.05)  # room to answer early, if it wrongly would
            assert not waiting.done()  # past the window: the HEAD's answer is awaited
        r = await waiting
        assert (r.status_code, r.headers["x-cache"]) == (200, "REVALIDATED")
    assert m.metric("mirror_background_revalidations_total", **_unchanged(url)) == 0


async def test_a_moved_tag_is_served_old_once_then_new(
    fake: tuple[FakeUpstream, str], mirror: MirrorFactory
) -> None:
    upstream, url = fake
    old = upstream.add_manifest(DOCKER_MANIFEST_V2, MANIFEST, tag="v1")
    clock = Clock()
    async with (
        mirror(url, clock=clock, tag_ttl=60, stale_while_revalidate="1h") as m,
        httpx.AsyncClient(base_url=m.url) as c,
    ):
        await c.get("/v2/a/manifests/v1", headers=ACCEPT)
        new = upstream.add_manifest(DOCKER_MANIFEST_V2, {**MANIFEST, "v": 2}, tag="v1")
        clock.now += 120
        r = await c.get("/v2/a/manifests/v1", headers=ACCEPT)
        assert (r.headers["x-cache"], r.headers["docker-content-digest"]) == ("UPDATING", old)
        host = url.removeprefix("http://")
        await until(
            lambda: (
                m.metric("mirror_background_revalidations_total", upstream=host, result="moved")
                == 1
            ),
            "the background fetch of the moved tag",
        )
        r = await c.get("/v2/a/manifests/v1", headers=ACCEPT)
        assert (r.headers["x-cache"], r.headers["docker-content-digest"]) == ("HIT", new)
        assert r.content == upstream.manifests[new][1]
    assert [s.method for s in upstream.requests] == ["GET", "HEAD", "GET"]


@pytest.mark.parametrize(
    ("fault", "logged"),
    [
        pytest.param(Fault(status=503), "answered 503", id="5xx"),
        pytest.param(None, "MANIFEST_UNKNOWN", id="tag-deleted"),
    ],
)
async def test_a_failed_background_revalidation_keeps_the_entry_and_backs_off(
    fake: tuple[FakeUpstream, str],
    mirror: MirrorFactory,
    caplog: pytest.LogCaptureFixture,
    fault: Fault | None,
    logged: str,
) -> None:
    upstream, url = fake
    digest = upstream.add_manifest(DOCKER_MANIFEST_V2, MANIFEST, tag="v1")
    clock = Clock()
    host = url.removeprefix("http://")
    failed = {"upstream": host, "result": "failed"}
    async with (
        mirror(url, clock=clock, tag_ttl=60, stale_while_revalidate="1h") as m,
        httpx.AsyncClient(base_url=m.url) as c,
    ):
        await c.get("/v2/a/manifests/v1", headers=ACCEPT)
        if fault is None:
            del upstream.manifests["v1"]
        else:
            upstream.faults["v1"] = fault
        clock.now += 120
        r = await c.get("/v2/a/manifests/v1", headers=ACCEPT)
        assert (r.status_code, r.headers["x-cache"]) == (200, "UPDATING")
        await until(lambda: m.metric("mirror_background_revalidations_total", **failed) == 1, "it")
        assert logged in caplog.text
        # The entry is as it was, and the upstream is not asked again at once.
        asked = len(upstream.requests)
        r = await c.get("/v2/a/manifests/v1", headers=ACCEPT)
        assert (r.status_code, r.headers["x-cache"]) == (200, "STALE")
        assert r.headers["docker-content-digest"] == digest
        assert len(upstream.requests) == asked
        clock.now += 31  # the back-off is over: one more try
        upstream.faults.clear()
        upstream.add_manifest(DOCKER_MANIFEST_V2, MANIFEST, tag="v1")
        r = await c.get("/v2/a/manifests/v1", headers=ACCEPT)
        assert r.headers["x-cache"] == "UPDATING"
        await until(
            lambda: m.metric("mirror_background_revalidations_total", **_unchanged(url)) == 1,
            "the retry",
        )


async def test_a_popular_tag_is_refreshed_before_it_expires(
    fake: tuple[FakeUpstream, str], mirror: MirrorFactory
) -> None:
    upstream, url = fake
    upstream.add_manifest(DOCKER_MANIFEST_V2, MANIFEST, tag="hot")
    upstream.add_manifest(DOCKER_MANIFEST_V2, {**MANIFEST, "v": "cold"}, tag="cold")
    clock = Clock()
    settings = {"tag_ttl": 60, "refresh_ahead_pulls": 3, "refresh_ahead": "10s"}
    async with (
        mirror(url, clock=clock, **settings) as m,
        httpx.AsyncClient(base_url=m.url) as c,
    ):
        for tag in ("hot", "cold"):
            await c.get(f"/v2/a/manifests/{tag}", headers=ACCEPT)
        for _ in range(3):  # pulls early in the TTL: counted, nothing asked
            await c.get("/v2/a/manifests/hot", headers=ACCEPT)
        clock.now += 51
        assert upstream.count("HEAD", "/manifests/hot") == 0
        # Within 10 s of expiry, pulled more than 3 times: a HIT, and a HEAD behind it.
        for tag in ("hot", "cold"):
            r = await c.get(f"/v2/a/manifests/{tag}", headers=ACCEPT)
            assert r.headers["x-cache"] == "HIT"
        await until(
            lambda: m.metric("mirror_background_revalidations_total", **_unchanged(url)) == 1,
            "the refresh ahead",
        )
        assert upstream.count("HEAD", "/manifests/hot") == 1
        assert upstream.count("HEAD", "/manifests/cold") == 0  # pulled twice: not popular
        clock.now += 20  # past the first TTL: the popular tag never expired
        r = await c.get("/v2/a/manifests/hot", headers=ACCEPT)
        assert r.headers["x-cache"] == "HIT"
        r = await c.get("/v2/a/manifests/cold", headers=ACCEPT)
        assert r.headers["x-cache"] == "REVALIDATED"


async def test_past_the_window_a_request_is_not_held_behind_queued_background_work(
    fake: tuple[FakeUpstream, str], mirror: MirrorFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An expiry wave queues background revalidations for their slots; a request for
    one of those tags after the window joins it, and with a stale answer at hand must
    get it within `stale_after`, not after every revalidation queued before it."""
    monkeypatch.setattr(proxy, "BACKGROUND_MAX", 1)
    upstream, url = fake
    tags = [f"t{i}" for i in range(6)]
    for tag in tags:
        upstream.add_manifest(DOCKER_MANIFEST_V2, {**MANIFEST, "t": tag}, tag=tag)
    clock = Clock()
    gate = asyncio.Event()
    # fetch_timeout 1 s: the upstream gets stale_after = 0.5 s with a stale answer at hand.
    settings = {"tag_ttl": 60, "stale_while_revalidate": "1h", "fetch_timeout": 1}
    async with mirror(url, clock=clock, **settings) as m, httpx.AsyncClient(base_url=m.url) as c:
        for tag in tags:
            assert (await c.get(f"/v2/a/manifests/{tag}", headers=ACCEPT)).status_code == 200
        upstream.manifest_gate = gate  # the upstream hangs: each HEAD takes stale_after
        with _opened_at_the_end(gate):
            clock.now += 61
            for tag in tags:  # one revalidation runs, the others wait for its slot
                r = await c.get(f"/v2/a/manifests/{tag}", headers=ACCEPT)
                assert r.headers["x-cache"] == "UPDATING"
            clock.now += 3600  # past the window: this request waits, but only so long
            started = time.monotonic()
            r = await c.get(f"/v2/a/manifests/{tags[-1]}", headers=ACCEPT, timeout=10)
            waited = time.monotonic() - started
        assert (r.status_code, r.headers["x-cache"]) == (200, "STALE")
        # Six queued HEADs of 0.5 s each would be 3 s.
        assert waited < 1.5, f"held {waited:.1f} s behind the background queue"


def _unchanged(url: str) -> dict[str, str]:
    return {"upstream": url.removeprefix("http://"), "result": "unchanged"}


@contextmanager
def _opened_at_the_end(gate: asyncio.Event) -> Iterator[None]:
    """A held upstream answer is let go even when the test fails, or the fake server's
    shutdown would wait for it forever."""
    try:
        yield
    finally:
        gate.set()


async def test_an_expiry_wave_past_the_queue_is_served_stale_not_queued(
    fake: tuple[FakeUpstream, str], mirror: MirrorFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("mirror.proxy.BACKGROUND_QUEUE_MAX", 2)
    upstream, url = fake
    tags = [f"t{i}" for i in range(4)]
    for tag in tags:
        upstream.add_manifest(DOCKER_MANIFEST_V2, {**MANIFEST, "t": tag}, tag=tag)
    clock = Clock()
    gate = asyncio.Event()
    async with (
        mirror(url, clock=clock, tag_ttl=60, stale_while_revalidate="1h") as m,
        httpx.AsyncClient(base_url=m.url) as c,
    ):
        for tag in tags:
            await c.get(f"/v2/a/manifests/{tag}", headers=ACCEPT)
        upstream.manifest_gate = gate
        clock.now += 61
        with _opened_at_the_end(gate):
            answers = [
                (await c.get(f"/v2/a/manifests/{tag}", headers=ACCEPT)).headers["x-cache"]
                for tag in tags
            ]
            # Two held in the queue; the others answered stale, with nothing started.
            assert answers == ["UPDATING", "UPDATING", "STALE", "STALE"]
        await until(
            lambda: m.metric("mirror_background_revalidations_total", **_unchanged(url)) == 2,
            "the queued two",
        )
        assert (
            upstream.count("HEAD", "/manifests/t2") == upstream.count("HEAD", "/manifests/t3") == 0
        )
        # The queue has room again: the next request for t2 starts its revalidation.
        r = await c.get("/v2/a/manifests/t2", headers=ACCEPT)
        assert r.headers["x-cache"] == "UPDATING"
