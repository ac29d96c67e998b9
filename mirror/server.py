"""Running the app under uvicorn, with the shutdown an orchestrator expects.

On SIGTERM (docker stop, a Kubernetes pod deletion): stop accepting connections, let
the responses in flight finish for up to `shutdown_timeout`, cancel what is left (a
cancelled download is discarded, never committed), run the lifespan shutdown, and
exit 0. uvicorn itself re-raises the SIGTERM after its graceful shutdown, so the
process would "die" of the signal (exit 143) and look like a crash.

With `admin_listen`, a second uvicorn server in the same event loop serves the probes
and /metrics; it stops when the registry server has. With TLS, the registry server
uses the context of `mirror.tls`, which a task in the same loop keeps fresh.

A worker of several (`workers`, mirror.supervisor) runs the same, on sockets its
supervisor bound, with a task beside the servers that reports to the supervisor.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import socket
from collections.abc import Callable, Coroutine, Iterator
from types import FrameType
from typing import Any

import uvicorn
from fastapi import FastAPI

from mirror.app import create_admin_app
from mirror.config import Settings, host_port
from mirror.listener import Limits
from mirror.metrics import Metrics
from mirror.tls import ServerTLS


class GracefulServer(uvicorn.Server):
    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if sig == signal.SIGTERM and not self.should_exit:
            self.should_exit = True  # a clean stop, not re-raised; a second one forces
            return
        super().handle_exit(sig, frame)


class WorkerServer(GracefulServer):
    """A worker's server: its supervisor decides when the group stops. A ^C in a
    terminal reaches every process of the group, and the supervisor turns it into one
    SIGTERM per worker: the worker's own SIGINT would be a second signal, which forces
    the exit instead of draining."""

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if sig == signal.SIGINT:
            return
        super().handle_exit(sig, frame)


class AdminServer(uvicorn.Server):
    """The admin listener's server. Signals are the registry server's: two servers
    installing handlers for the same signals would take them from each other."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


def _limits(settings: Settings, metrics: Metrics) -> Limits:
    return Limits(
        metrics,
        max_connections=settings.max_connections,
        header_timeout=settings.header_timeout,
        max_header_bytes=settings.max_header_bytes,
    )


def uvicorn_config(
    app: FastAPI, settings: Settings, metrics: Metrics, tls: ServerTLS | None = None
) -> uvicorn.Config:
    host, port = host_port(settings.listen)
    return uvicorn.Config(
        app,
        host=host,
        port=port,
        http=_limits(settings, metrics).protocol(),
        # uvicorn's hook for a context of one's own: the one object mirror.tls reloads.
        ssl_context_factory=None if tls is None else (lambda _config, _default: tls.context),
        log_level=settings.log_level,
        log_config=None,  # ours (mirror.logs), text or JSON, for uvicorn's records too
        access_log=False,  # the mirror writes its own, richer access log
        server_header=False,
        timeout_graceful_shutdown=max(1, round(settings.shutdown_timeout)),
    )


def bind(listen: str) -> socket.socket:
    """The listening socket, bound now (OSError if the address is taken or not ours)."""
    host, port = host_port(listen)
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(2048)
    except OSError:
        sock.close()
        raise
    sock.set_inheritable(True)
    return sock


def admin_config(app: FastAPI, settings: Settings, metrics: Metrics) -> uvicorn.Config:
    assert settings.admin_listen is not None
    host, port = host_port(settings.admin_listen)
    return uvicorn.Config(
        create_admin_app(app),
        host=host,
        port=port,
        http=_limits(settings, metrics).protocol(),
        lifespan="off",  # the registry app's lifespan builds what both serve
        log_level=settings.log_level,
        log_config=None,
        access_log=False,
        server_header=False,
        timeout_graceful_shutdown=5,  # scrapes and probes are quick
    )


async def started(server: uvicorn.Server) -> bool:
    """Wait until `server` accepts connections; False if it is stopping instead.
    uvicorn has no "started" event to await: its flag is polled, briefly."""
    while not server.started:
        if server.should_exit:
            return False
        await asyncio.sleep(0.02)
    return True


def serve_app(
    app: FastAPI,
    settings: Settings,
    sock: socket.socket,
    *,
    admin_sock: socket.socket | None = None,
    tls: ServerTLS | None = None,
    supervised: Callable[[uvicorn.Server], Coroutine[Any, Any, None]] | None = None,
    admin_after_start: bool = False,
) -> bool:
    """Serve until stopped; whether the server had started (False: start-up failed).
    `supervised`: a worker's link to its supervisor, run beside the servers;
    `admin_after_start`: the admin listener accepts only once the registry one does."""
    metrics: Metrics = app.state.metrics
    server_class = GracefulServer if supervised is None else WorkerServer
    server = server_class(uvicorn_config(app, settings, metrics, tls))
    admin = None if admin_sock is None else AdminServer(admin_config(app, settings, metrics))

    async def serve_admin(admin: AdminServer, admin_sock: socket.socket) -> None:
        if admin_after_start and not await started(server):
            return
        await admin.serve(sockets=[admin_sock])

    async def serve() -> None:
        beside: list[asyncio.Task[None]] = []
        if admin is not None and admin_sock is not None:
            beside.append(asyncio.create_task(serve_admin(admin, admin_sock)))
        reload = None
        if tls is not None:
            reload = asyncio.create_task(tls.keep_fresh(metrics, settings.tls_reload_interval))
            beside.append(reload)
        link: asyncio.Task[None] | None = None
        if supervised is not None:
            link = asyncio.create_task(supervised(server))
            beside.append(link)
        try:
            await server.serve(sockets=[sock])
        finally:
            if admin is not None:
                admin.should_exit = True  # it drains its own (short) requests first
            for task in (reload, link):
                if task is not None:
                    task.cancel()
            await asyncio.gather(*beside, return_exceptions=True)

    # As uvicorn's Server.run, with the same loop (uvloop when installed).
    with asyncio.Runner(loop_factory=server.config.get_loop_factory()) as runner:
        runner.run(serve())
    return server.started
