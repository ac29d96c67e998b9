"""Mirror tiers (mirror.tiers) under faults and hostile answers, found by an
adversarial review: half-open trials that end in an answer, malformed and oversized
ages, clients forcing revalidations, a warm central whose registry hangs, realms on
another tier's origin."""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import AsyncIterator
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import pytest
from conftest import MirrorFactory
from fakes.chain import Chain, read, tier_chain
from fakes.clock import Clock
from fakes.server import serve
from fakes.upstream import FakeUpstream, Fault

from mirror.diskstore import DiskStore
from mirror.errors import UpstreamError
from mirror.freshness import Freshness
from mirror.mediatypes import AcceptSet
from mirror.metrics import Metrics
from mirror.proxy import Proxy
from mirror.reference import Reference
from mirror.routes import _max_age
from mirror.tiers import Tier, Tiers
from mirror.upstream import Upstream, make_client, parse_age

OCI = "application/vnd.oci.image.manifest.v1+json"


@pytest.fixture
async def chain() -> AsyncIterator[Chain]:
    async with tier_chain() as c:
        yield c


async def _open_the_circuit(chain: Chain) -> None:
    data = os.urandom(300_000)
    digest = chain.registry.add_blob(data)
    chain.tier.add_blob(data)
    chain.tier.faults[digest] = Fault(cut_after=10_000, cut_times=100)
    assert await read(chain.tiers, digest) == data
    assert chain.state() == 1  # open


async def test_a_half_open_tier_whose_trial_answers_404_is_used_again(chain: Chain) -> None:
    await _open_the_circuit(chain)
    chain.clock.now += 31  # back-off over: the next request is the trial
    missing = chain.registry.add_blob(os.urandom(100))  # the tier answers 404
    await read(chain.tiers, missing)
    # The tier answered: it is healthy. It must be asked again, not skipped forever.
    data = os.urandom(100)
    held = chain.tier.add_blob(data)
    chain.registry.add_blob(data)
    chain.clock.now += 3600
    await read(chain.tiers, held)
    assert chain.registry.count("GET", held) == 0, f"tier stuck in state {chain.state()}"


async def test_a_half_open_tier_whose_trial_answers_429_is_used_again(chain: Chain) -> None:
    await _open_the_circuit(chain)
    chain.clock.now += 31
    limited = chain.registry.add_blob(os.urandom(100))
    chain.tier.faults[limited] = Fault(status=429, retry_after="1")
    with pytest.raises(UpstreamError):
        await read(chain.tiers, limited)
    data = os.urandom(100)
    held = chain.tier.add_blob(data)
    chain.registry.add_blob(data)
    chain.clock.now += 3600
    await read(chain.tiers, held)
    assert chain.registry.count("GET", held) == 0, f"tier stuck in state {chain.state()}"


async def test_a_half_open_tier_whose_trial_is_cancelled_is_used_again(chain: Chain) -> None:
    await _open_the_circuit(chain)
    chain.clock.now += 31
    chain.tier.manifest_delay = 1.0  # the trial is slow: the client goes away first
    task = asyncio.create_task(chain.tiers.head_manifest("app", Reference(tag="v1"), OCI))
    await asyncio.sleep(0.2)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    chain.tier.manifest_delay = 0
    data = os.urandom(100)
    held = chain.tier.add_blob(data)
    chain.registry.add_blob(data)
    chain.clock.now += 3600
    await read(chain.tiers, held)
    assert chain.registry.count("GET", held) == 0, f"tier stuck in state {chain.state()}"


def test_client_cache_control_with_a_unicode_digit_is_not_a_500() -> None:
    # Starlette decodes header bytes as latin-1: b"max-age=\xb2" is "max-age=²",
    # and "²".isdigit() is True but float("²") raises ValueError -> 500.
    assert _max_age("max-age=\u00b2") is None


def test_a_tier_age_with_a_unicode_digit_is_not_a_500() -> None:
    # httpx decodes a non-UTF-8 header as latin-1: b"Age: \xb2" from a tier.
    assert parse_age("\u00b2") == 0.0


# -- Age and Cache-Control against the proxy ------------------------------------------


ANY = AcceptSet.from_headers([])


