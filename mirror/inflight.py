"""Single flight: concurrent calls for one key share one execution.

When a node pool rolls out, N clients ask for the same tag at once. They should cause
one upstream request, not N. The shared work runs in a task owned by this object, so
the caller that started it can leave (client disconnect, cancellation) without
cancelling it for the others. Blobs use the richer `Downloads`, whose readers also
need the bytes as they arrive.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Hashable
from typing import Generic, TypeVar

T = TypeVar("T")


class SingleFlight(Generic[T]):
    def __init__(self) -> None:
        self._tasks: dict[Hashable, asyncio.Task[T]] = {}

    def __len__(self) -> int:
        return len(self._tasks)

    def __contains__(self, key: Hashable) -> bool:
        """Whether a call for `key` is in flight: a caller joining it causes no work."""
        return key in self._tasks

    async def run(self, key: Hashable, work: Callable[[], Awaitable[T]]) -> tuple[T, bool]:
        """Run `work` unless a call for `key` is in flight; returns (result, joined)."""
        joined = not self.start(key, work)
        task = self._tasks[key]
        # shield: a cancelled caller stops waiting, the shared work goes on.
        return await asyncio.shield(task), joined

    def start(self, key: Hashable, work: Callable[[], Awaitable[T]]) -> bool:
        """Start `work` in the background unless a call for `key` is in flight (callers
        of `run` join it as any other); whether it started."""
        if key in self._tasks:
            return False
        task = asyncio.ensure_future(work())
        self._tasks[key] = task
        task.add_done_callback(lambda t: self._forget(key, t))
        return True

    def _forget(self, key: Hashable, task: asyncio.Task[T]) -> None:
        if self._tasks.get(key) is task:
            del self._tasks[key]
        if not task.cancelled():
            task.exception()  # retrieved: no "never retrieved" noise if all callers left

    async def aclose(self) -> None:
        tasks = list(self._tasks.values())
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
