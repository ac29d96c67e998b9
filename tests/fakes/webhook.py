"""An in-process webhook receiver: records each POST, answers as the test says."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

from starlette.types import Receive, Scope, Send


@dataclass
class Delivery:
    path: str
    headers: dict[str, list[str]]
    body: dict[str, Any]

    @property
    def events(self) -> list[dict[str, Any]]:
        events: list[dict[str, Any]] = self.body["events"]
        return events


@dataclass
class Receiver:
    deliveries: list[Delivery] = field(default_factory=list)
    # Statuses for the next POSTs, in order; then 200.
    statuses: list[int] = field(default_factory=list)
    gate: asyncio.Event | None = None  # when set, each answer waits for it
    attempts: int = 0
    arrived: asyncio.Event = field(default_factory=asyncio.Event)

    @property
    def events(self) -> list[dict[str, Any]]:
        return [e for d in self.deliveries for e in d.events]

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return
        body = b""
        while True:
            message = await receive()
            body += message.get("body", b"")
            if not message.get("more_body"):
                break
        self.attempts += 1
        if self.gate is not None:
            await self.gate.wait()
        status = self.statuses.pop(0) if self.statuses else 200
        if status < 300:
            headers: dict[str, list[str]] = {}
            for name, value in scope["headers"]:
                headers.setdefault(name.decode().lower(), []).append(value.decode())
            self.deliveries.append(Delivery(scope["path"], headers, json.loads(body)))
            self.arrived.set()
        await send({"type": "http.response.start", "status": status, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})


@asynccontextmanager
async def stalled() -> AsyncIterator[str]:
    """A receiver that accepts connections and never answers; yields its URL."""
    held: list[asyncio.StreamWriter] = []

    async def hold(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        held.append(writer)

    server = await asyncio.start_server(hold, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}/events"
    finally:
        for writer in held:
            writer.close()
        server.close()
        await server.wait_closed()