def with_age(app: FakeUpstream, age: str):  # type: ignore[no-untyped-def]
    """The fake, with an `Age` header on every answer (a CDN, or a tier's claim)."""

    async def wrapped(scope, receive, send):  # type: ignore[no-untyped-def]
        async def add(message):  # type: ignore[no-untyped-def]
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message["headers"], (b"age", age.encode())]}
            await send(message)

        await app(scope, receive, add)

    return wrapped


async def _proxy_over(upstream, store: DiskStore, clock: Clock) -> Proxy:  # type: ignore[no-untyped-def]
    return Proxy(
        store,
        upstream,
        Metrics(),
        freshness=Freshness(default_ttl=60, max_stale=3600),
        manifest_max_bytes=1 << 20,
        clock=clock,
    )


async def test_a_tier_claiming_a_huge_age_does_not_make_a_tag_never_fresh(tmp_path: Path) -> None:
    """We ask the tier for max-age=60; it answers Age: 31536000 (a year: still under
    MAX_AGE). The edge then stores the tag a year old: every request revalidates."""
    tier, registry = FakeUpstream(), FakeUpstream()
    body = {"schemaVersion": 2, "mediaType": OCI}
    tier.add_manifest(OCI, body, tag="v1")
    registry.add_manifest(OCI, body, tag="v1")
    clock = Clock()
    metrics = Metrics()
    store = DiskStore(tmp_path, clock)
    async with serve(with_age(tier, "31536000")) as t_url, serve(registry) as r_url:
        tiers = Tiers(
            [
                Tier(
                    "central",
                    Upstream(t_url, make_client(2, 2), metrics, name="central", ns="docker.io"),
                    registry=False,
                ),
                Tier(
                    "docker.io",
                    Upstream(r_url, make_client(2, 2), metrics, name="docker.io"),
                    registry=True,
                ),
            ],
            metrics,
            ttl=lambda repo, tag: 60.0,
            clock=clock,
        )
        proxy = await _proxy_over(tiers, store, clock)
        try:
            results = [
                (await proxy.manifest("app", Reference(tag="v1"), ANY)).result for _ in range(5)
            ]
        finally:
            await proxy.aclose()
            await tiers.aclose()
            store.close()
    # Expected: one miss, then hits within the TTL (an Age above the max-age we asked
    # for is the tier breaking the contract: clamp it, or take it as 0).
    assert results.count("hit") >= 3, (results, len(tier.requests))


async def test_a_registry_behind_a_cdn_sending_age_does_not_make_tags_never_fresh(
    tmp_path: Path,
) -> None:
    """Without any tier: the plain Upstream parses `Age` from the registry too (the
    docstring says '0 from a registry'). A CDN's Age above the TTL -> every pull HEADs."""
    registry = FakeUpstream()
    registry.add_manifest(OCI, {"schemaVersion": 2, "mediaType": OCI}, tag="v1")
    clock = Clock()
    store = DiskStore(tmp_path, clock)
    async with serve(with_age(registry, "600")) as url:
        upstream = Upstream(url, make_client(2, 2), Metrics())
        proxy = await _proxy_over(upstream, store, clock)
        try:
            results = [
                (await proxy.manifest("app", Reference(tag="v1"), ANY)).result for _ in range(5)
            ]
        finally:
            await proxy.aclose()
            await upstream.aclose()
            store.close()
    assert results.count("hit") >= 3, (results, registry.count("HEAD", "v1"))


async def test_any_client_cannot_make_the_mirror_head_the_registry_on_every_pull(
    mirror: MirrorFactory, fake: tuple[FakeUpstream, str]
) -> None:
    """`Cache-Control: no-cache` (or max-age=0) from any client, not only a tier:
    each request revalidates with the registry (single-flighted, so only concurrent
    requests coalesce). 50 sequential pulls -> 50 registry HEADs."""
    upstream, url = fake
    upstream.add_manifest(OCI, {"schemaVersion": 2, "mediaType": OCI}, tag="v1")
    async with mirror(url) as m, httpx.AsyncClient(base_url=m.url) as client:
        for _ in range(50):
            r = await client.get(
                "/v2/app/manifests/v1", headers={"Accept": OCI, "Cache-Control": "no-cache"}
            )
            assert r.status_code == 200
    heads = upstream.count("HEAD", "/manifests/v1")
    assert heads <= 5, f"{heads} registry HEADs for 50 pulls of a fresh tag"


