"""The app factory. Nothing here does I/O until the lifespan starts."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path

from fastapi import FastAPI

from mirror import admin, components, probes, ui
from mirror.config import Settings
from mirror.errors import install_handlers
from mirror.metrics import Metrics
from mirror.middleware import ObserveMiddleware
from mirror.routes import peer, router
from mirror.store import Recovery

log = logging.getLogger(__name__)


def create_app(
    settings: Settings,
    *,
    clock: Callable[[], float] = time.time,
    multiprocess_dir: Path | None = None,
) -> FastAPI:
    """`multiprocess_dir` for a worker of several (mirror.supervisor): its metrics go to
    the group's files. Every process recovers the cache at start: the store's recovery
    leaves alone what live processes on the same directory own, and holding its serving
    lock is what tells a later process that this one is alive."""
    metrics = Metrics(multiprocess_dir)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        built = components.build(settings, metrics, clock)
        built.events.start()
        collector = None
        eviction = pinning = None
        try:
            log_recovery(built.store.recover())
            collector = metrics.watch_cache(
                built.store.usage, settings.max_size, settings.cache_dir
            )
            app.state.components = built
            log.info(
                "mirror ready on %s://%s%s: upstreams %s (default %s), cache %s",
                settings.scheme,
                settings.listen,
                f", admin (metrics, health) on http://{settings.admin_listen}"
                if settings.admin_listen
                else "",
                ", ".join(f"{c.name}={c.base_url}" for c in settings.resolved_upstreams()),
                settings.default_upstream_name(),
                settings.cache_dir
                if settings.store == "disk"
                else f"{settings.cache_dir} (L1) over s3 bucket {settings.s3_bucket} and redis",
            )
            # Eviction runs in the background, in a worker thread: never in a request's path.
            eviction = asyncio.create_task(built.evictor.run_forever(settings.eviction_interval))
            # Pinned images are checked as often as eviction runs.
            pinning = asyncio.create_task(built.pins.run_forever(settings.eviction_interval))
            yield
        finally:
            # Also when start-up failed half-way: nothing built is left open.
            for task in (eviction, pinning):
                if task is not None:
                    task.cancel()
                    await asyncio.gather(task, return_exceptions=True)
            await built.aclose()
            if collector is not None:
                metrics.unwatch(collector)

    app = FastAPI(lifespan=lifespan, openapi_url=None, docs_url=None, redoc_url=None)
    app.state.metrics = metrics
    app.include_router(probes.health)
    if settings.admin_listen is None:
        app.include_router(probes.metrics)
        app.include_router(admin.router(admin_listener=False))
        app.include_router(ui.router())
    app.include_router(peer)
    app.include_router(router)
    install_handlers(app)
    app.add_middleware(ObserveMiddleware, metrics=metrics, access_log=settings.access_log)
    return app


def log_recovery(report: Recovery) -> None:
    log.info(
        "cache recovered in %.2f s: %d blobs; removed %d temp files and %d orphan "
        "files, dropped %d entries without files",
        report.seconds,
        report.blobs,
        report.temp_removed,
        report.orphan_files_removed,
        report.entries_dropped,
    )


def create_admin_app(app: FastAPI) -> FastAPI:
    """The admin listener's app: the probes and /metrics of `app`, whose state it
    shares (the metrics, and the components once its lifespan built them)."""
    served = FastAPI(openapi_url=None, docs_url=None, redoc_url=None)
    served.state = app.state
    served.include_router(probes.health)
    served.include_router(probes.metrics)
    served.include_router(admin.router(admin_listener=True))
    served.include_router(peer)
    served.include_router(ui.router())
    install_handlers(served)
    return served
