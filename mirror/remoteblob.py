"""A blob body from upstream: resumed when it breaks, watched when it stalls, bounded."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Awaitable, Callable

import httpx

from mirror import rawbody
from mirror.errors import UpstreamError
from mirror.metrics import Metrics
from mirror.ranges import parse_length

log = logging.getLogger(__name__)


class RemoteBlob:
    """A blob body from upstream, unbroken or an error.

    - A read that breaks (reset, timeout) asks again from the next byte with `Range`,
      up to `resume_attempts` times.
    - A watchdog of its own: a body that sends nothing for `stall_timeout` counts as
      broken, whatever the socket's timeouts believe (time the consumer takes with a
      chunk does not count).
    - At most `max_bytes`: an announced length beyond it is refused before the first
      byte, a body that grows past it is cut.
    """

    def __init__(
        self,
        path: str,
        resp: httpx.Response,
        resume: Callable[[int], Awaitable[httpx.Response]],
        metrics: Metrics,
        upstream: str,
        *,
        max_bytes: int,
        resume_attempts: int,
        stall_timeout: float,
        start: int = 0,
    ) -> None:
        self._path = path
        self._resp = resp
        self._resume = resume  # the same GET from an offset, with `Range`
        self._metrics = metrics
        self._upstream = upstream
        self._max = max_bytes
        self._attempts = resume_attempts
        self._stall = stall_timeout
        # A large body read off the socket shows progress at least this often.
        self._flush = min(1.0, stall_timeout / 4)
        self._start = start  # where `resp` starts in the blob (a download taken over)
        # The bytes this body will yield (from `start` on).
        self.size = parse_length(resp.headers.get("content-length"))
        if self.size is not None and start + self.size > max_bytes:
            raise _too_big(path, max_bytes)

    async def __aiter__(self) -> AsyncIterator[bytes]:
        fetched = self._metrics.upstream_bytes.labels(self._upstream)
        loop = asyncio.get_running_loop()
        offset, attempts = self._start, 0
        while True:
            try:
                async with asyncio.timeout(self._stall) as watchdog:  # a delay, not a time
                    body = rawbody.take(self._resp, self._flush) or self._resp.aiter_raw()
                    async for chunk in body:
                        offset += len(chunk)
                        if offset > self._max:
                            raise _too_big(self._path, self._max)
                        fetched.inc(len(chunk))
                        watchdog.reschedule(None)
                        yield chunk
                        watchdog.reschedule(loop.time() + self._stall)
                return
            except (httpx.TransportError, TimeoutError) as exc:
                if attempts >= self._attempts:
                    log.warning(
                        "upstream body of %s broke at %d bytes: %r", self._path, offset, exc
                    )
                    # The upstream answered, then broke: not "unreachable", and not a
                    # timeout to report as 504 either; no transport detail for clients.
                    raise UpstreamError(
                        "UNAVAILABLE", "upstream download failed", status=502
                    ) from exc
                attempts += 1
                log.warning(
                    "upstream body of %s broke at %d bytes (%r); resuming (%d/%d)",
                    self._path,
                    offset,
                    exc,
                    attempts,
                    self._attempts,
                )
                self._metrics.resumes.inc()
            finally:
                await self._resp.aclose()
            self._resp = await self._resume(offset)
            if self._resp.status_code != 206 or not self._resp.headers.get(
                "content-range", ""
            ).startswith(f"bytes {offset}-"):
                await self._resp.aclose()
                raise UpstreamError("UNAVAILABLE", "upstream cannot resume the blob", status=502)

    async def mismatched(self) -> None:
        pass  # the upstream's bytes: nothing kept to forget

    async def aclose(self) -> None:
        await self._resp.aclose()


def _too_big(path: str, max_bytes: int) -> UpstreamError:
    log.warning("upstream blob %s is larger than its limit of %d bytes; refused", path, max_bytes)
    return UpstreamError("UNAVAILABLE", "upstream blob exceeds its size limit", status=502)
