"""Pinned images stay cached and current: never evicted (mirror.eviction leaves out
what `Inventory.protected` names), and refreshed here, in the background.

Every round, a pinned image whose tag is older than its TTL, or whose content is not
all cached (just pinned; purged meanwhile; its tag moved to new layers), is fetched
again by a `refresh` job through the proxy, as a pull would. One refresh job at a
time: a slow upstream makes rounds skip, never pile up.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable

from mirror.inventory import Inventory
from mirror.jobs import Job, Jobs
from mirror.routing import Router

log = logging.getLogger(__name__)


class Pins:
    def __init__(
        self,
        inventory: Inventory,
        jobs: Jobs,
        router: Router,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._inventory = inventory
        self._jobs = jobs
        self._router = router
        self._clock = clock
        self._refreshing: Job | None = None

    async def run_forever(self, interval: float) -> None:
        while True:
            try:
                await self.refresh_once()
            except Exception:
                log.exception("refreshing pinned images failed; retrying next interval")
            await asyncio.sleep(interval)

    async def refresh_once(self) -> Job | None:
        """Start a refresh job for the pinned images that need one (None: none do)."""
        if self._refreshing is not None and self._refreshing.state == "running":
            return None
        if not await self._inventory.pins():
            return None  # the usual case: no listing of the whole cache every round
        now = self._clock()
        due = []
        for image in await self._inventory.images():
            if not image.pinned:
                continue
            proxy = self._router.proxy(image.key.upstream)
            if proxy is None:
                continue  # an upstream no longer configured: kept, never refreshed
            stale = image.kind == "tag" and (
                image.stored_at is None
                or now - image.stored_at >= proxy.freshness.ttl(image.key.repo, image.key.ref)
            )
            incomplete = image.media_type is None or image.cached_bytes < image.size
            if stale or incomplete:
                due.append(str(image.key))  # [registry/]name:tag or @digest, as jobs take them
        if not due:
            return None
        log.info("refreshing %d pinned images: %s", len(due), ", ".join(due[:5]))
        self._refreshing = await self._jobs.start(due, None, "refresh")
        return self._refreshing
