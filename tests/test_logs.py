"""Access logs, request ids and health endpoints."""

from __future__ import annotations

import io
import json
import logging
import os
import shutil
from pathlib import Path

import httpx
import pytest
from conftest import MirrorFactory
from fakes.upstream import FakeUpstream

from mirror import logs


def _access(caplog: pytest.LogCaptureFixture) -> list[dict[str, object]]:
    return [r.access for r in caplog.records if r.name == "mirror.access"]  # type: ignore[attr-defined]


async def test_one_access_line_per_request_with_what_an_sre_needs(
    fake: tuple[FakeUpstream, str], mirror: MirrorFactory, caplog: pytest.LogCaptureFixture
) -> None:
    upstream, url = fake
    data = os.urandom(100_000)
    digest = upstream.add_blob(data)
    caplog.set_level(logging.INFO, logger="mirror.access")
    async with mirror(url) as m, httpx.AsyncClient(base_url=m.url) as c:
        r = await c.get(f"/v2/team/app/blobs/{digest}")
        bad = await c.get("/v2/team/app/manifests/-bad", headers={"X-Request-Id": "a b"})
    [blob, invalid] = _access(caplog)
    assert blob["method"] == "GET"
    assert blob["route"] == "/v2/{name}/blobs/{digest}"
    assert blob["repository"] == "team/app"
    assert blob["reference"] == digest
    assert blob["status"] == 200
    assert blob["bytes"] == len(data)
    assert blob["cache"] == "MISS"
    assert blob["upstream_status"] == 200
    assert blob["upstream"] == url.removeprefix("http://")
    assert isinstance(blob["duration_s"], float)
    # The id comes back to the client and went upstream with the download.
    assert blob["request_id"] == r.headers["x-request-id"]
    [seen] = [s for s in upstream.requests if s.path.endswith(digest)]
    assert seen.headers["x-request-id"] == r.headers["x-request-id"]
    # A hostile client id is replaced, not echoed into logs and headers.
    assert invalid["status"] == 404  # no such manifest reference
    assert bad.headers["x-request-id"] != "a b"
    assert invalid["request_id"] == bad.headers["x-request-id"]


async def test_client_request_id_is_kept(
    fake: tuple[FakeUpstream, str], mirror: MirrorFactory, caplog: pytest.LogCaptureFixture
) -> None:
    upstream, url = fake
    digest = upstream.add_blob(b"abc")
    caplog.set_level(logging.INFO, logger="mirror.access")
    async with mirror(url) as m, httpx.AsyncClient(base_url=m.url) as c:
        r = await c.get(f"/v2/a/blobs/{digest}", headers={"X-Request-Id": "rollout-42.a"})
    assert r.headers["x-request-id"] == "rollout-42.a"
    assert _access(caplog)[0]["request_id"] == "rollout-42.a"
    assert upstream.requests[-1].headers["x-request-id"] == "rollout-42.a"


async def test_no_secret_in_any_log_line(
    mirror: MirrorFactory, caplog: pytest.LogCaptureFixture
) -> None:
    from fakes.server import serve

    upstream = FakeUpstream(token="issued-token-value")
    async with serve(upstream) as url:
        upstream.realm = f"{url}/token"
        digest = upstream.add_blob(b"xyz")
        caplog.set_level(logging.DEBUG)
        settings = {
            "upstream_username": "bob",
            "upstream_password": "hunter2-secret",
            "log_level": "debug",
        }
        async with mirror(url, **settings) as m, httpx.AsyncClient(base_url=m.url) as c:
            assert (await c.get(f"/v2/a/blobs/{digest}")).status_code == 200
    assert upstream.token_requests  # the credentials were used...
    text = caplog.text + json.dumps([getattr(r, "access", None) for r in caplog.records])
    for secret in ("hunter2-secret", "issued-token-value", "Ym9iOmh1bnRlcjIt"):
        assert secret not in text  # ...and never logged


def test_json_format_puts_each_field_in_its_own_key() -> None:
    stream = io.StringIO()
    logs.configure("info", "json")
    root = logging.getLogger()
    handler = root.handlers[0]
    handler.stream = stream  # type: ignore[attr-defined]
    try:
        record = logs.RequestLog("id1", "GET", "/v2/a/manifests/1?ns=ghcr.io", route="/r")
        record.status, record.bytes, record.cache = 200, 12, "HIT"
        logs.log_access(record, 0.5)
    finally:
        root.handlers.clear()
    line = json.loads(stream.getvalue().splitlines()[-1])
    assert line["logger"] == "mirror.access"
    assert line["level"] == "INFO"
    assert (line["method"], line["path"], line["status"]) == (
        "GET",
        "/v2/a/manifests/1?ns=ghcr.io",
        200,
    )
    assert (line["bytes"], line["cache"], line["duration_s"]) == (12, "HIT", 0.5)
    assert "time" in line and "access" not in line


async def test_health_and_readiness(mirror: MirrorFactory, tmp_path: Path) -> None:
    # The upstream is down (nothing listens): the mirror is alive and still ready,
    # since it can serve what it has.
    async with mirror("http://127.0.0.1:9") as m, httpx.AsyncClient(base_url=m.url) as c:
        live = await c.get("/healthz")
        assert (live.status_code, live.json()) == (200, {"status": "ok"})
        ready = await c.get("/readyz")
        assert ready.status_code == 200
        assert ready.json() == {"status": "ready", "checks": {"settings": "ok", "cache": "ok"}}
        # The cache stops taking writes (here: its tmp dir is gone, a file in its place).
        tmp = tmp_path / "cache" / "tmp"
        shutil.rmtree(tmp)
        tmp.write_text("not a directory")
        try:
            unready = await c.get("/readyz")
            assert unready.status_code == 503
            body = unready.json()
            assert body["status"] == "not ready"
            assert body["checks"]["cache"].startswith("not writable")
            assert (await c.get("/healthz")).status_code == 200  # alive all the same
        finally:
            tmp.unlink()
            tmp.mkdir()
        assert (await c.get("/readyz")).status_code == 200
        assert (
            m.metric("mirror_http_requests_total", route="/readyz", method="GET", status="503") == 1
        )


async def test_a_request_is_one_log_line_whatever_its_path(
    fake: tuple[FakeUpstream, str], mirror: MirrorFactory, caplog: pytest.LogCaptureFixture
) -> None:
    _, url = fake
    caplog.set_level(logging.INFO, logger="mirror.access")
    async with mirror(url) as m, httpx.AsyncClient(base_url=m.url) as c:
        await c.get("/v2/x%0A2026-01-01 INFO mirror.access: GET /v2/forged 200/manifests/1")
    [record] = [r for r in caplog.records if r.name == "mirror.access"]
    assert "\n" not in record.getMessage()
    assert "%0A" in record.getMessage()
