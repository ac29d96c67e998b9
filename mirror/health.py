"""The state of a shared dependency (the bucket, Redis): reachable, or backing off.

After a failure, calls fail fast for `backoff` seconds (a dependency that is down
costs one timeout, not one per request), then the next call tries again. The change
is logged once each way and exported as `mirror_shared_degraded{dependency}`. Marked
from the event loop and from lifecycle threads, hence the lock.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Literal

from mirror.metrics import Metrics

log = logging.getLogger(__name__)

Dependency = Literal["redis", "s3"]


class Health:
    def __init__(
        self,
        dependency: Dependency,
        metrics: Metrics,
        *,
        backoff: float,
        down: str,
        up: str,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._dependency = dependency
        self._metrics = metrics
        self.backoff = backoff
        self._down_message = down  # logged with the cause: "%s" is the failure
        self._up_message = up
        self._clock = clock
        self._lock = threading.Lock()
        self._down = False
        self.until = 0.0  # monotonic time the back-off ends

    @property
    def reachable(self) -> bool:
        return not self._down

    def backing_off(self) -> bool:
        return self._down and self._clock() < self.until

    def failed(self, why: str) -> None:
        with self._lock:
            self.until = self._clock() + self.backoff
            first, self._down = not self._down, True
        if first:
            self._metrics.shared_degraded.labels(self._dependency).set(1)
            log.error(self._down_message, why)

    def ok(self) -> None:
        if not self._down:
            return
        with self._lock:
            was, self._down = self._down, False
        if was:
            self._metrics.shared_degraded.labels(self._dependency).set(0)
            log.info(self._up_message)
