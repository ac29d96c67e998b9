"""Per-client limits on what a client makes the mirror ask its upstreams.

One greedy client (a CI job pulling every tag, a crash-looping DaemonSet) must not
use up the upstream's quota (Docker Hub counts manifest GETs) or its bandwidth for
everybody else. Two limits, both opt-in and both per client (`Principal.client_key`:
the user if authenticated, else the address):

- concurrent cold fetches: blob downloads (and blob HEADs) this client's requests
  started upstream and that are still in progress;
- upstream manifest requests per minute: a token bucket, `capacity` tokens that
  refill at capacity/60 per second, one token per request that goes upstream (a
  manifest miss, a tag revalidation, a tag list).

Only what a request makes the mirror ask upstream is charged: cache hits, and
requests that join a fetch already in flight, cost nothing and are never refused.
Over a limit the answer is immediate (429 `TOOMANYREQUESTS` with `Retry-After`):
waiting would hold the client's connection and queue its work behind itself.
Work without a principal (background downloads, peer requests between replicas) is
never limited. `mirror warm` is an HTTP client like any other, limited as one.
"""

from __future__ import annotations

import math
import time
from collections import OrderedDict
from collections.abc import Callable

from mirror import identity
from mirror.errors import RegistryError
from mirror.metrics import Metrics, Throttle

# A cold-fetch slot frees when one of the client's downloads ends, which nobody can
# predict: a client told to wait a second retries about when a small layer is done.
COLD_FETCH_RETRY_AFTER = 1
# Buckets kept at most (one per client seen within the last minute). Past it the
# least recently used are forgotten: those clients start again with a full bucket,
# which errs on the side of serving them.
MAX_BUCKETS = 1 << 16


class Slot:
    """A cold-fetch slot; `release()` frees it, once, however often it is called."""

    def __init__(self, release: Callable[[], None] | None = None) -> None:
        self._release = release

    def release(self) -> None:
        release, self._release = self._release, None
        if release is not None:
            release()

    def __enter__(self) -> Slot:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


UNLIMITED = Slot()


class _Bucket:
    __slots__ = ("tokens", "updated")

    def __init__(self, tokens: float, updated: float) -> None:
        self.tokens = tokens
        self.updated = updated


class Fairness:
    """The per-client limits of one mirror (shared by all its upstreams: the quota
    that matters is the client's share of the mirror, whichever registry it asks).

    `clock` is monotonic seconds (injected by tests)."""

    def __init__(
        self,
        *,
        max_cold_fetches: int = 0,
        manifests_per_minute: int = 0,
        metrics: Metrics | None = None,
        clock: Callable[[], float] = time.monotonic,
        max_buckets: int = MAX_BUCKETS,
    ) -> None:
        self._max_fetches = max_cold_fetches
        self._capacity = float(manifests_per_minute)
        self._rate = manifests_per_minute / 60.0  # tokens per second
        self._metrics = metrics
        self._clock = clock
        self._max_buckets = max_buckets
        # Only clients with fetches in progress: an entry goes when its count is 0,
        # so this is bounded by the requests in flight.
        self._fetching: dict[str, int] = {}
        # Least recently charged first: a bucket untouched for a minute is full
        # again, the same as no bucket, so the front is dropped as it ages.
        self._buckets: OrderedDict[str, _Bucket] = OrderedDict()

    # -- cold fetches -----------------------------------------------------------------

    def cold_fetch(self) -> Slot:
        """A slot for one upstream blob fetch by the current client, or 429."""
        key = _client()
        if self._max_fetches <= 0 or key is None:
            return UNLIMITED
        count = self._fetching.get(key, 0)
        if count >= self._max_fetches:
            raise self._refuse(
                "cold_fetch",
                f"this client already has {count} blob downloads from upstream in progress",
                COLD_FETCH_RETRY_AFTER,
            )
        self._fetching[key] = count + 1
        return Slot(lambda: self._done(key))

    def fetching(self, key: str) -> int:
        """Cold fetches in progress for a client (`Principal.client_key`)."""
        return self._fetching.get(key, 0)

    def _done(self, key: str) -> None:
        count = self._fetching.get(key, 0) - 1
        if count > 0:
            self._fetching[key] = count
        else:
            self._fetching.pop(key, None)

    # -- upstream manifest requests ---------------------------------------------------

    def try_manifest(self) -> float | None:
        """Take a token for one upstream manifest request by the current client:
        None if taken, else the seconds until one will be there."""
        key = _client()
        if self._capacity <= 0 or key is None:
            return None
        now = self._clock()
        self._prune(now)
        bucket = self._buckets.get(key)
        if bucket is None:
            bucket = self._buckets[key] = _Bucket(self._capacity, now)
            while len(self._buckets) > self._max_buckets:
                self._buckets.popitem(last=False)
        else:
            self._buckets.move_to_end(key)
            elapsed = max(0.0, now - bucket.updated)
            bucket.tokens = min(self._capacity, bucket.tokens + elapsed * self._rate)
            bucket.updated = now
        if bucket.tokens >= 1.0:
            bucket.tokens -= 1.0
            return None
        return (1.0 - bucket.tokens) / self._rate

    def charge_manifest(self) -> None:
        """Take a token for one upstream manifest request, or 429."""
        wait = self.try_manifest()
        if wait is not None:
            raise self.refuse_manifest(wait)

    def refuse_manifest(self, wait: float) -> RegistryError:
        return self._refuse(
            "manifest",
            "this client has made too many manifest requests the mirror had to send upstream",
            wait,
        )

    def throttled_stale(self) -> None:
        """Counted when a revalidation over the limit was answered stale instead."""
        if self._metrics is not None:
            self._metrics.client_throttled.labels("manifest").inc()

    def buckets(self) -> int:
        return len(self._buckets)

    def _prune(self, now: float) -> None:
        # A bucket refills from empty in 60 s: one untouched that long is full.
        while self._buckets:
            oldest = next(iter(self._buckets.values()))
            if now - oldest.updated < 60.0:
                break
            self._buckets.popitem(last=False)

    def _refuse(self, kind: Throttle, message: str, wait: float) -> RegistryError:
        if self._metrics is not None:
            self._metrics.client_throttled.labels(kind).inc()
        seconds = max(1, math.ceil(wait))
        return RegistryError(
            "TOOMANYREQUESTS",
            f"{message}; retry in {seconds} s",
            headers={"Retry-After": str(seconds)},
        )


def _client() -> str | None:
    principal = identity.current.get()
    return None if principal is None else principal.client_key
