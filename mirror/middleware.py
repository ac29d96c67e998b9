"""The one middleware: every request counted, timed and logged by route template."""

from __future__ import annotations

import logging
import time

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from mirror import logs, zerocopy
from mirror.errors import AbortResponse
from mirror.metrics import Metrics

log = logging.getLogger(__name__)

API_VERSION_HEADER = (b"docker-distribution-api-version", b"registry/2.0")


class ObserveMiddleware:
    """Counts, times and logs every request by route template; marks /v2 responses.

    Pure ASGI (not BaseHTTPMiddleware) so streamed blob bodies pass through
    untouched. Handlers set `request.state.route` (unknown paths count as "other")
    and fill in the request's `RequestLog`; one access-log line is written when the
    response ends, and the request id goes back to the client as `X-Request-Id`.
    """

    def __init__(self, app: ASGIApp, metrics: Metrics, access_log: bool = True) -> None:
        self.app = app
        self.metrics = metrics
        self.access_log = access_log

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        scope.setdefault("state", {})
        is_v2 = scope["path"].startswith("/v2")
        incoming = None
        for key, value in scope["headers"]:
            if key == b"x-request-id":
                incoming = value.decode("latin-1")
        target = scope["path"]
        if query := scope.get("query_string", b""):
            target += "?" + query.decode("latin-1")
        target = logs.printable(target)  # a decoded %0A must not split a log line
        record = logs.RequestLog(logs.request_id(incoming), scope["method"], target)
        token = logs.current.set(record)

        async def observed_send(message: Message) -> None:
            if message["type"] == "http.response.start":
                record.status = message["status"]
                headers = [
                    *message.get("headers", []),
                    (b"x-request-id", record.request_id.encode()),
                ]
                if is_v2:
                    headers.append(API_VERSION_HEADER)
                message["headers"] = headers
                for key, value in headers:
                    if key == b"x-cache":
                        record.cache = value.decode("latin-1")
            elif message["type"] == "http.response.body":
                record.bytes += len(message.get("body", b""))
            elif message["type"] == zerocopy.MESSAGE:
                await send(message)  # raises if the client left: those bytes never went
                record.bytes += message.get("count") or 0
                return
            await send(message)

        try:
            await self.app(scope, receive, observed_send)
        except AbortResponse as exc:
            # Returning without completing the body makes uvicorn close the connection,
            # so the client sees a broken transfer, never a short "complete" one.
            log.warning("aborted %s %s: %s", scope["method"], record.path, exc)
            record.status = record.status or 502
        finally:
            logs.current.reset(token)
            duration = time.perf_counter() - started
            record.route = scope["state"].get("route", "other")
            status = str(record.status or 500)
            self.metrics.requests.labels(record.route, scope["method"], status).inc()
            self.metrics.request_duration.labels(record.route).observe(duration)
            if self.access_log:
                logs.log_access(record, duration)
