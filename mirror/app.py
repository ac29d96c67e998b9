"""The app factory. Nothing here does I/O until the lifespan starts."""

from __future__ import annotations

import asyncio
import logging
import ssl
import time
from collections.abc import AsyncIterator, Callable, Iterable
from contextlib import asynccontextmanager
from dataclasses import dataclass

import httpx
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException
from starlette.responses import Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from mirror import logs
from mirror.config import Settings, UpstreamSettings
from mirror.downloads import Downloads
from mirror.errors import AbortResponse, RegistryError
from mirror.eviction import Evictor
from mirror.metrics import Metrics
from mirror.policy import RepoPolicy
from mirror.proxy import Proxy
from mirror.routes import router
from mirror.storage import Storage
from mirror.upstream import Credentials, Upstream, make_client
from mirror.upstreams import Upstreams

log = logging.getLogger(__name__)

API_VERSION_HEADER = (b"docker-distribution-api-version", b"registry/2.0")


@dataclass
class Services:
    """Everything a request handler may use; built in the lifespan."""

    settings: Settings
    metrics: Metrics
    upstreams: Upstreams
    storage: Storage


def create_app(settings: Settings, *, clock: Callable[[], float] = time.time) -> FastAPI:
    metrics = Metrics()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        storage = Storage(settings.cache_dir, clock)
        report = storage.recover()
        log.info(
            "cache recovered in %.2f s: %d blobs; removed %d temp files and %d orphan "
            "files, dropped %d entries without files",
            report.seconds,
            report.blobs,
            report.temp_removed,
            report.orphan_files_removed,
            report.entries_dropped,
        )
        cache_collector = metrics.watch_cache(storage.usage, settings.max_size, settings.cache_dir)
        downloads = Downloads(storage, metrics, resume_attempts=settings.resume_attempts)
        configured = settings.resolved_upstreams()
        freshness = settings.freshness()
        evictor = Evictor(
            storage,
            metrics,
            content_ttl=settings.content_ttl,
            max_size=settings.max_size,
            # A tag is kept as long as any upstream may still serve it stale.
            max_stale=max(u.freshness(freshness).max_stale for u in configured),
            clock=clock,
        )
        clients = [
            make_client(settings.connect_timeout, settings.read_timeout, verify=_tls(c))
            for c in configured
        ]
        upstreams = _upstreams(
            settings,
            zip(configured, clients, strict=True),
            storage,
            downloads,
            evictor,
            metrics,
            clock,
        )
        app.state.services = Services(settings, metrics, upstreams, storage)
        log.info(
            "mirror ready: upstreams %s (default %s), cache %s",
            ", ".join(f"{c.name}={c.base_url}" for c in configured),
            settings.default_upstream_name(),
            settings.cache_dir,
        )
        app.state.evictor = evictor
        # Eviction runs in the background, in a worker thread: never in a request's path.
        eviction = asyncio.create_task(evictor.run_forever(settings.eviction_interval))
        try:
            yield
        finally:
            eviction.cancel()
            await asyncio.gather(eviction, return_exceptions=True)
            await upstreams.aclose()
            await downloads.aclose()
            for client in clients:
                await client.aclose()
            metrics.registry.unregister(cache_collector)
            storage.close()

    app = FastAPI(lifespan=lifespan, openapi_url=None, docs_url=None, redoc_url=None)
    app.state.metrics = metrics
    app.include_router(router)
    app.add_exception_handler(RegistryError, _registry_error)  # type: ignore[arg-type]
    app.add_exception_handler(HTTPException, _http_error)  # type: ignore[arg-type]
    app.add_exception_handler(RequestValidationError, _validation_error)  # type: ignore[arg-type]
    app.add_exception_handler(Exception, _unexpected_error)
    app.add_middleware(ObserveMiddleware, metrics=metrics, access_log=settings.access_log)
    return app


def _upstreams(
    settings: Settings,
    configured: Iterable[tuple[UpstreamSettings, httpx.AsyncClient]],
    storage: Storage,
    downloads: Downloads,
    evictor: Evictor,
    metrics: Metrics,
    clock: Callable[[], float],
) -> Upstreams:
    """One Proxy per configured upstream, each with its own client and credentials;
    storage, downloads and eviction are shared."""
    pairs = list(configured)
    urls = [c.base_url for c, _ in pairs]
    freshness = settings.freshness()
    proxies: dict[str, Proxy] = {}
    for config, client in pairs:
        secret = config.secret()
        credentials = Credentials(config.username, secret) if config.username and secret else None
        upstream = Upstream(
            config.base_url,
            client,
            metrics,
            name=config.name,
            credentials=credentials,
            token_hosts=tuple(config.token_hosts),
            other_upstreams=tuple(u for u in urls if u != config.base_url),
        )
        metrics.add_upstream(config.name)
        proxies[config.name] = Proxy(
            storage,
            upstream,
            downloads,
            metrics,
            freshness=config.freshness(freshness),
            policy=RepoPolicy(config.patterns(config.allow), config.patterns(config.deny)),
            manifest_max_bytes=settings.manifest_max_bytes,
            touch=evictor.touch,
            clock=clock,
        )
    configs = [c for c, _ in pairs]
    return Upstreams(
        proxies,
        settings.default_upstream_name(),
        {c.path_prefix: c.name for c in configs if c.path_prefix},
        {alias: c.name for c in configs for alias in c.aliases},
    )


def _tls(config: UpstreamSettings) -> ssl.SSLContext | bool:
    if config.insecure_skip_verify:
        log.warning("TLS verification is off for upstream %s", config.name)
        return False
    if config.ca_bundle is not None:
        return ssl.create_default_context(cafile=str(config.ca_bundle))
    return True


def error_response(err: RegistryError) -> Response:
    return Response(
        err.body(), status_code=err.status, media_type="application/json", headers=err.headers
    )


async def _registry_error(request: Request, exc: RegistryError) -> Response:
    return error_response(exc)


async def _http_error(request: Request, exc: HTTPException) -> Response:
    if exc.status_code == 405:
        return error_response(
            RegistryError("UNSUPPORTED", "method not allowed: this mirror is read-only")
        )
    if exc.status_code == 404:
        return error_response(RegistryError("NAME_UNKNOWN", "no such endpoint", status=404))
    return error_response(RegistryError("UNKNOWN", str(exc.detail), status=exc.status_code))


async def _validation_error(request: Request, exc: RequestValidationError) -> Response:
    return error_response(
        RegistryError(
            "UNSUPPORTED", "invalid request parameters", detail=str(exc.errors())[:500], status=400
        )
    )


async def _unexpected_error(request: Request, exc: Exception) -> Response:
    log.exception("unexpected error on %s %s", request.method, logs.printable(request.url.path))
    return error_response(RegistryError("UNKNOWN", "internal error"))


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
