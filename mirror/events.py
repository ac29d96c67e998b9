"""Events to webhooks, in Distribution's notifications format (README, "Events").

What happens (a pull, a cache fill, an eviction, a digest mismatch, an upstream
failure, a purge) becomes one event: Distribution's JSON (id, timestamp, action,
target, request, actor, source) plus a `mirror` object with what only a mirror knows
(the upstream, the cache result, an eviction's reason). Each configured endpoint has
its own bounded queue and its own sender task, which POSTs what is queued as one
envelope `{"events": [...]}`.

The code that reports an event never waits: the calls below build a small dict and
put it in the queues (from the event loop, or from a worker thread through
`call_soon_threadsafe`), so a slow or dead endpoint can never slow a pull. The price
is that delivery is best effort: a full queue drops the event (the newest: what was
accepted stays, in order, and the batch being sent sits at the queue's front), a stop
drops what could not be sent within FLUSH_TIMEOUT, and both are counted.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import logging
import socket
import threading
import time
import uuid
from collections import deque
from collections.abc import Awaitable, Callable, Iterable
from contextvars import ContextVar
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import httpx

from mirror import __version__
from mirror.config import NotificationEndpoint, NotificationSettings
from mirror.metrics import Kind, Metrics

log = logging.getLogger(__name__)

MEDIA_TYPE = "application/vnd.docker.distribution.events.v1+json"
BLOB_MEDIA_TYPE = "application/octet-stream"  # what Distribution names a blob's target
MAX_BATCH = 100  # events in one envelope
# On stop, the senders get this long to deliver what is queued; the rest is dropped.
FLUSH_TIMEOUT = 2.0
# References of manifests larger than this are read in a worker thread.
PARSE_INLINE_MAX = 64 << 10


@dataclass(frozen=True, slots=True)
class Caller:
    """The request an event comes from (its `request` and `actor`), set by the routes
    once a request is authenticated; work started by the request (a download) keeps it."""

    id: str
    addr: str
    host: str
    method: str
    useragent: str
    user: str | None

    def request(self) -> dict[str, str]:
        return {
            "id": self.id,
            "addr": self.addr,
            "host": self.host,
            "method": self.method,
            "useragent": self.useragent,
        }

    def actor(self) -> dict[str, str]:
        return {} if self.user is None else {"name": self.user}


caller: ContextVar[Caller | None] = ContextVar("mirror_event_caller", default=None)


@dataclass(slots=True)
class Event:
    body: dict[str, Any]
    media_type: str | None  # for the endpoints' ignore lists
    manifest: bytes | None = None  # a manifest event's body, for `includereferences`
    rendered: dict[str, Any] | None = field(default=None, repr=False)


class Events:
    """The events of one process (each worker sends its own). Without endpoints every
    call returns at once."""

    def __init__(
        self,
        settings: NotificationSettings | None = None,
        metrics: Metrics | None = None,
        *,
        listen: str = "",
        client: httpx.AsyncClient | None = None,
        flush_timeout: float = FLUSH_TIMEOUT,
    ) -> None:
        settings = settings or NotificationSettings()
        self._references = settings.events.includereferences
        if metrics is None and settings.endpoints:
            metrics = Metrics()
        self._metrics = metrics
        self._configs = [e for e in settings.endpoints if not e.disabled]
        self._senders: list[_Sender] = []
        self._client = client
        self._own_client = client is None
        self._flush_timeout = flush_timeout
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: int | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._closed = False
        self._flush_deadline: float | None = None
        port = listen.rpartition(":")[2]
        self._source = {
            "addr": f"{socket.gethostname()}:{port}" if port else socket.gethostname(),
            # Per process: a worker of several is an instance of its own.
            "instanceID": str(uuid.uuid4()),
        }

    @property
    def enabled(self) -> bool:
        return bool(self._configs) and not self._closed

    def start(self) -> None:
        """Start the senders, in the running loop (the app's lifespan)."""
        if not self._configs or self._loop is not None:
            return
        self._loop = asyncio.get_running_loop()
        self._thread = threading.get_ident()
        if self._client is None:
            # No proxy or netrc from the environment: headers may hold a token.
            self._client = httpx.AsyncClient(
                trust_env=False,
                follow_redirects=False,
                headers={"User-Agent": f"mirror/{__version__}"},
            )
        assert self._metrics is not None
        for config in self._configs:
            self._metrics.add_event_endpoint(config.name)
            sender = _Sender(config, self._metrics, self._client, self._render)
            self._senders.append(sender)
            self._tasks.append(self._loop.create_task(sender.run(), name=f"events {config.name}"))
        log.info(
            "sending events to %s",
            ", ".join(
                f"{c.name} (queue {c.queue}, timeout {c.timeout:g} s)" for c in self._configs
            ),
        )

    def stopping(self) -> None:
        """The process stops: the flush timeout counts from now, while the rest of
        the stop (downloads committing) runs, so events add nothing to its length."""
        if self._loop is not None and self._flush_deadline is None:
            self._flush_deadline = self._loop.time() + self._flush_timeout

    async def aclose(self) -> None:
        """Deliver what is queued within the flush timeout; drop (and count) the rest."""
        self.stopping()
        self._closed = True
        for sender in self._senders:
            sender.close()
        if self._tasks:
            assert self._loop is not None and self._flush_deadline is not None
            left = max(0.0, self._flush_deadline - self._loop.time())
            _, pending = await asyncio.wait(self._tasks, timeout=left)
            for task in pending:
                task.cancel()
            await asyncio.gather(*self._tasks, return_exceptions=True)
        lost = sum(sender.drop_all() for sender in self._senders)
        if lost:
            log.warning("%d events not delivered before the stop: dropped", lost)
        if self._own_client and self._client is not None:
            await self._client.aclose()

    # -- what happened ------------------------------------------------------------------

    def pull(
        self,
        kind: Kind,
        *,
        upstream: str,
        repository: str,
        digest: str,
        media_type: str | None,
        size: int | None,
        cache: str,
        tag: str | None = None,
        url: str | None = None,
        manifest: bytes | None = None,
    ) -> None:
        """A client's GET of a manifest or a blob; `cache` is its X-Cache (hit, miss,
        revalidated, stale)."""
        if not self.enabled:
            return
        target = _target(kind, repository, digest, media_type, size, tag, url)
        self._emit(
            self._event("pull", target, {"upstream": upstream, "kind": kind, "cache": cache}),
            target.get("mediaType"),
            manifest,
        )

    def fill(
        self,
        kind: Kind,
        *,
        upstream: str,
        repository: str,
        digest: str,
        media_type: str | None,
        size: int | None,
        tag: str | None = None,
        manifest: bytes | None = None,
    ) -> None:
        """Content stored in the cache: a blob committed after its digest verified, or
        a manifest fetched from the upstream."""
        if not self.enabled:
            return
        target = _target(kind, repository, digest, media_type, size, tag, None)
        event = self._event("fill", target, {"upstream": upstream, "kind": kind})
        self._emit(event, target.get("mediaType"), manifest)

    def evicted(
        self, kind: Kind, entries: Iterable[tuple[object, int | None]], reason: str
    ) -> None:
        """Cache entries (digest, size) removed by an eviction round (ttl or size); may
        be called from the round's worker thread."""
        if not self.enabled:
            return
        events = []
        for digest, size in entries:
            target = _target(kind, None, str(digest), None, size, None, None)
            body = self._event("evict", target, {"kind": kind, "reason": reason})
            events.append(Event(body, target.get("mediaType")))
        self._queue(events)  # one hop to the loop for the whole round

    def mismatch(
        self, kind: Kind, *, upstream: str, repository: str, digest: str, actual: str | None
    ) -> None:
        """Upstream content whose digest did not verify (not cached)."""
        if not self.enabled:
            return
        target = _target(kind, repository, digest, None, None, None, None)
        extra = {"upstream": upstream, "kind": kind, "actual": actual}
        self._emit(self._event("mismatch", target, extra), None)

    def upstream_failure(
        self,
        *,
        upstream: str,
        repository: str,
        reference: str,
        status: int,
        code: str,
        message: str,
        upstream_status: int | None,
    ) -> None:
        """A request the mirror failed (5xx, or 429) because its upstream did."""
        if not self.enabled:
            return
        target: dict[str, Any] = {"repository": repository}
        target["digest" if ":" in reference else "tag"] = reference  # tags hold no ":"
        extra = {
            "upstream": upstream,
            "status": status,
            "code": code,
            "message": message,
            "upstream_status": upstream_status,
        }
        self._emit(self._event("upstream_failure", target, extra), None)

    def deleted(
        self,
        kind: Kind,
        *,
        upstream: str,
        repository: str | None,
        digest: str,
        tag: str | None = None,
        size: int | None = None,
    ) -> None:
        """Content purged on an operator's request (Distribution's delete)."""
        if not self.enabled:
            return
        target = _target(kind, repository, digest, None, size, tag, None)
        self._emit(self._event("delete", target, {"upstream": upstream, "kind": kind}), None)

    # -- queueing -----------------------------------------------------------------------

    def _event(self, action: str, target: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
        who = caller.get()
        return {
            "id": str(uuid.uuid4()),
            "timestamp": datetime.now(UTC).isoformat().replace("+00:00", "Z"),
            "action": action,
            "target": target,
            "request": {} if who is None else who.request(),
            "actor": {} if who is None else who.actor(),
            "source": self._source,
            "mirror": extra,
        }

    def _emit(
        self, body: dict[str, Any], media_type: str | None, manifest: bytes | None = None
    ) -> None:
        self._queue([Event(body, media_type, manifest if self._references else None)])

    def _queue(self, events: list[Event]) -> None:
        loop = self._loop
        if loop is None:
            return  # not started (a command that serves nothing)
        if threading.get_ident() == self._thread:
            self._offer(events)
            return
        try:
            loop.call_soon_threadsafe(self._offer, events)
        except RuntimeError:  # the loop is closed: the process is stopping
            for sender in self._senders:
                sender.dropped(len(events))

    def _offer(self, events: list[Event]) -> None:
        for event in events:
            action = event.body["action"]
            for sender in self._senders:
                if not sender.config.ignores(action, event.media_type):
                    if self._closed:
                        sender.dropped(1)
                    else:
                        sender.offer(event)

    async def _render(self, event: Event) -> dict[str, Any]:
        """The event as sent; a manifest's references are read here, off the request."""
        if event.rendered is None:
            body = event.body
            if event.manifest is not None:
                if len(event.manifest) > PARSE_INLINE_MAX:
                    refs = await asyncio.to_thread(references, event.manifest)
                else:
                    refs = references(event.manifest)
                body = {**body, "target": {**body["target"], "references": refs}}
            event.rendered = body
            event.manifest = None
        return event.rendered


def _target(
    kind: Kind,
    repository: str | None,
    digest: str,
    media_type: str | None,
    size: int | None,
    tag: str | None,
    url: str | None,
) -> dict[str, Any]:
    target: dict[str, Any] = {
        "mediaType": media_type or (BLOB_MEDIA_TYPE if kind == "blob" else None),
        "digest": digest,
    }
    if size is not None:
        # `length` is Distribution's older name for `size`: receivers read either.
        target["size"] = target["length"] = size
    if repository is not None:
        target["repository"] = repository
    if url is not None:
        target["url"] = url
    if tag is not None:
        target["tag"] = tag
    if target["mediaType"] is None:
        del target["mediaType"]
    return target


def references(manifest: bytes) -> list[dict[str, Any]]:
    """The descriptors a manifest names: config and layers, or an index's manifests."""
    try:
        document = json.loads(manifest)
    except ValueError:
        return []
    if not isinstance(document, dict):
        return []
    found = [document.get("config"), *_list(document.get("layers"))]
    found += _list(document.get("manifests"))
    return [
        {k: d[k] for k in ("mediaType", "digest", "size") if k in d}
        for d in found
        if isinstance(d, dict) and isinstance(d.get("digest"), str)
    ]


def _list(value: object) -> list[object]:
    return value if isinstance(value, list) else []


class _Sender:
    """One endpoint: its queue, and the task that POSTs it, batch after batch."""

    def __init__(
        self,
        config: NotificationEndpoint,
        metrics: Metrics,
        client: httpx.AsyncClient,
        render: Callable[[Event], Awaitable[dict[str, Any]]],
    ) -> None:
        self.config = config
        self._metrics = metrics
        self._client = client
        self._render = render
        self._queue: deque[Event] = deque()
        self._wake = asyncio.Event()
        self._closing = False
        self._failures = 0
        # Repeated values go as repeated headers, as Distribution sends them.
        self._headers = [
            (name, value.get_secret_value())
            for name, values in config.headers.items()
            for value in values
        ]
        self._headers.append(("Content-Type", MEDIA_TYPE))
        self._queued = metrics.events_queued.labels(config.name)

    def offer(self, event: Event) -> None:
        if len(self._queue) >= self.config.queue:
            # The newest goes: the front holds the batch being sent, and what was
            # accepted stays in order (a receiver sees a gap at the end, not holes).
            self.dropped(1)
            return
        self._queue.append(event)
        self._queued.inc()
        self._wake.set()

    def dropped(self, count: int) -> None:
        self._metrics.events.labels(self.config.name, "dropped").inc(count)

    def close(self) -> None:
        self._closing = True
        self._wake.set()

    def drop_all(self) -> int:
        lost = len(self._queue)
        if lost:
            self.dropped(lost)
            self._queue.clear()
        self._queued.set(0)
        return lost

    async def run(self) -> None:
        name = self.config.name
        while True:
            if not self._queue:
                if self._closing:
                    return
                self._wake.clear()
                await self._wake.wait()
                continue
            batch = list(itertools.islice(self._queue, MAX_BATCH))
            error = await self._post(batch)
            if error is None:
                # Only this task takes from the left, and offers only append: the
                # batch is still the queue's front.
                for _ in batch:
                    self._queue.popleft()
                self._queued.dec(len(batch))
                self._metrics.events.labels(name, "delivered").inc(len(batch))
                if self._failures >= self.config.threshold:
                    log.info("event endpoint %s is back: delivering again", name)
                self._failures = 0
                continue
            self._failures += 1
            if self._failures == self.config.threshold:
                log.warning(
                    "event endpoint %s failed %d times in a row (%s): retrying every %g s, "
                    "%d events queued",
                    name,
                    self._failures,
                    error,
                    self.config.backoff,
                    len(self._queue),
                )
            if self._failures >= self.config.threshold:
                # Distribution's back-off: past the threshold, one try per `backoff`.
                await asyncio.sleep(self.config.backoff)

    async def _post(self, batch: list[Event]) -> str | None:
        """POST one envelope; None when delivered, else why not (never a header)."""
        name = self.config.name
        started = time.perf_counter()
        try:
            events = [await self._render(event) for event in batch]
            body = json.dumps({"events": events}, separators=(",", ":")).encode()
            async with asyncio.timeout(self.config.timeout):
                request = self._client.build_request(
                    "POST", self.config.url, content=body, headers=self._headers
                )
                # The answer's body is not read: a receiver cannot make us buffer it.
                response = await self._client.send(request, stream=True)
                await response.aclose()
            status = response.status_code
            error = None if 200 <= status < 400 else f"HTTP {status}"
        except TimeoutError:
            error = f"no answer within {self.config.timeout:g} s"
        except httpx.HTTPError as exc:
            error = type(exc).__name__
        self._metrics.event_post_duration.labels(name).observe(time.perf_counter() - started)
        self._metrics.event_posts.labels(name, "ok" if error is None else "error").inc()
        if error is not None:
            log.debug("event endpoint %s: POST of %d events failed: %s", name, len(batch), error)
        return error
