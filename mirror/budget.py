"""An upstream's pull budget: its rate limit spent on what only the upstream can give.

Docker Hub counts manifest GETs against a pull limit (`ratelimit-limit: 100;w=21600`)
and says on every manifest answer, GET or HEAD, how many are left
(`ratelimit-remaining: 76;w=21600`). A HEAD is not counted, so revalidating a tag by
HEAD is free; what costs is the GET after a tag moved, and every miss. The budget
reads those headers and has three modes:

- normal: GETs go upstream as they come;
- reserve: fewer than `ratelimit_reserve` pulls are left. Revalidations spend no GET
  (a moved tag is served stale within `max_stale`), so the rest is kept for misses,
  which nothing in the cache can answer;
- exhausted: none left, or the upstream answered 429. Misses are answered 429 with a
  `Retry-After` at once, without asking the upstream, until the upstream's
  `Retry-After` (or, as Hub names none, `EXHAUSTED_RETRY`) has passed; then the next
  GET goes upstream and its answer tells the count again.

An upstream that sends no `ratelimit-*` headers (most besides Docker Hub) stays normal
until it answers 429. Each process keeps its own view, refreshed by every manifest
answer it gets, so workers and replicas that share one address converge on the
upstream's own count within one request each.
"""

from __future__ import annotations

import asyncio
import logging
import math
import re
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from email.utils import parsedate_to_datetime

from mirror.errors import UpstreamError
from mirror.metrics import BUDGET_MODES, BudgetMode, Metrics

log = logging.getLogger(__name__)

# Seconds misses wait after the limit is spent when the upstream names no time. Docker
# Hub's window slides: one pull frees up as the oldest in the window ages out, at a
# time it does not tell. A GET refused with 429 is not counted, so trying once a
# minute costs nothing and finds the freed pulls soon enough.
EXHAUSTED_RETRY = 60.0
# Longer waits named by a Retry-After are believed only up to the upstream's own
# rate-limit window (`;w=`), or this when it names none: a hostile or broken upstream
# must not shut misses out for days with one answer.
RETRY_MAX = 3600.0
WINDOW_MAX = 6 * 3600.0  # Docker Hub's own window: the longest wait ever believed
# A mode's log line is not repeated sooner than this: a count hovering at the reserve
# (or an upstream alternating it) changes the mode on every answer, and the metrics
# count each change already.
LOG_EVERY = 60.0

_RESERVE_RE = re.compile(r"(\d{1,9})(%?)")


@dataclass(frozen=True, slots=True)
class Reserve:
    """Pulls kept for misses: a count (`20`), or a share of the limit (`10%`)."""

    count: int = 0
    percent: int | None = None

    @classmethod
    def parse(cls, value: str | int) -> Reserve:
        text = str(value).strip()
        match = _RESERVE_RE.fullmatch(text)
        if match is None:
            raise ValueError(
                f"ratelimit_reserve {text!r} is a number of pulls (20) or a share "
                "of the upstream's limit (10%)"
            )
        number = int(match[1])
        if match[2]:
            if number > 100:
                raise ValueError(f"ratelimit_reserve {text!r} is more than the whole limit")
            return cls(percent=number)
        return cls(count=number)

    def of(self, limit: int | None) -> int:
        if self.percent is None:
            return self.count
        return 0 if limit is None else math.ceil(limit * self.percent / 100)

    def __str__(self) -> str:
        return str(self.count) if self.percent is None else f"{self.percent}%"