async def test_a_client_cache_control_with_latin1_digit_gets_a_400_not_a_500(
    mirror: MirrorFactory, fake: tuple[FakeUpstream, str]
) -> None:
    upstream, url = fake
    upstream.add_manifest(OCI, {"schemaVersion": 2, "mediaType": OCI}, tag="v1")
    async with mirror(url) as m, httpx.AsyncClient(base_url=m.url) as client:
        r = await client.get(
            "/v2/app/manifests/v1",
            headers=[(b"Accept", OCI.encode()), (b"Cache-Control", b"max-age=\xb2")],
        )
    assert r.status_code != 500, r.text


# -- a warm central in front of a registry that hangs ---------------------------------


async def test_a_warm_central_whose_registry_hangs_keeps_its_circuit_closed(
    mirror: MirrorFactory, tmp_path: Path
) -> None:
    """Both sides with the same fetch_timeout (the default config: 20 s each). The
    central revalidates an expired tag with a hanging registry for fetch_timeout, then
    serves stale; the edge's own deadline for the same exchange ends first, so the
    edge takes the healthy central as unreachable and opens its circuit (then waits
    another fetch_timeout on the registry itself)."""
    registry = FakeUpstream()
    registry.add_manifest(OCI, {"schemaVersion": 2, "mediaType": OCI}, tag="v1")
    central_clock, edge_clock = Clock(), Clock()
    metrics = Metrics()
    async with (
        serve(registry) as r_url,
        mirror(r_url, fetch_timeout=1.0, tag_ttl=60, clock=central_clock) as central,
    ):
        ns = urlsplit(r_url).netloc
        tiers = Tiers(
            [
                Tier(
                    "central",
                    Upstream(
                        central.url,
                        make_client(2, 5),
                        metrics,
                        name="central",
                        ns=ns,
                        fetch_timeout=1.0,
                    ),
                    registry=False,
                ),
                Tier(
                    ns,
                    Upstream(r_url, make_client(2, 5), metrics, name=ns, fetch_timeout=1.0),
                    registry=True,
                ),
            ],
            metrics,
            ttl=lambda repo, tag: 60.0,
            clock=edge_clock,
        )
        store = DiskStore(tmp_path / "edge", edge_clock)
        proxy = await _proxy_over(tiers, store, edge_clock)
        try:
            assert (await proxy.manifest("app", Reference(tag="v1"), ANY)).result == "miss"
            registry.manifest_delay = 10  # the registry blackholes
            central_clock.now += 61
            edge_clock.now += 61
            with contextlib.suppress(UpstreamError):
                await proxy.manifest("app", Reference(tag="v1"), ANY)
            state = metrics.tier_state.labels(ns, "central")._value.get()
        finally:
            await proxy.aclose()
            await tiers.aclose()
            store.close()
    assert state == 0, "the warm central's circuit opened because its registry hangs"


# -- credentials: the registry's and the tiers' origins -------------------------------


def test_the_registrys_credentials_are_never_sent_to_a_realm_on_a_tier(tmp_path: Path) -> None:
    """Other upstreams' origins are refused as token realms (credential isolation);
    a tier's origin is not: a registry (or whoever answers for it) naming a realm on
    the central mirror, same registrable domain, gets the registry's Basic
    credentials sent to the tier."""
    from mirror.components import build
    from mirror.config import Settings

    settings = Settings(
        cache_dir=tmp_path,
        upstreams=[
            {
                "name": "registry.corp.example",
                "username": "robot",
                "password": "s3cret",
                "mirrors": [{"url": "https://central.corp.example"}],
            }
        ],
    )
    built = build(settings, Metrics(), Clock())
    try:
        tiers = built.upstreams[0]
        assert isinstance(tiers, Tiers)
        registry = tiers._tiers[-1].upstream
        tier = tiers._tiers[0].upstream
        assert not registry.auth.realm_allowed("https://central.corp.example/token")
        # and the other way: a tier's own credentials never to the registry's origin
        assert not tier.auth.realm_allowed("https://registry.corp.example/token")
    finally:
        built.store.close()
