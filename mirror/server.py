"""Running the app under uvicorn, with the shutdown an orchestrator expects.

On SIGTERM (docker stop, a Kubernetes pod deletion): stop accepting connections, let
the responses in flight finish for up to `shutdown_timeout`, cancel what is left (a
cancelled download is discarded, never committed), run the lifespan shutdown, and
exit 0. uvicorn itself re-raises the SIGTERM after its graceful shutdown, so the
process would "die" of the signal (exit 143) and look like a crash.
"""

from __future__ import annotations

import signal
import socket
from types import FrameType

import uvicorn
from fastapi import FastAPI

from mirror.config import Settings, host_port
from mirror.listener import Limits
from mirror.metrics import Metrics


class GracefulServer(uvicorn.Server):
    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if sig == signal.SIGTERM and not self.should_exit:
            self.should_exit = True  # a clean stop, not re-raised; a second one forces
            return
        super().handle_exit(sig, frame)


def uvicorn_config(app: FastAPI, settings: Settings, metrics: Metrics) -> uvicorn.Config:
    host, port = host_port(settings.listen)
    limits = Limits(
        metrics,
        max_connections=settings.max_connections,
        header_timeout=settings.header_timeout,
        max_header_bytes=settings.max_header_bytes,
    )
    return uvicorn.Config(
        app,
        host=host,
        port=port,
        http=limits.protocol(),
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


def serve_app(app: FastAPI, settings: Settings, sock: socket.socket) -> None:
    GracefulServer(uvicorn_config(app, settings, app.state.metrics)).run(sockets=[sock])
