"""Per-client limits: the counters and buckets alone, then through the HTTP API with
clients on different loopback addresses (a greedy one and a polite one)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable, Hashable, Iterator
from contextlib import contextmanager

import httpx
import pytest
from conftest import MirrorFactory, RunningMirror, get_when_cached, until
from fakes.clock import Clock
from fakes.server import serve
from fakes.upstream import FakeUpstream
from starlette.types import Message, Receive, Scope, Send

from mirror import identity
from mirror.errors import RegistryError
from mirror.fairness import Fairness
from mirror.identity import Principal
from mirror.inflight import SingleFlight
from mirror.mediatypes import DOCKER_MANIFEST_V2
from mirror.metrics import Metrics
from mirror.proxy import Proxy
from mirror.store import StoredManifest

GREEDY, POLITE = "127.0.0.2", "127.0.0.3"
ACCEPT = {"Accept": DOCKER_MANIFEST_V2}


@contextmanager
def as_client(address: str | None, user: str | None = None) -> Iterator[None]:
    token = identity.current.set(None if address is None else Principal(user, address))
    try:
        yield
    finally:
        identity.current.reset(token)


def _refused(exc: pytest.ExceptionInfo[RegistryError]) -> tuple[str, int, str]:
    return exc.value.code, exc.value.status, exc.value.headers["Retry-After"]


# -- the limits alone -------------------------------------------------------------------


def test_a_bucket_holds_a_minute_of_requests_and_refills_at_its_rate() -> None:
    clock = Clock(0.0)
    limits = Fairness(manifests_per_minute=3, clock=clock)
    with as_client(GREEDY):
        for _ in range(3):
            limits.charge_manifest()
        with pytest.raises(RegistryError) as err:
            limits.charge_manifest()
        # 3 a minute: one token every 20 s.
        assert _refused(err) == ("TOOMANYREQUESTS", 429, "20")
        clock.now += 15
        assert limits.try_manifest() == pytest.approx(5.0)  # refused, nothing taken
        clock.now += 5
        limits.charge_manifest()
        with pytest.raises(RegistryError):
            limits.charge_manifest()
    with as_client(POLITE):  # another client has a bucket of its own
        for _ in range(3):
            limits.charge_manifest()
    with as_client(GREEDY, user="alice"):  # an authenticated user is counted as such
        limits.charge_manifest()


def test_concurrent_cold_fetches_are_counted_per_client_and_released_once() -> None:
    limits = Fairness(max_cold_fetches=2)
    with as_client(GREEDY):
        first, second = limits.cold_fetch(), limits.cold_fetch()
        with pytest.raises(RegistryError) as err:
            limits.cold_fetch()
        assert _refused(err) == ("TOOMANYREQUESTS", 429, "1")
        first.release()
        first.release()  # a second release frees nothing more
        assert limits.fetching(f"addr:{GREEDY}") == 1
        third = limits.cold_fetch()
        with pytest.raises(RegistryError):
            limits.cold_fetch()
    with as_client(POLITE):
        limits.cold_fetch()
    second.release()
    third.release()
    assert limits.fetching(f"addr:{GREEDY}") == 0


def test_work_without_a_client_and_limits_of_zero_are_never_limited() -> None:
    limited = Fairness(max_cold_fetches=1, manifests_per_minute=1)
    unlimited = Fairness()
    with as_client(None):  # background downloads, replicas' peer requests
        for _ in range(5):
            limited.cold_fetch()
            limited.charge_manifest()
    with as_client(GREEDY):
        for _ in range(5):
            unlimited.cold_fetch()
            unlimited.charge_manifest()
    assert limited.buckets() == unlimited.buckets() == 0


def test_idle_clients_are_forgotten_and_the_number_of_buckets_is_capped() -> None:
    clock = Clock(0.0)
    limits = Fairness(manifests_per_minute=10, clock=clock, max_buckets=3)
    for n in range(5):
        with as_client(f"10.0.0.{n}"):
            limits.charge_manifest()
    assert limits.buckets() == 3  # the least recently seen went first
    clock.now += 30
    with as_client("10.0.0.9"):
        limits.charge_manifest()
    clock.now += 30  # the first three are full again: the same as never seen
    with as_client("10.0.0.9"):
        limits.charge_manifest()
    assert limits.buckets() == 1


def test_refusals_are_counted_by_kind() -> None:
    metrics = Metrics()
    limits = Fairness(max_cold_fetches=1, manifests_per_minute=1, metrics=metrics)
    with as_client(GREEDY):
        limits.cold_fetch()
        limits.charge_manifest()
        for _ in range(2):
            with pytest.raises(RegistryError):
                limits.cold_fetch()
        with pytest.raises(RegistryError):
            limits.charge_manifest()

    def throttled(kind: str) -> float | None:
        return metrics.registry.get_sample_value("mirror_client_throttled_total", {"kind": kind})

    assert (throttled("cold_fetch"), throttled("manifest")) == (2.0, 1.0)


def test_a_flight_says_whether_a_key_is_in_flight() -> None:
    flight: SingleFlight[int] = SingleFlight()
    assert "k" not in flight


# -- through the HTTP API ---------------------------------------------------------------


class Gate:
    """Holds one upstream response: `reached` once it started (headers and the first
    body chunk for a blob, nothing for a manifest), the rest after `open`."""

    def __init__(self) -> None:
        self.reached = asyncio.Event()
        self.open = asyncio.Event()


class GatedUpstream:
    """The fake upstream, with responses held at gates chosen by path suffix."""

    def __init__(self, fake: FakeUpstream) -> None:
        self.fake = fake
        self.gates: dict[str, Gate] = {}

    def hold(self, suffix: str) -> Gate:
        gate = self.gates[suffix] = Gate()
        return gate

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        path = scope.get("path", "")
        gate = next((g for s, g in self.gates.items() if path.endswith(s)), None)
        if gate is None:
            await self.fake(scope, receive, send)
            return
        if "/manifests/" in path:
            gate.reached.set()
            await gate.open.wait()
            await self.fake(scope, receive, send)
            return

        async def held(message: Message) -> None:
            await send(message)
            if message["type"] == "http.response.body" and not gate.reached.is_set():
                gate.reached.set()
                await gate.open.wait()

        await self.fake(scope, receive, held)


@pytest.fixture
async def gated() -> AsyncIterator[tuple[GatedUpstream, str]]:
    upstream = GatedUpstream(FakeUpstream())
    async with serve(upstream) as url:
        try:
            yield upstream, url
        finally:  # nothing held past the test: the server could not stop
            for gate in upstream.gates.values():
                gate.open.set()


def client(m: RunningMirror, address: str) -> httpx.AsyncClient:
    transport = httpx.AsyncHTTPTransport(local_address=address)
    return httpx.AsyncClient(base_url=m.url, transport=transport, timeout=10)


def assert_too_many(r: httpx.Response, retry_after: str) -> None:
    assert r.status_code == 429
    assert r.headers["retry-after"] == retry_after
    assert r.json()["errors"][0]["code"] == "TOOMANYREQUESTS"


def _proxy(m: RunningMirror) -> Proxy:
    proxy: Proxy = m.app.state.components.router.route(None, "a").proxy
    return proxy


async def test_a_greedy_client_gets_429_for_manifests_while_another_gets_hits_and_misses(
    fake: tuple[FakeUpstream, str], mirror: MirrorFactory
) -> None:
    upstream, url = fake
    digests = {
        t: upstream.add_manifest(DOCKER_MANIFEST_V2, {"schemaVersion": 2, "t": t}, tag=t)
        for t in ("t1", "t2", "t3", "t4")
    }
    async with (
        mirror(url, client_manifest_requests_per_minute=2) as m,
        client(m, GREEDY) as greedy,
        client(m, POLITE) as polite,
    ):
        for tag in ("t1", "t2"):
            assert (await greedy.get(f"/v2/a/manifests/{tag}", headers=ACCEPT)).status_code == 200
        # Over the limit: a miss by tag, a miss by digest, a tag list.
        assert_too_many(await greedy.get("/v2/a/manifests/t3", headers=ACCEPT), "30")
        by_digest = f"/v2/a/manifests/{digests['t4']}"
        assert_too_many(await greedy.get(by_digest, headers=ACCEPT), "30")
        assert_too_many(await greedy.get("/v2/a/tags/list"), "30")
        # Its hits go on.
        hit = await greedy.get("/v2/a/manifests/t1", headers=ACCEPT)
        assert (hit.status_code, hit.headers["x-cache"]) == (200, "HIT")
        hit = await greedy.head(f"/v2/a/manifests/{digests['t2']}", headers=ACCEPT)
        assert (hit.status_code, hit.headers["x-cache"]) == (200, "HIT")
        # The other client is served, misses included, at the same time.
        answers = await asyncio.gather(
            polite.get("/v2/a/manifests/t3", headers=ACCEPT),
            polite.get("/v2/a/manifests/t1", headers=ACCEPT),
            greedy.get("/v2/a/manifests/t4", headers=ACCEPT),
        )
        assert [(r.status_code, r.headers.get("x-cache")) for r in answers] == [
            (200, "MISS"),
            (200, "HIT"),
            (429, None),
        ]
        assert (await polite.get("/v2/a/tags/list")).status_code == 200
        assert m.metric("mirror_client_throttled_total", kind="manifest") == 4
    # The refused requests never reached the upstream.
    assert upstream.count("GET", "/manifests/t3") == 1  # the polite client's
    assert upstream.count("GET", "/manifests/t4") == 0
    assert upstream.count("GET", f"/manifests/{digests['t4']}") == 0
    assert upstream.count("GET", "/tags/list") == 1


async def test_an_expired_tag_over_the_limit_is_served_stale_then_refused_past_max_stale(
    fake: tuple[FakeUpstream, str], mirror: MirrorFactory
) -> None:
    upstream, url = fake
    upstream.add_manifest(DOCKER_MANIFEST_V2, {"schemaVersion": 2}, tag="v1")
    clock = Clock()
    async with (
        mirror(
            url, clock=clock, tag_ttl="5m", max_stale="1h", client_manifest_requests_per_minute=1
        ) as m,
        client(m, GREEDY) as greedy,
        client(m, POLITE) as polite,
    ):
        assert (await greedy.get("/v2/a/manifests/v1", headers=ACCEPT)).status_code == 200
        clock.now += 301
        stale = await greedy.get("/v2/a/manifests/v1", headers=ACCEPT)
        assert (stale.status_code, stale.headers["x-cache"]) == (200, "STALE")
        assert upstream.count("HEAD", "/manifests/v1") == 0
        revalidated = await polite.get("/v2/a/manifests/v1", headers=ACCEPT)
        assert revalidated.headers["x-cache"] == "REVALIDATED"
        assert upstream.count("HEAD", "/manifests/v1") == 1
        clock.now += 3601  # nothing servable is left: the limit answers
        assert_too_many(await greedy.get("/v2/a/manifests/v1", headers=ACCEPT), "60")
        assert m.metric("mirror_client_throttled_total", kind="manifest") == 2
    assert upstream.count("HEAD", "/manifests/v1") == 1
    assert upstream.count("GET", "/manifests/v1") == 1


async def test_joining_a_manifest_fetch_in_flight_is_never_limited(
    gated: tuple[GatedUpstream, str], mirror: MirrorFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    upstream, url = gated
    for tag in ("mine", "shared"):
        upstream.fake.add_manifest(DOCKER_MANIFEST_V2, {"schemaVersion": 2, "t": tag}, tag=tag)
    gate = upstream.hold("/manifests/shared")
    async with (
        mirror(url, client_manifest_requests_per_minute=1) as m,
        client(m, GREEDY) as greedy,
        client(m, POLITE) as polite,
    ):
        flight = _proxy(m)._fetches
        joined = asyncio.Event()
        run = flight.run

        async def watched(
            key: Hashable, work: Callable[[], Awaitable[StoredManifest]]
        ) -> tuple[StoredManifest, bool]:
            if key in flight:
                joined.set()
            return await run(key, work)

        monkeypatch.setattr(flight, "run", watched)
        # The greedy client spends its one token...
        assert (await greedy.get("/v2/a/manifests/mine", headers=ACCEPT)).status_code == 200
        # ...and joins the fetch the polite client started: no token needed.
        first = asyncio.create_task(polite.get("/v2/a/manifests/shared", headers=ACCEPT))
        await gate.reached.wait()
        second = asyncio.create_task(greedy.get("/v2/a/manifests/shared", headers=ACCEPT))
        # Joined (or, wrongly, refused at once: then it must not hang here).
        waiter = asyncio.create_task(joined.wait())
        await asyncio.wait({second, waiter}, timeout=10, return_when=asyncio.FIRST_COMPLETED)
        waiter.cancel()
        gate.open.set()
        answers = [await first, await second]
        assert [(r.status_code, r.headers["x-cache"]) for r in answers] == [(200, "MISS")] * 2
    assert upstream.fake.count("GET", "/manifests/shared") == 1


async def test_a_greedy_client_gets_429_for_cold_blobs_while_hits_and_joins_go_on(
    gated: tuple[GatedUpstream, str], mirror: MirrorFactory
) -> None:
    upstream, url = gated
    fake = upstream.fake
    held, refused, shared, cached, later = (fake.add_blob(bytes([n]) * (1 << 20)) for n in range(5))
    held_gate, shared_gate = upstream.hold(held), upstream.hold(shared)
    async with (
        mirror(url, client_max_cold_fetches=1) as m,
        client(m, GREEDY) as greedy,
        client(m, POLITE) as polite,
    ):
        await get_when_cached(polite, f"/v2/a/blobs/{cached}")
        # The greedy client's one download from upstream, held in progress.
        async with greedy.stream("GET", f"/v2/a/blobs/{held}") as first:
            assert (first.status_code, first.headers["x-cache"]) == (200, "MISS")
            await held_gate.reached.wait()
            # Another cold blob, GET or HEAD: refused, without asking upstream.
            assert_too_many(await greedy.get(f"/v2/a/blobs/{refused}"), "1")
            assert (await greedy.head(f"/v2/a/blobs/{refused}")).status_code == 429
            # Its cache hits go on.
            hit = await greedy.get(f"/v2/a/blobs/{cached}")
            assert (hit.status_code, hit.headers["x-cache"]) == (200, "HIT")
            # The polite client's miss goes on at the same time...
            async with polite.stream("GET", f"/v2/a/blobs/{shared}") as started:
                assert started.status_code == 200
                await shared_gate.reached.wait()
                # ...and the greedy client may join it: that costs the upstream nothing.
                async with greedy.stream("GET", f"/v2/a/blobs/{shared}") as joined:
                    assert joined.status_code == 200
                    shared_gate.open.set()
                    assert len(await joined.aread()) == 1 << 20
                assert len(await started.aread()) == 1 << 20
            miss = await polite.get(f"/v2/a/blobs/{refused}")
            assert (miss.status_code, len(miss.content)) == (200, 1 << 20)
            held_gate.open.set()
            assert len(await first.aread()) == 1 << 20
        # The body is complete: the slot is free for the next request at once.
        done = await greedy.get(f"/v2/a/blobs/{later}")
        assert (done.status_code, done.headers["x-cache"]) == (200, "MISS")
        assert m.metric("mirror_client_throttled_total", kind="cold_fetch") == 2
    assert fake.count("GET", f"/blobs/{refused}") == 1  # the polite client's
    assert fake.count("HEAD", f"/blobs/{refused}") == 0
    assert fake.count("GET", f"/blobs/{shared}") == 1


async def test_a_client_that_disconnects_keeps_its_slot_until_the_download_ends(
    gated: tuple[GatedUpstream, str], mirror: MirrorFactory
) -> None:
    """The download goes on without the client that started it (for the cache): if
    hanging up freed the slot, a client could start any number of downloads at once
    by disconnecting from each (review of issue 16)."""
    upstream, url = gated
    slow, other = (upstream.fake.add_blob(bytes([n]) * (1 << 20)) for n in range(2))
    gate = upstream.hold(slow)
    async with mirror(url, client_max_cold_fetches=1) as m, client(m, GREEDY) as greedy:
        limits = _proxy(m).fairness
        async with greedy.stream("GET", f"/v2/a/blobs/{slow}") as first:
            assert first.status_code == 200
            await gate.reached.wait()
            assert limits.fetching(f"addr:{GREEDY}") == 1
        # Closed mid-body: the download it started still runs upstream.
        assert_too_many(await greedy.get(f"/v2/a/blobs/{other}"), "1")
        assert upstream.fake.count("GET", f"/blobs/{other}") == 0
        gate.open.set()
        # The download ended (cached): the slot is free again.
        await until(lambda: limits.fetching(f"addr:{GREEDY}") == 0, "the slot to be freed")
        r = await greedy.get(f"/v2/a/blobs/{other}")
        assert (r.status_code, len(r.content)) == (200, 1 << 20)
        hit = await greedy.get(f"/v2/a/blobs/{slow}")
        assert (hit.headers["x-cache"], len(hit.content)) == ("HIT", 1 << 20)


async def test_scope_checks_are_upstream_requests_and_charged_as_such(
    fake: tuple[FakeUpstream, str], mirror: MirrorFactory
) -> None:
    """A cached digest asked for under a repository it is not known in costs a HEAD
    upstream (mirror.scopes), and a refusal is not remembered: without a charge, a
    client could send the upstream any number of requests (review of issue 16)."""
    upstream, url = fake
    layer = upstream.add_blob(b"layer" * 1000)
    manifest = upstream.add_manifest(DOCKER_MANIFEST_V2, {"schemaVersion": 2}, tag="t")
    upstream.hidden_repos.add("nope/x")
    async with (
        mirror(url, client_manifest_requests_per_minute=2, client_max_cold_fetches=1) as m,
        client(m, POLITE) as polite,
        client(m, GREEDY) as greedy,
    ):
        assert (await polite.get(f"/v2/a/blobs/{layer}")).status_code == 200
        assert (await polite.get("/v2/a/manifests/t", headers=ACCEPT)).status_code == 200
        by_digest = f"/v2/nope/x/manifests/{manifest}"
        for _ in range(2):
            assert (await greedy.get(by_digest, headers=ACCEPT)).status_code == 404
        assert_too_many(await greedy.get(by_digest, headers=ACCEPT), "30")
        assert upstream.count("HEAD", by_digest) == 2
        # A blob's check is a HEAD too: it takes a cold-fetch slot while it runs, and
        # joins nobody's.
        for _ in range(3):
            assert (await greedy.get(f"/v2/nope/x/blobs/{layer}")).status_code == 404
        assert upstream.count("HEAD", f"/v2/nope/x/blobs/{layer}") == 3
        # The polite client is unaffected.
        ok = await polite.get(f"/v2/b/manifests/{manifest}", headers=ACCEPT)
        assert (ok.status_code, ok.headers["x-cache"]) == (200, "HIT")
