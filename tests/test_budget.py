"""The rate-limit budget: a Docker-Hub-like upstream counts its pull limit down."""

from __future__ import annotations

import logging

import httpx
import pytest
from conftest import MirrorFactory, until
from fakes.clock import Clock
from fakes.quota import Quota
from fakes.upstream import FakeUpstream

from mirror.budget import Budget, Reserve
from mirror.errors import UpstreamError
from mirror.mediatypes import DOCKER_MANIFEST_V2, OCI_INDEX
from mirror.metrics import Metrics

MANIFEST = {"schemaVersion": 2, "mediaType": DOCKER_MANIFEST_V2, "layers": []}
ACCEPT = {"Accept": DOCKER_MANIFEST_V2}


@pytest.mark.parametrize(
    ("text", "limit", "kept"),
    [("20", 100, 20), ("10%", 100, 10), ("10%", 15, 2), ("0", 100, 0), ("10%", None, 0)],
)
def test_a_reserve_is_pulls_or_a_share_of_the_limit(
    text: str, limit: int | None, kept: int
) -> None:
    reserve = Reserve.parse(text)
    assert (reserve.of(limit), str(reserve)) == (kept, text)


@pytest.mark.parametrize("text", ["-1", "ten", "150%", "5.5", "", "1e3"])
def test_a_bad_reserve_is_refused_with_its_form(text: str) -> None:
    with pytest.raises(ValueError, match=r"pulls \(20\)|more than the whole limit"):
        Reserve.parse(text)


def test_modes_follow_the_headers_and_each_change_is_logged_once(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, "mirror.budget")
    clock = Clock()
    metrics = Metrics()
    metrics.add_registry("hub")
    budget = Budget("hub", Reserve.parse("10%"), metrics, clock)

    def told(remaining: int, status: int = 200, **extra: str) -> None:
        headers = {"ratelimit-limit": "100;w=21600", "ratelimit-remaining": f"{remaining};w=21600"}
        budget.observe(status, {**headers, **extra})

    def mode() -> str:  # read anew each time (mypy would narrow the attribute)
        return budget.mode

    told(50)
    told(11)
    assert mode() == "normal"
    told(9)
    told(8)
    assert mode() == "reserve"
    budget.spend(refresh=False)  # a miss may still spend
    with pytest.raises(UpstreamError) as deferred:
        budget.spend(refresh=True)
    assert deferred.value.status == 429
    told(0, status=429, **{"retry-after": "120"})
    assert mode() == "exhausted"
    clock.now += 30
    with pytest.raises(UpstreamError) as refused:
        budget.spend(refresh=False)
    assert (refused.value.code, refused.value.headers) == ("TOOMANYREQUESTS", {"Retry-After": "90"})
    clock.now += 90  # the wait is over: the next GET goes, and its answer tells
    budget.spend(refresh=False)
    assert mode() == "normal"
    told(99)
    modes = {
        m: metrics.registry.get_sample_value(
            "mirror_upstream_budget_changes_total", {"upstream": "hub", "mode": m}
        )
        for m in ("normal", "reserve", "exhausted")
    }
    assert modes == {"normal": 1, "reserve": 1, "exhausted": 1}
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 3
    assert "9 of 100 pulls left, under the reserve of 10 (10%)" in lines[0]
    assert "misses are answered 429 for 120 s" in lines[1]
    assert "back to normal after exhausted" in lines[2]
    saved = {
        a: metrics.registry.get_sample_value(
            "mirror_upstream_budget_saved_total", {"upstream": "hub", "action": a}
        )
        for a in ("deferred", "refused")
    }
    assert saved == {"deferred": 1, "refused": 1}


