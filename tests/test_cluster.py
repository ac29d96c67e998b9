"""Cluster coordination (mirror.cluster) on a real Redis: work done once by the
lease holder, the others wait for its result; Redis down: everyone works."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Awaitable, Callable

import httpx
import pytest
from harness.redisserver import RedisServer

from mirror.cluster import Cluster
from mirror.metrics import Metrics
from mirror.redisindex import RedisIndex


def _replica(redis_server: RedisServer, prefix: str, n: int) -> Cluster:
    metrics = Metrics()
    metrics.add_shared_store()
    index = RedisIndex(redis_server.url, metrics, prefix=prefix)
    return Cluster(
        index,
        None,  # type: ignore[arg-type]  # `once` needs no store
        metrics,
        httpx.AsyncClient(),
        peer_url=f"http://127.0.0.1:{n}",
        secret="s",
        lease_ttl=3,
    )


async def test_once_runs_the_work_on_one_replica_and_the_others_share_its_result(
    redis_server: RedisServer,
) -> None:
    prefix = f"{uuid.uuid4().hex}:"
    replicas = [_replica(redis_server, prefix, n) for n in range(4)]
    ran: list[int] = []
    result: dict[str, str] = {}
    release = asyncio.Event()

    def work(n: int) -> Callable[[], Awaitable[str]]:
        async def run() -> str:
            ran.append(n)
            await release.wait()
            result["value"] = f"from {n}"
            return result["value"]

        return run

    async def done_elsewhere() -> str | None:
        return result.get("value")

    tasks = [
        asyncio.create_task(r.once("fetch:x", work(n), done_elsewhere, 5))
        for n, r in enumerate(replicas)
    ]
    while not ran:
        await asyncio.sleep(0.01)
    release.set()
    answers = await asyncio.gather(*tasks)
    assert len(ran) == 1
    assert answers == [f"from {ran[0]}"] * 4
    for r in replicas:
        await r.index.aclose()
        await r.aclose()


async def test_once_without_redis_does_the_work_everywhere(redis_server: RedisServer) -> None:
    replicas = [_replica(redis_server, f"{uuid.uuid4().hex}:", n) for n in range(2)]
    redis_server.stop()
    try:

        async def work() -> str:
            return "done"

        async def never() -> str | None:
            return None

        assert await asyncio.gather(*(r.once("x", work, never, 5) for r in replicas)) == [
            "done",
            "done",
        ]
    finally:
        redis_server.start()
    for r in replicas:
        await r.index.aclose()
        await r.aclose()


async def test_once_after_a_failed_holder_the_next_replica_works_at_once(
    redis_server: RedisServer,
) -> None:
    prefix = f"{uuid.uuid4().hex}:"
    first, second = (_replica(redis_server, prefix, n) for n in range(2))
    holding = asyncio.Event()
    fail = asyncio.Event()

    async def failing() -> str:
        holding.set()
        await fail.wait()
        raise LookupError("upstream said 404")

    async def never() -> str | None:
        return None

    async def works() -> str:
        return "second"

    task = asyncio.create_task(first.once("fetch:y", failing, never, 30))
    await holding.wait()
    waiting = asyncio.create_task(second.once("fetch:y", works, never, 30))
    await asyncio.sleep(0.2)
    assert not waiting.done()  # the holder is at work
    fail.set()
    with pytest.raises(LookupError):
        await task
    # Not the 30 s wait: the lease was released, so the second claims it and works.
    assert await asyncio.wait_for(waiting, 2) == "second"
    for r in (first, second):
        await r.index.aclose()
        await r.aclose()


async def test_once_after_the_work_ended_elsewhere_does_not_work_again(
    redis_server: RedisServer,
) -> None:
    """A replica that read its state before another's work ended, and claims the lease
    only after it was released, finds the result instead of doing the work twice (a
    second HEAD for one expired tag)."""
    prefix = f"{uuid.uuid4().hex}:"
    first, late = (_replica(redis_server, prefix, n) for n in range(2))
    ran: list[str] = []

    async def work() -> str:
        ran.append("work")
        return "fresh"

    async def nothing_yet() -> str | None:
        return None

    async def done() -> str | None:
        return "fresh" if ran else None

    assert await first.once("reval:x", work, nothing_yet, 5) == "fresh"
    assert await late.once("reval:x", work, done, 5) == "fresh"
    assert ran == ["work"]
    for r in (first, late):
        await r.index.aclose()
        await r.aclose()
