"""An upstream at the socket level, for faults no HTTP server library would send.

Each request's answer is a script the test writes: raw bytes (valid HTTP or not),
pauses, and where to close the connection. Connections are kept alive between
requests unless a script closes them, so stray bytes on an idle pooled connection can
be sent too (`Script.after`).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

# A step: bytes to write, seconds to pause, or None to close the connection.
Step = bytes | float | None


@dataclass
class Request:
    method: str
    path: str
    headers: dict[str, str]


@dataclass
class Script:
    steps: list[Step]
    # Written a moment after the answer, on the now idle connection.
    after: bytes = b""


Answer = Callable[[Request], Script]


@dataclass
class RawUpstream:
    answer: Answer
    requests: list[Request] = field(default_factory=list)
    connections: int = 0
    after_sent: asyncio.Event = field(default_factory=asyncio.Event)

    @contextlib.asynccontextmanager
    async def serve(self) -> AsyncIterator[str]:
        server = await asyncio.start_server(self._connection, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        try:
            yield f"http://127.0.0.1:{port}"
        finally:
            server.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(server.wait_closed(), 2)

    def count(self, method: str, suffix: str) -> int:
        return sum(1 for r in self.requests if r.method == method and r.path.endswith(suffix))

    async def _connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            while True:
                try:
                    head = await reader.readuntil(b"\r\n\r\n")
                except (asyncio.IncompleteReadError, ConnectionError):
                    return
                lines = head.decode("latin-1").split("\r\n")
                method, path, _ = lines[0].split(" ", 2)
                headers = {}
                for line in lines[1:]:
                    if ":" in line:
                        k, v = line.split(":", 1)
                        headers[k.strip().lower()] = v.strip()
                request = Request(method, path, headers)
                self.requests.append(request)
                script = self.answer(request)
                for step in script.steps:
                    if step is None:
                        writer.close()
                        return
                    if isinstance(step, float):
                        await asyncio.sleep(step)
                    else:
                        writer.write(step)
                        await writer.drain()
                if script.after:
                    await asyncio.sleep(0.05)
                    writer.write(script.after)
                    await writer.drain()
                    self.after_sent.set()
        except ConnectionError:
            return
        finally:
            writer.close()


def response(
    status: int = 200,
    body: bytes = b"",
    headers: dict[str, str] | None = None,
    *,
    length: bool = True,
    reason: bytes = b"OK",
) -> bytes:
    """One well-formed HTTP/1.1 response (pieces of it can be broken by the test)."""
    lines = [b"HTTP/1.1 %d %s" % (status, reason)]
    for k, v in (headers or {}).items():
        lines.append(f"{k}: {v}".encode("latin-1"))
    if length:
        lines.append(b"content-length: %d" % len(body))
    return b"\r\n".join(lines) + b"\r\n\r\n" + body


OCI = "application/vnd.oci.image.manifest.v1+json"


def manifest(tag: str = "x") -> tuple[bytes, str]:
    """An OCI manifest body and its digest."""
    body = json.dumps(
        {
            "schemaVersion": 2,
            "mediaType": OCI,
            "config": {
                "mediaType": "application/vnd.oci.image.config.v1+json",
                "size": 2,
                "digest": "sha256:" + hashlib.sha256(tag.encode()).hexdigest(),
            },
            "layers": [],
        }
    ).encode()
    return body, "sha256:" + hashlib.sha256(body).hexdigest()


def manifest_response(body: bytes, digest: str, *, head: bool = False) -> bytes:
    headers = {"content-type": OCI, "docker-content-digest": digest}
    if head:
        return response(200, b"", {**headers, "content-length": str(len(body))}, length=False)
    return response(200, body, headers)