class Budget:
    def __init__(
        self,
        upstream: str,
        reserve: Reserve,
        metrics: Metrics,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._upstream = upstream
        self._reserve = reserve
        self._metrics = metrics
        self._clock = clock
        self.limit: int | None = None
        self.remaining: int | None = None
        self._until: float | None = None  # exhausted until then
        self._window = RETRY_MAX  # the longest wait believed: the upstream's window
        self.mode: BudgetMode = "normal"
        self._timer: asyncio.TimerHandle | None = None
        self._logged: dict[BudgetMode, float] = {}  # when each mode's line was last logged
        self._unlogged = 0  # changes since the last line

    # -- what the upstream says ---------------------------------------------------

    def observe(self, status: int, headers: Mapping[str, str]) -> None:
        """A manifest answer from the upstream registry (not from a mirror tier, whose
        answers from its cache spend nothing)."""
        limit = parse_rate_limit(headers.get("ratelimit-limit"))
        remaining = parse_rate_limit(headers.get("ratelimit-remaining"))
        window = next((p[1] for p in (limit, remaining) if p is not None and p[1]), None)
        self._metrics.rate_limit(
            self._upstream,
            None if limit is None else limit[0],
            None if remaining is None else remaining[0],
            window,
        )
        if window is not None:
            self._window = min(float(window), WINDOW_MAX)
        if limit is not None:
            self.limit = limit[0]
        if remaining is not None:
            self.remaining = remaining[0]
        now = self._clock()
        before = self.mode
        if status == 429:
            self.remaining = 0
            self._until = now + _retry_after(headers.get("retry-after"), self._window)
        elif remaining is not None:
            if self.remaining == 0:
                # The pull just answered was the last: the next one would be refused.
                if self._until is None or self._until <= now:
                    self._until = now + EXHAUSTED_RETRY
            else:
                self._until = None  # the window slid: pulls again
        if self._update(now) == before == "exhausted":
            # Still exhausted, and the wait named anew (longer, or shorter): the timer
            # set on entering it follows.
            assert self._until is not None
            self._wake(self._until - now)

    # -- what the proxy may spend ---------------------------------------------------

    def spend(self, *, refresh: bool) -> None:
        """Before a manifest GET: raises 429 when the budget keeps it from going upstream.

        `refresh`: the GET would refresh a tag the cache can still serve stale; a miss
        has nothing else to answer with."""
        mode = self._update(self._clock())
        if mode == "exhausted":
            assert self._until is not None
            self._metrics.budget_saved.labels(self._upstream, "refused").inc()
            wait = max(1, math.ceil(self._until - self._clock()))
            raise Refused(
                "TOOMANYREQUESTS",
                f"upstream {self._upstream} pull rate limit reached; retry in {wait} s",
                status=429,
                upstream_status=429,
                headers={"Retry-After": str(wait)},
            )
        if mode == "reserve" and refresh:
            self._metrics.budget_saved.labels(self._upstream, "deferred").inc()
            raise Deferred(
                "TOOMANYREQUESTS",
                f"keeping the last {self.remaining} pulls of {self._upstream} for misses",
                status=429,
                upstream_status=429,
            )

    # -- modes --------------------------------------------------------------------

    def _current(self, now: float) -> BudgetMode:
        if self._until is not None:
            if now < self._until:
                return "exhausted"
            # The wait is over; the count is unknown until the next answer tells it.
            self._until = None
            self.remaining = None
        if self.remaining is not None and self.remaining < self._reserve.of(self.limit):
            return "reserve"
        return "normal"

    def _update(self, now: float) -> BudgetMode:
        mode = self._current(now)
        if mode != self.mode:
            self._change(mode, now)
        return mode

    def _change(self, mode: BudgetMode, now: float) -> None:
        before, self.mode = self.mode, mode
        self._metrics.budget_mode.labels(self._upstream).set(BUDGET_MODES.index(mode))
        self._metrics.budget_changes.labels(self._upstream, mode).inc()
        if mode == "exhausted":
            assert self._until is not None
            self._wake(self._until - now)
        if now - self._logged.get(mode, -math.inf) < LOG_EVERY:
            self._unlogged += 1
            return
        self._logged[mode] = now
        left = f"{self.remaining} of {self.limit}" if self.remaining is not None else "unknown"
        note = f" ({self._unlogged} changes since the last line)" if self._unlogged else ""
        self._unlogged = 0
        if mode == "exhausted":
            assert self._until is not None
            log.warning(
                "upstream %s: pull rate limit reached (%s pulls left): misses are answered "
                "429 for %.0f s without asking it; cached tags are served stale%s",
                self._upstream,
                left,
                self._until - now,
                note,
            )
        elif mode == "reserve":
            log.warning(
                "upstream %s: %s pulls left, under the reserve of %d (%s): revalidations "
                "spend no pulls (moved tags are served stale), misses still go upstream%s",
                self._upstream,
                left,
                self._reserve.of(self.limit),
                self._reserve,
                note,
            )
        else:
            log.info(
                "upstream %s: rate-limit budget back to normal after %s (%s pulls left)%s",
                self._upstream,
                before,
                left,
                note,
            )

    def _wake(self, delay: float) -> None:
        """The gauge leaves "exhausted" when the wait is over, even if no request asks."""
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return
        if self._timer is not None:
            self._timer.cancel()
        self._timer = loop.call_later(max(0.0, delay), lambda: self._update(self._clock()))

    def close(self) -> None:
        if self._timer is not None:
            self._timer.cancel()


class Deferred(UpstreamError):
    """A revalidation's GET not spent: the tag is served stale instead."""


class Refused(UpstreamError):
    """A GET not sent: the pull limit is spent (the upstream's own 429 is not this)."""


def _retry_after(value: str | None, longest: float) -> float:
    """Seconds from a `Retry-After` (seconds or an HTTP date), at most `longest`;
    EXHAUSTED_RETRY if none."""
    value = (value or "").strip()
    if value.isascii() and value.isdigit():
        return min(float(value), longest)
    try:
        when = parsedate_to_datetime(value).timestamp()
    except (TypeError, ValueError, IndexError, OverflowError):
        return EXHAUSTED_RETRY
    return min(max(1.0, when - time.time()), longest)


def parse_rate_limit(value: str | None) -> tuple[int, int | None] | None:
    """`100;w=21600` -> (100, 21600); `76` -> (76, None); junk -> None."""
    if not value:
        return None
    count, *params = (p.strip() for p in value.split(";"))
    if not count.isascii() or not count.isdigit() or len(count) > 12:
        return None
    window = None
    for param in params:
        key, _, val = param.partition("=")
        if key.strip() == "w" and val.isascii() and val.isdigit() and len(val) <= 12:
            window = int(val)
    return int(count), window
