"""A Docker-Hub-like front before the real registry: the same answers, plus Hub's pull quota.

The real Distribution registry knows nothing of rate limits, so a mirror's budget logic
could only meet `ratelimit-*` headers in fakes. This reverse proxy forwards every request
to the registry unchanged and, on manifest requests, counts Hub's pulls
(`fakes.quota.Quota`): it adds the `ratelimit-*` headers to the answer, and once the
quota is spent it answers 429 itself, without the registry ever seeing the request.

It runs its own event loop in a thread (like `throttle.ThrottledRelay`), so tests may
block (start processes, run skopeo) while it serves. `seen` records every request it
answered, so a test counts what the mirror asked of "Docker Hub".
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import json
import re
import threading
from collections.abc import AsyncIterator
from dataclasses import dataclass
from types import TracebackType
from typing import Self

import httpx
from fakes.quota import Quota
from fakes.server import serve
from starlette.types import Message, Receive, Scope, Send

_MANIFEST_PATH = re.compile(r"^/v2/.+/manifests/[^/]+$")
# Meaningful for one connection only (RFC 9110 7.6.1); the front has two of its own.
_HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-authenticate",
        "proxy-authorization",
        "proxy-connection",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
    }
)
_REFUSAL = json.dumps(
    {"errors": [{"code": "TOOMANYREQUESTS", "message": "You have reached your pull rate limit."}]}
).encode()


@dataclass(frozen=True)
class Seen:
    method: str
    path: str
    status: int  # what the front answered (429 for a refusal of its own)


class HubFront:
    """`with HubFront(registry.url, Quota(...)) as front:` then point the mirror at front.url."""

    def __init__(self, target: str, quota: Quota) -> None:
        self.target = target.rstrip("/")
        self.quota = quota
        self.seen: list[Seen] = []
        self.url = ""
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._stop: asyncio.Event | None = None
        self._serving: concurrent.futures.Future[None] | None = None
        self._client: httpx.AsyncClient | None = None

    @property
    def host(self) -> str:
        """host:port, the name the mirror gives this upstream (its metrics' label)."""
        return self.url.removeprefix("http://")

    def count(self, method: str, path: str, status: int | None = None) -> int:
        """Requests seen for exactly `path` (and answered `status`, if given)."""
        return sum(
            1
            for s in list(self.seen)
            if s.method == method and s.path == path and status in (None, s.status)
        )

    def __enter__(self) -> Self:
        self._thread.start()
        started: concurrent.futures.Future[str] = concurrent.futures.Future()
        self._serving = asyncio.run_coroutine_threadsafe(self._run(started), self._loop)
        try:
            self.url = started.result(10)
        except BaseException:
            self._shut_loop()
            raise
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        assert self._stop is not None and self._serving is not None
        self._loop.call_soon_threadsafe(self._stop.set)
        try:
            self._serving.result(15)
        finally:
            self._shut_loop()

    def _shut_loop(self) -> None:
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
        self._loop.close()

    async def _run(self, started: concurrent.futures.Future[str]) -> None:
        self._stop = asyncio.Event()
        try:
            async with (
                httpx.AsyncClient(timeout=60, follow_redirects=False) as client,
                serve(self, lifespan="off") as url,
            ):
                self._client = client
                started.set_result(url)
                await self._stop.wait()
        except BaseException as err:
            if not started.done():
                started.set_exception(err)
            raise

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        # The ASGI app itself: uvicorn tells ASGI 3 by a coroutine `__call__`, which a
        # bound method is not.
        if scope["type"] != "http":
            return
        method: str = scope["method"]
        path: str = scope["path"]
        headers = [(k.decode("latin-1"), v.decode("latin-1")) for k, v in scope["headers"]]
        is_manifest = _MANIFEST_PATH.match(path) is not None
        # Without a token the registry can only answer its 401 challenge, which Hub does
        # not count either; every client's first try is such a request.
        counted = is_manifest and any(k.lower() == "authorization" for k, _ in headers)
        if counted and self.quota.take(method) == 429:
            self.seen.append(Seen(method, path, 429))
            await self._refuse(send)
            return
        await self._forward(scope, receive, send, headers, manifest=is_manifest, counted=counted)

    async def _refuse(self, send: Send) -> None:
        extra = [(k.encode(), v.encode()) for k, v in self.quota.refusal_headers().items()]
        await send(
            {
                "type": "http.response.start",
                "status": 429,
                "headers": [
                    (b"content-type", b"application/json"),
                    (b"content-length", str(len(_REFUSAL)).encode()),
                    *extra,
                ],
            }
        )
        await send({"type": "http.response.body", "body": _REFUSAL})

    async def _forward(
        self,
        scope: Scope,
        receive: Receive,
        send: Send,
        headers: list[tuple[str, str]],
        *,
        manifest: bool,
        counted: bool,
    ) -> None:
        assert self._client is not None
        method: str = scope["method"]
        query = scope["query_string"].decode("latin-1")
        url = self.target + scope["raw_path"].decode("latin-1") + (f"?{query}" if query else "")
        # Host is kept: the registry then builds its absolute URLs (upload locations)
        # for the address the client used, as behind any reverse proxy.
        forwarded = [(k, v) for k, v in headers if k.lower() not in _HOP_BY_HOP]
        has_body = any(k.lower() in ("content-length", "transfer-encoding") for k, _ in headers)
        request = self._client.build_request(
            method, url, headers=forwarded, content=_body(receive) if has_body else None
        )
        response = await self._client.send(request, stream=True)
        try:
            status = response.status_code
            if counted and method == "GET" and status == 401:
                # A rejected (expired, wrong-scope) token earned no pull: give it back.
                self.quota.remaining += 1
                self.quota.gets -= 1
            # Raw bytes: the registry's own encoding and Content-Length pass through.
            out = [
                (k.encode("latin-1"), v.encode("latin-1"))
                for k, v in response.headers.multi_items()
                if k.lower() not in _HOP_BY_HOP and k.lower() != "date"  # uvicorn adds its own
            ]
            if manifest:
                out += [(k.encode(), v.encode()) for k, v in self.quota.headers().items()]
            # Recorded before the client can read the answer, so a test that has it
            # finds the request in `seen`.
            self.seen.append(Seen(method, scope["path"], status))
            await send({"type": "http.response.start", "status": status, "headers": out})
            async for chunk in response.aiter_raw():
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
            await send({"type": "http.response.body", "body": b""})
        finally:
            await response.aclose()


async def _body(receive: Receive) -> AsyncIterator[bytes]:
    while True:
        message: Message = await receive()
        if message["type"] != "http.request":
            return  # the client went away
        yield message.get("body", b"")
        if not message.get("more_body", False):
            return
