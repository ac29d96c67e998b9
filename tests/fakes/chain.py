"""Two fake upstreams chained as a mirror tier and its registry, for the tiers tests."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass

from fakes.clock import Clock
from fakes.server import serve
from fakes.upstream import FakeUpstream
from mirror.budget import Budget, Reserve
from mirror.metrics import Metrics
from mirror.reference import Digest
from mirror.tiers import Tier, Tiers
from mirror.upstream import Upstream, make_client


@dataclass
class Chain:
    tier: FakeUpstream
    registry: FakeUpstream
    tiers: Tiers
    clock: Clock
    metrics: Metrics
    budget: Budget  # the registry's

    def state(self) -> float:
        value = self.metrics.tier_state.labels("docker.io", "central")._value.get()
        return float(value)


@asynccontextmanager
async def tier_chain() -> AsyncIterator[Chain]:
    tier, registry = FakeUpstream(), FakeUpstream()
    clock = Clock()
    metrics = Metrics()
    budget = Budget("docker.io", Reserve(), metrics, clock)
    async with serve(tier) as tier_url, serve(registry) as registry_url:
        tiers = Tiers(
            [
                Tier(
                    "central",
                    Upstream(tier_url, make_client(2, 2), metrics, name="central", ns="docker.io"),
                    registry=False,
                ),
                Tier(
                    "docker.io",
                    Upstream(
                        registry_url,
                        make_client(2, 2),
                        metrics,
                        name="docker.io",
                        budget=budget,
                    ),
                    registry=True,
                ),
            ],
            metrics,
            backoff=30,
            ttl=lambda repo, tag: 120.0,
            clock=clock,
        )
        yield Chain(tier, registry, tiers, clock, metrics, budget)
        await tiers.aclose()


async def read(tiers: Tiers, digest: str, start: int = 0) -> bytes:
    blob = await tiers.open_blob("app", Digest.parse(digest), 1 << 30, start)
    try:
        return b"".join([chunk async for chunk in blob])
    finally:
        await blob.aclose()
