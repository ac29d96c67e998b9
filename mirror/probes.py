"""The operational endpoints, /healthz, /readyz and /metrics: on the registry
listener, or on the admin listener (`admin_listen`) when there is one. Handlers read
only `app.state`, which the admin app shares with the registry app."""

from __future__ import annotations

import asyncio
import json

from fastapi import APIRouter, Request
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.responses import Response

from mirror.components import Components
from mirror.metrics import Metrics

health = APIRouter()
metrics = APIRouter()


@health.api_route("/healthz", methods=["GET", "HEAD"])
async def healthz(request: Request) -> Response:
    """Liveness: the process answers. Nothing else, so a slow disk or a down upstream
    never gets a working mirror restarted."""
    request.state.route = "/healthz"
    return Response(b'{"status":"ok"}', media_type="application/json")


@health.api_route("/readyz", methods=["GET", "HEAD"])
async def readyz(request: Request) -> Response:
    """Readiness: settings loaded and the cache usable. Upstream trouble and a full
    disk do not count: a mirror that can serve from its cache (and stale tags, and
    stream uncached) should get traffic."""
    request.state.route = "/readyz"
    built: Components | None = getattr(request.app.state, "components", None)
    ready = built is not None
    checks = {"settings": "ok" if ready else "not loaded"}
    if built is not None:
        usable, checks["cache"] = await asyncio.to_thread(built.store.probe)
        ready = ready and usable
    body = json.dumps({"status": "ready" if ready else "not ready", "checks": checks})
    return Response(body.encode(), status_code=200 if ready else 503, media_type="application/json")


@metrics.get("/metrics")
async def render_metrics(request: Request) -> Response:
    request.state.route = "/metrics"
    # Built with the app, before the lifespan: /metrics answers even while starting.
    registry: Metrics = request.app.state.metrics
    return Response(registry.render(), media_type=CONTENT_TYPE_LATEST)