def test_a_count_flapping_around_the_reserve_logs_each_mode_at_most_once_a_minute(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Replicas behind one address hovering at the reserve, or a hostile upstream
    alternating its count, change the mode on every answer: the metrics count each
    change, the log does not repeat a line per request."""
    caplog.set_level(logging.INFO, "mirror.budget")
    clock = Clock()
    metrics = Metrics()
    metrics.add_registry("hub")
    budget = Budget("hub", Reserve.parse("10"), metrics, clock)
    for i in range(100):
        remaining = 9 if i % 2 == 0 else 50
        budget.observe(200, {"ratelimit-limit": "100", "ratelimit-remaining": str(remaining)})
        if i % 10 == 9:  # and now and then a free HEAD saying none are left
            budget.observe(200, {"ratelimit-limit": "100", "ratelimit-remaining": "0"})
            clock.now += 60  # (the wait passes)
        clock.now += 0.1
    changes = metrics.registry.get_sample_value(
        "mirror_upstream_budget_changes_total", {"upstream": "hub", "mode": "reserve"}
    )
    assert changes is not None and changes >= 50  # every change counted
    lines = [r.getMessage() for r in caplog.records]
    # ~10 minutes passed: at most a line per mode per minute, and the ones repeated
    # say how many changes they stand for.
    assert len(lines) <= 3 * 11, len(lines)
    assert any("changes since" in line for line in lines)
    clock.now += 61
    budget.observe(200, {"ratelimit-limit": "100", "ratelimit-remaining": "9"})
    assert "under the reserve" in caplog.records[-1].getMessage()


def test_the_last_pull_exhausts_without_a_429_and_a_http_date_is_read() -> None:
    clock = Clock()
    budget = Budget("hub", Reserve(), Metrics(), clock)
    budget.observe(200, {"ratelimit-limit": "10", "ratelimit-remaining": "0"})
    with pytest.raises(UpstreamError) as refused:
        budget.spend(refresh=False)
    assert refused.value.headers == {"Retry-After": "60"}  # Hub names no time: a minute
    # Without ratelimit-* headers (most registries), only a 429 moves the budget.
    other = Budget("ghcr", Reserve.parse("50%"), Metrics(), clock)
    other.observe(200, {})
    other.spend(refresh=True)
    other.observe(429, {"retry-after": "Wed, 21 Oct 2099 07:28:00 GMT"})
    with pytest.raises(UpstreamError) as capped:
        other.spend(refresh=False)
    assert capped.value.headers == {"Retry-After": "3600"}  # no window named: 1 h at most
    # An upstream that names its window is believed up to it (Hub's: 6 h), never longer.
    for window, believed in (("21600", 21600), ("999999999", 21600), ("600", 600)):
        hub = Budget("hub", Reserve(), Metrics(), clock)
        hub.observe(429, {"ratelimit-limit": f"100;w={window}", "retry-after": "99999999"})
        with pytest.raises(UpstreamError) as waited:
            hub.spend(refresh=False)
        assert waited.value.headers == {"Retry-After": str(believed)}


async def test_under_the_reserve_no_get_is_spent_on_revalidation(
    fake: tuple[FakeUpstream, str], mirror: MirrorFactory
) -> None:
    upstream, url = fake
    old = upstream.add_manifest(DOCKER_MANIFEST_V2, MANIFEST, tag="v1")
    upstream.quota = Quota(limit=10, remaining=6)
    clock = Clock()
    host = url.removeprefix("http://")
    async with (
        mirror(url, clock=clock, tag_ttl=60, ratelimit_reserve="50%") as m,
        httpx.AsyncClient(base_url=m.url) as c,
    ):
        assert (await c.get("/v2/a/manifests/v1", headers=ACCEPT)).headers["x-cache"] == "MISS"
        assert m.metric("mirror_upstream_budget_mode", upstream=host) == 0  # 5 left of 10
        upstream.add_manifest(DOCKER_MANIFEST_V2, {**MANIFEST, "v": 2}, tag="v1")  # moved
        upstream.add_manifest(DOCKER_MANIFEST_V2, {**MANIFEST, "v": 3}, tag="other")
        # A miss takes the count to 4 of 10, under the reserve of 5.
        assert (await c.get("/v2/a/manifests/other", headers=ACCEPT)).status_code == 200
        assert m.metric("mirror_upstream_budget_mode", upstream=host) == 1
        clock.now += 61
        gets = upstream.quota.gets
        r = await c.get("/v2/a/manifests/v1", headers=ACCEPT)
        # The HEAD (free) saw the move; the GET it needs is kept for misses.
        assert (r.status_code, r.headers["x-cache"]) == (200, "STALE")
        assert r.headers["docker-content-digest"] == old
        assert upstream.quota.gets == gets
        assert upstream.count("HEAD", "/manifests/v1") == 1
        assert m.metric("mirror_upstream_budget_saved_total", upstream=host, action="deferred") == 1
        # A miss still goes: that is what the reserve is for.
        upstream.add_manifest(DOCKER_MANIFEST_V2, {**MANIFEST, "v": 4}, tag="new")
        r = await c.get("/v2/a/manifests/new", headers=ACCEPT)
        assert (r.status_code, r.headers["x-cache"]) == (200, "MISS")
        assert upstream.quota.gets == gets + 1


async def test_at_zero_a_miss_gets_429_without_asking_then_resumes_after_the_reset(
    fake: tuple[FakeUpstream, str], mirror: MirrorFactory
) -> None:
    upstream, url = fake
    upstream.add_manifest(DOCKER_MANIFEST_V2, MANIFEST, tag="v1")
    upstream.add_manifest(DOCKER_MANIFEST_V2, {**MANIFEST, "v": 2}, tag="v2")
    upstream.quota = Quota(limit=10, remaining=2, retry_after="120")
    clock = Clock()
    host = url.removeprefix("http://")
    async with (
        mirror(url, clock=clock, tag_ttl=60, ratelimit_reserve=1) as m,
        httpx.AsyncClient(base_url=m.url) as c,
    ):
        assert (await c.get("/v2/a/manifests/v1", headers=ACCEPT)).status_code == 200
        assert (await c.get("/v2/a/manifests/v2", headers=ACCEPT)).status_code == 200
        # The last pull said 0 left: the next miss is answered here, not upstream.
        asked = len(upstream.requests)
        upstream.add_manifest(DOCKER_MANIFEST_V2, {**MANIFEST, "v": 3}, tag="v3")
        r = await c.get("/v2/a/manifests/v3", headers=ACCEPT)
        assert r.status_code == 429
        assert r.json()["errors"][0]["code"] == "TOOMANYREQUESTS"
        assert r.headers["retry-after"] == "60"
        assert len(upstream.requests) == asked
        assert m.metric("mirror_upstream_budget_mode", upstream=host) == 2
        # Cached tags are still answered: the HEAD is free, and unchanged tags need no GET.
        clock.now += 61
        r = await c.get("/v2/a/manifests/v1", headers=ACCEPT)
        assert (r.status_code, r.headers["x-cache"]) == (200, "REVALIDATED")
        assert upstream.quota.refused == 0  # the upstream never had to refuse us
        # That HEAD said 0 left, now: the wait starts again.
        asked = len(upstream.requests)
        clock.now += 1
        r = await c.get("/v2/a/manifests/v3", headers=ACCEPT)
        assert (r.status_code, r.headers["retry-after"]) == (429, "59")
        assert len(upstream.requests) == asked
        # The wait is over, but the upstream's window is not: its 429 and Retry-After
        # are believed, and misses are again answered here.
        clock.now += 60
        r = await c.get("/v2/a/manifests/v3", headers=ACCEPT)
        assert (r.status_code, r.headers["retry-after"]) == (429, "120")
        assert upstream.quota.refused == 1
        asked = len(upstream.requests)
        clock.now += 60
        r = await c.get("/v2/a/manifests/v3", headers=ACCEPT)
        assert (r.status_code, r.headers["retry-after"]) == (429, "60")
        assert len(upstream.requests) == asked
        # The upstream's window resets; once its Retry-After has passed, misses go.
        upstream.quota.reset()
        clock.now += 60
        r = await c.get("/v2/a/manifests/v3", headers=ACCEPT)
        assert (r.status_code, r.headers["x-cache"]) == (200, "MISS")
        assert m.metric("mirror_upstream_budget_mode", upstream=host) == 0
        assert m.metric("mirror_upstream_budget_saved_total", upstream=host, action="refused") == 3


async def test_under_the_reserve_a_cached_referrers_answer_spends_no_get_on_its_refresh(
    fake: tuple[FakeUpstream, str], mirror: MirrorFactory
) -> None:
    """Without a referrers API the answer is the referrers tag, fetched by a manifest
    GET: refreshing one the cache holds is a revalidation, and under the reserve it
    is served stale rather than spend a pull kept for misses."""
    upstream, url = fake
    subject = upstream.add_manifest(DOCKER_MANIFEST_V2, MANIFEST, tag="v1")
    index = {"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": []}
    upstream.add_manifest(OCI_INDEX, index, tag=subject.replace(":", "-"))
    upstream.quota = Quota(limit=10, remaining=7)
    clock = Clock()
    async with (
        mirror(url, clock=clock, tag_ttl=60, ratelimit_reserve="50%") as m,
        httpx.AsyncClient(base_url=m.url) as c,
    ):
        r = await c.get(f"/v2/a/referrers/{subject}")
        assert (r.status_code, r.headers["x-cache"]) == (200, "MISS")  # 6 left
        for tag in ("x", "y"):  # misses take it to 4 of 10, under the reserve of 5
            upstream.add_manifest(DOCKER_MANIFEST_V2, {**MANIFEST, "t": tag}, tag=tag)
            assert (await c.get(f"/v2/a/manifests/{tag}", headers=ACCEPT)).status_code == 200
        assert m.metric("mirror_upstream_budget_mode", upstream=url.removeprefix("http://")) == 1
        clock.now += 61
        gets = upstream.quota.gets
        r = await c.get(f"/v2/a/referrers/{subject}")
        assert (r.status_code, r.headers["x-cache"]) == (200, "STALE")
        assert upstream.quota.gets == gets


async def test_the_gauge_leaves_exhausted_when_a_longer_wait_named_later_is_over() -> None:
    """The wait was made longer by another 429 while exhausted: the gauge still goes
    back to normal once it is over, with no request asking (real time: the timer's)."""
    metrics = Metrics()
    metrics.add_registry("hub")
    budget = Budget("hub", Reserve(), metrics)
    budget.observe(429, {"retry-after": "1"})
    budget.observe(429, {"retry-after": "2"})  # a HEAD refused too, with a longer wait

    def gauge() -> float | None:
        return metrics.registry.get_sample_value("mirror_upstream_budget_mode", {"upstream": "hub"})

    assert gauge() == 2
    await until(lambda: gauge() == 0, "the end of the longer wait", timeout=5)
    budget.close()
