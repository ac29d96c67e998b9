"""Mirror tiers (mirror.tiers) against two fake upstreams: a tier and the registry."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator

import pytest
from fakes.chain import Chain, read, tier_chain
from fakes.upstream import Fault

from mirror.errors import UpstreamError
from mirror.metrics import Metrics
from mirror.reference import Digest, Reference
from mirror.tiers import Tier, Tiers
from mirror.upstream import Upstream, make_client

OCI = "application/vnd.oci.image.manifest.v1+json"


@pytest.fixture
async def chain() -> AsyncIterator[Chain]:
    async with tier_chain() as c:
        yield c


async def test_the_tier_answers_first_with_ns_and_our_ttl_as_max_age(chain: Chain) -> None:
    body = {"schemaVersion": 2, "mediaType": OCI}
    chain.tier.add_manifest(OCI, body, tag="v1")
    chain.registry.add_manifest(OCI, body, tag="v1")
    remote = await chain.tiers.get_manifest("app", Reference(tag="v1"), OCI, 1 << 20)
    assert remote.body
    [seen] = chain.tier.requests
    assert seen.query == "ns=docker.io"
    assert seen.headers["cache-control"] == "max-age=120"
    assert chain.registry.requests == []


async def test_a_failing_tier_is_skipped_until_its_backoff_ends_then_tried_once(
    chain: Chain,
) -> None:
    data = os.urandom(300_000)
    digest = chain.registry.add_blob(data)
    chain.tier.add_blob(data)
    chain.tier.faults[digest] = Fault(cut_after=10_000, cut_times=100)  # it breaks
    assert await read(chain.tiers, digest) == data  # finished by the registry
    assert chain.state() == 1  # open
    asked = len(chain.tier.requests)
    assert await read(chain.tiers, digest) == data
    assert len(chain.tier.requests) == asked  # skipped: not asked again
    chain.clock.now += 31  # the back-off is over: one trial, which works now
    del chain.tier.faults[digest]
    assert await read(chain.tiers, digest) == data
    assert chain.state() == 0
    assert len(chain.tier.requests) == asked + 1


async def test_a_5xx_from_a_tier_asks_the_registry_and_keeps_the_tier(chain: Chain) -> None:
    """A warm central whose registry is down answers 502 for what it lacks: it is
    still the place for what it holds."""
    data = os.urandom(1000)
    digest = chain.registry.add_blob(data)
    chain.tier.faults[digest] = Fault(status=502)
    assert await read(chain.tiers, digest) == data
    assert chain.state() == 0
    other = chain.tier.add_blob(os.urandom(500))
    assert await read(chain.tiers, other) == chain.tier.blobs[other]
    assert chain.registry.count("GET", other) == 0


async def test_a_429_from_a_tier_is_passed_on_not_spent_again_at_the_registry(
    chain: Chain,
) -> None:
    data = os.urandom(1000)
    digest = chain.registry.add_blob(data)
    chain.tier.faults[digest] = Fault(status=429, retry_after="30")
    with pytest.raises(UpstreamError) as err:
        await read(chain.tiers, digest)
    assert err.value.status == 429
    assert chain.registry.requests == []


async def test_the_registrys_spent_budget_refuses_only_what_the_tier_cannot_answer(
    chain: Chain,
) -> None:
    """A tier's answers spend none of the registry's pulls: with the registry's limit
    spent, the tier still answers; only a manifest it lacks is refused, without a
    request to the registry, and that refusal is no error of the registry tier."""
    body = {"schemaVersion": 2, "mediaType": OCI}
    chain.tier.add_manifest(OCI, body, tag="v1")
    chain.registry.add_manifest(OCI, body, tag="v1")
    chain.registry.add_manifest(OCI, {**body, "n": 2}, tag="v2")
    chain.budget.observe(429, {"retry-after": "60"})  # the registry said: spent
    remote = await chain.tiers.get_manifest("app", Reference(tag="v1"), OCI, 1 << 20)
    assert remote.body == chain.tier.manifests["v1"][1]
    with pytest.raises(UpstreamError) as err:
        await chain.tiers.get_manifest("app", Reference(tag="v2"), OCI, 1 << 20)
    assert (err.value.status, err.value.headers) == (429, {"Retry-After": "60"})
    assert chain.registry.requests == []
    errors = chain.metrics.tier_requests.labels("docker.io", "docker.io", "error")
    assert errors._value.get() == 0


async def test_an_unreachable_tier_opens_its_circuit(chain: Chain) -> None:
    metrics = Metrics()
    registry = chain.tiers._tiers[-1]
    tiers = Tiers(
        [
            Tier(
                "central",
                Upstream("http://127.0.0.1:9", make_client(1, 1), metrics, ns="docker.io"),
                registry=False,
            ),
            registry,
        ],
        metrics,
        clock=chain.clock,
    )
    data = os.urandom(100)
    digest = chain.registry.add_blob(data)
    try:
        assert await read(tiers, digest) == data
        assert metrics.tier_state.labels("docker.io", "central")._value.get() == 1
    finally:
        await tiers._tiers[0].upstream.aclose()  # the registry's is the fixture's


async def test_a_404_from_a_tier_asks_the_registry_but_keeps_the_tier(chain: Chain) -> None:
    data = os.urandom(100)
    digest = chain.registry.add_blob(data)  # the tier does not have it: 404
    assert await read(chain.tiers, digest) == data
    assert chain.state() == 0  # an answer, not trouble


async def test_a_blob_broken_by_a_tier_goes_on_from_the_registry_with_range(
    chain: Chain,
) -> None:
    data = os.urandom(300_000)
    digest = chain.registry.add_blob(data)
    chain.tier.add_blob(data)
    # Each request (the first and its resumes) breaks after 10 kB: the tier gives up.
    chain.tier.faults[digest] = Fault(cut_after=10_000, cut_times=100)
    assert await read(chain.tiers, digest) == data
    ranged = [r for r in chain.registry.requests if r.path.endswith(digest)]
    assert ranged and all("range" in r.headers for r in ranged), ranged
    assert chain.state() == 1


async def test_a_manifest_with_wrong_bytes_from_a_tier_comes_from_the_registry(
    chain: Chain,
) -> None:
    body = {"schemaVersion": 2, "mediaType": OCI}
    digest = chain.registry.add_manifest(OCI, body, tag="v1")
    chain.tier.add_manifest(OCI, body, tag="v1")
    chain.tier.faults[digest] = Fault(wrong_bytes=True)
    remote = await chain.tiers.get_manifest(
        "app", Reference(digest=Digest.parse(digest)), OCI, 1 << 20
    )
    assert chain.registry.count("GET", digest) == 1
    assert remote.digest_header == digest
    assert chain.state() == 1


async def test_when_every_tier_fails_the_registrys_error_is_raised(chain: Chain) -> None:
    with pytest.raises(UpstreamError) as err:
        await chain.tiers.head_blob("app", Digest("sha256", "0" * 64))
    assert err.value.status == 404
