from __future__ import annotations

import asyncio

import pytest

from mirror.inflight import SingleFlight


async def test_concurrent_calls_share_one_execution() -> None:
    flight: SingleFlight[int] = SingleFlight()
    calls = 0

    async def work() -> int:
        nonlocal calls
        calls += 1
        await asyncio.sleep(0.05)
        return 42

    results = await asyncio.gather(*(flight.run("k", work) for _ in range(10)))
    assert [r for r, _ in results] == [42] * 10
    assert [joined for _, joined in results].count(False) == 1
    assert calls == 1
    assert len(flight) == 0  # forgotten once done: the next call runs again
    await flight.run("k", work)
    assert calls == 2


async def test_errors_reach_every_caller_and_are_not_remembered() -> None:
    flight: SingleFlight[int] = SingleFlight()

    async def fail() -> int:
        await asyncio.sleep(0.01)
        raise ValueError("upstream said no")

    results = await asyncio.gather(
        *(flight.run("k", fail) for _ in range(3)), return_exceptions=True
    )
    assert all(isinstance(r, ValueError) for r in results)
    assert len(flight) == 0


async def test_a_caller_leaving_does_not_cancel_the_work() -> None:
    flight: SingleFlight[str] = SingleFlight()
    started, release, done = asyncio.Event(), asyncio.Event(), asyncio.Event()

    async def work() -> str:
        started.set()
        await release.wait()
        done.set()
        return "ok"

    first = asyncio.create_task(flight.run("k", work))
    await started.wait()
    second = asyncio.create_task(flight.run("k", work))
    first.cancel()
    with pytest.raises(asyncio.CancelledError):
        await first
    release.set()
    assert await second == ("ok", True)
    assert done.is_set()
