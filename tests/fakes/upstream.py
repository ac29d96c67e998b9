"""A small in-process upstream for faults a real registry cannot produce.

It speaks just enough of the registry API (manifests and blobs by digest or tag,
optional Docker-Hub-style bearer auth) and records every request it receives.
Faults are switched per blob: wrong bytes, a cut connection, 429, a redirect.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qsl

from starlette.types import Receive, Scope, Send

from fakes.quota import Quota


def sha256(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


@dataclass
class Seen:
    method: str
    path: str
    headers: dict[str, str]
    query: str = ""


@dataclass
class Fault:
    wrong_bytes: bool = False  # serve other bytes under the digest
    cut_after: int | None = None  # close the connection after this many body bytes
    cut_times: int = 1  # how many requests get cut before the body flows fully
    status: int | None = None  # answer with this status (e.g. 429)
    retry_after: str | None = None
    redirect_to: str | None = None  # 307 to this base URL + path
    chunk: int = 64 * 1024
    delay: float = 0.0  # pause between chunks, seconds
    chunked: bool = False  # no Content-Length: the body's end is the end of the stream
    hold_last: asyncio.Event | None = None  # send all but the last byte until it is set


@dataclass
class FakeUpstream:
    blobs: dict[str, bytes] = field(default_factory=dict)
    manifests: dict[str, tuple[str, bytes]] = field(default_factory=dict)  # ref -> (type, body)
    faults: dict[str, Fault] = field(default_factory=dict)
    token: str | None = None  # when set, require `Bearer <token>`
    requests: list[Seen] = field(default_factory=list)
    token_requests: list[Seen] = field(default_factory=list)
    realm: str = ""  # set by the test once the server's URL is known
    token_response: dict[str, Any] | None = None  # default: {"token": ..., "expires_in": 300}
    deny_repos: set[str] = field(default_factory=set)  # 404 (after 0.2 s) for these
    hidden_repos: set[str] = field(default_factory=set)  # 404 at once for everything
    manifest_delay: float = 0.0  # seconds before answering a manifest request
    manifest_gate: asyncio.Event | None = None  # manifest answers wait until it is set
    rate_limit: tuple[str, str] | None = None  # (ratelimit-limit, ratelimit-remaining)
    quota: Quota | None = None  # Docker Hub's pull limit, counted down per manifest GET
    # The referrers API: subject digest -> descriptors. None: no such API (404, as
    # Distribution 2.x). A fault keyed "referrers:<digest>" applies to it.
    referrers: dict[str, list[dict[str, Any]]] | None = None

    def add_blob(self, data: bytes) -> str:
        digest = sha256(data)
        self.blobs[digest] = data
        return digest

    def add_manifest(
        self, media_type: str, manifest: dict[str, Any], tag: str | None = None
    ) -> str:
        body = json.dumps(manifest).encode()
        digest = sha256(body)
        self.manifests[digest] = (media_type, body)
        if tag:
            self.manifests[tag] = (media_type, body)
        return digest

    def count(self, method: str, path_suffix: str) -> int:
        return sum(1 for r in self.requests if r.method == method and r.path.endswith(path_suffix))

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            while (msg := await receive())["type"] != "lifespan.shutdown":
                await send({"type": msg["type"] + ".complete"})
            await send({"type": "lifespan.shutdown.complete"})
            return
        headers = {k.decode().lower(): v.decode() for k, v in scope["headers"]}
        seen = Seen(scope["method"], scope["path"], headers, scope["query_string"].decode())
        if scope["path"] == "/token":
            self.token_requests.append(seen)
            answer = self.token_response or {"token": self.token, "expires_in": 300}
            body = json.dumps(answer).encode()
            await _respond(send, 200, body, {"content-type": "application/json"})
            return
        self.requests.append(seen)
        if self.token and headers.get("authorization") != f"Bearer {self.token}":
            repo = scope["path"][4:].rsplit("/", 2)[0]
            scope_ = f"repository:{repo}:pull"
            challenge = f'Bearer realm="{self.realm}",service="fake",scope="{scope_}"'
            await _respond(send, 401, b"{}", {"www-authenticate": challenge})
            return
        if scope["path"].endswith("/tags/list"):
            repo = scope["path"][4 : -len("/tags/list")]
            body = json.dumps({"name": repo, "tags": ["a", "b"]}).encode()
            link = f'</v2/{repo}/tags/list?last=b&n=2>; rel="next"'
            await _respond(send, 200, body, {"content-type": "application/json", "link": link})
            return
        parts = scope["path"].split("/")
        ref = parts[-1]
        if scope["path"][4:].rsplit("/", 2)[0] in self.hidden_repos:
            await _respond(send, 404, b'{"errors":[{"code":"NAME_UNKNOWN"}]}', {})
            return
        if "/referrers/" in scope["path"]:
            await self._referrers(send, ref, seen.query)
            return
        if "/manifests/" in scope["path"]:
            await asyncio.sleep(self.manifest_delay)
            if self.manifest_gate is not None:
                await self.manifest_gate.wait()
            if ref not in self.manifests:
                await _respond(send, 404, b'{"errors":[{"code":"MANIFEST_UNKNOWN"}]}', {})
                return
            media_type, body = self.manifests[ref]
            digest = sha256(body)
            fault = self.faults.get(ref) or Fault()
            if self.quota is not None and self.quota.take(scope["method"]) == 429:
                body = b'{"errors":[{"code":"TOOMANYREQUESTS"}]}'
                await _respond(send, 429, body, self.quota.refusal_headers())
                return
            if fault.status is not None:
                extra = {"retry-after": fault.retry_after} if fault.retry_after else {}
                await _respond(send, fault.status, b'{"errors":[{"code":"UNAVAILABLE"}]}', extra)
                return
            if fault.wrong_bytes:
                body = body.replace(b"}", b" }", 1)
            hdrs = {"content-type": media_type, "docker-content-digest": digest}
            if self.rate_limit:
                hdrs["ratelimit-limit"], hdrs["ratelimit-remaining"] = self.rate_limit
            if self.quota is not None:
                hdrs.update(self.quota.headers())
            head = scope["method"] == "HEAD"
            await _respond(send, 200, b"" if head else body, hdrs, length=len(body))
            return
        if "/blobs/" in scope["path"] or scope["path"].startswith("/cdn/"):
            await self._blob(scope, send, ref, headers)
            return
        await _respond(send, 404, b"{}", {})

    async def _referrers(self, send: Send, digest: str, query: str) -> None:
        fault = self.faults.get(f"referrers:{digest}") or Fault()
        if fault.status is not None:
            await _respond(send, fault.status, b'{"errors":[{"code":"UNAVAILABLE"}]}', {})
            return
        if self.referrers is None:
            await _respond(send, 404, b"404 page not found", {})
            return
        listed = self.referrers.get(digest, [])
        hdrs = {"content-type": "application/vnd.oci.image.index.v1+json"}
        wanted = dict(parse_qsl(query)).get("artifactType")
        if wanted is not None:  # as a registry that filters does
            listed = [d for d in listed if d.get("artifactType") == wanted]
            hdrs["oci-filters-applied"] = "artifactType"
        index = {"schemaVersion": 2, "mediaType": hdrs["content-type"], "manifests": listed}
        await _respond(send, 200, json.dumps(index).encode(), hdrs)

    async def _blob(self, scope: Scope, send: Send, digest: str, headers: dict[str, str]) -> None:
        fault = self.faults.get(digest) or Fault()
        if fault.status is not None:
            extra = {"retry-after": fault.retry_after} if fault.retry_after else {}
            await _respond(send, fault.status, b'{"errors":[{"code":"TOOMANYREQUESTS"}]}', extra)
            return
        if fault.redirect_to and not scope["path"].startswith("/cdn/"):
            await _respond(send, 307, b"", {"location": f"{fault.redirect_to}/cdn/{digest}"})
            return
        data = self.blobs.get(digest)
        repo = scope["path"][4:].rsplit("/", 2)[0]
        if repo in self.deny_repos:
            await asyncio.sleep(0.2)  # slow enough for other requests to join
            data = None
        if data is None:
            await _respond(send, 404, b'{"errors":[{"code":"BLOB_UNKNOWN"}]}', {})
            return
        if fault.wrong_bytes:
            data = bytes(b ^ 0xFF for b in data[:16]) + data[16:]
        start, status, extra = 0, 200, {}
        rng = headers.get("range")
        if rng:
            start = int(rng.removeprefix("bytes=").split("-")[0])
            status = 206
            extra["content-range"] = f"bytes {start}-{len(data) - 1}/{len(data)}"
        body = data[start:]
        if not fault.chunked:
            extra["content-length"] = str(len(body))
        start_message = {"docker-content-digest": digest, **extra}
        await send(
            {"type": "http.response.start", "status": status, "headers": _raw(start_message)}
        )
        if scope["method"] == "HEAD":
            await send({"type": "http.response.body", "body": b""})
            return
        cut = fault.cut_after if fault.cut_times > 0 else None
        sent = 0
        while sent < len(body):
            piece = body[sent : sent + fault.chunk]
            if fault.hold_last is not None and sent + len(piece) == len(body):
                if len(piece) > 1:
                    await send(
                        {"type": "http.response.body", "body": piece[:-1], "more_body": True}
                    )
                    sent += len(piece) - 1
                    piece = piece[-1:]
                await fault.hold_last.wait()
            if cut is not None and sent + len(piece) > cut:
                piece = piece[: max(0, cut - sent)]
                if piece:
                    await send({"type": "http.response.body", "body": piece, "more_body": True})
                fault.cut_times -= 1
                # Returning mid-body makes uvicorn close the connection: a cut.
                return
            await send({"type": "http.response.body", "body": piece, "more_body": True})
            sent += len(piece)
            if fault.delay:
                await asyncio.sleep(fault.delay)
        await send({"type": "http.response.body", "body": b"", "more_body": False})


def _raw(headers: dict[str, str]) -> list[tuple[bytes, bytes]]:
    return [(k.encode(), v.encode()) for k, v in headers.items()]


async def _respond(
    send: Send, status: int, body: bytes, headers: dict[str, str], length: int | None = None
) -> None:
    hdrs = {"content-length": str(len(body) if length is None else length), **headers}
    await send({"type": "http.response.start", "status": status, "headers": _raw(hdrs)})
    await send({"type": "http.response.body", "body": body})
