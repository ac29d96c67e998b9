"""The status page (mirror/ui.py): where it is served, its headers, and what its file
may not contain. The page in a real browser: tests/e2e/test_ui_e2e.py."""

from __future__ import annotations

import base64
import hashlib
import re
from pathlib import Path

import httpx
import pytest

from mirror.app import create_admin_app, create_app
from mirror.config import Settings

PAGE = Path(__file__).parent.parent / "mirror" / "static" / "status.html"


async def _get(app: object, path: str, method: str = "GET") -> httpx.Response:
    transport = httpx.ASGITransport(app=app)  # type: ignore[arg-type]
    async with httpx.AsyncClient(transport=transport, base_url="http://m") as client:
        return await client.request(method, path)


def _sha256(text: str) -> str:
    return "'sha256-" + base64.b64encode(hashlib.sha256(text.encode()).digest()).decode() + "'"


def _directives(csp: str) -> dict[str, list[str]]:
    parts = (d.split() for d in csp.split(";") if d.strip())
    return {p[0]: p[1:] for p in parts}


async def test_the_page_with_a_strict_policy_and_never_cached(
    tmp_path: Path, no_mirror_env: None
) -> None:
    r = await _get(create_app(Settings(cache_dir=tmp_path)), "/ui")
    assert r.status_code == 200
    assert r.headers["content-type"] == "text/html; charset=utf-8"
    assert r.headers["cache-control"] == "no-store"
    assert "<title>mirror status</title>" in r.text
    csp = _directives(r.headers["content-security-policy"])
    assert csp["default-src"] == ["'self'"]
    assert csp["connect-src"] == ["'self'"]
    assert csp["frame-ancestors"] == ["'none'"]
    # Only the page's own inline script and style run: by hash, never 'unsafe-inline'.
    (script,) = re.findall(r"<script>(.*?)</script>", r.text, re.DOTALL)
    (style,) = re.findall(r"<style>(.*?)</style>", r.text, re.DOTALL)
    assert csp["script-src"] == [_sha256(script)]
    assert csp["style-src"] == [_sha256(style)]
    assert "'unsafe-inline'" not in r.headers["content-security-policy"]
    head = await _get(create_app(Settings(cache_dir=tmp_path)), "/ui", "HEAD")
    assert (head.status_code, head.content) == (200, b"")


@pytest.mark.parametrize(
    ("admin_listen", "on_registry"),
    [
        pytest.param(None, 200, id="no-admin-listener"),
        pytest.param("127.0.0.1:5001", 404, id="admin-listener"),
    ],
)
async def test_on_the_admin_listener_or_else_the_registry_one(
    tmp_path: Path, no_mirror_env: None, admin_listen: str | None, on_registry: int
) -> None:
    app = create_app(Settings(cache_dir=tmp_path, admin_listen=admin_listen))
    assert (await _get(app, "/ui")).status_code == on_registry
    admin = create_admin_app(app)
    assert (await _get(admin, "/ui")).status_code == 200
    for served in [admin] if admin_listen else [admin, app]:
        r = await _get(served, "/")
        assert (r.status_code, r.headers["location"]) == (302, "ui")
        # The relative Location resolves to /ui (also under a proxy's path prefix).
        assert str(r.url.join(r.headers["location"])) == "http://m/ui"


def test_the_page_loads_nothing_from_elsewhere() -> None:
    """It must work offline: no URL to another host anywhere in the file (no CDN, no
    fonts, no links); its API calls are relative paths."""
    html = PAGE.read_text()
    assert not re.search(r"https?:|//[a-z0-9]", html, re.IGNORECASE)
    assert not re.search(r"@import|url\(", html)


def test_the_page_writes_text_never_markup() -> None:
    """Repository names, tags, platforms and upstream errors come from upstream
    registries: the script builds elements and text nodes, and has no way to parse a
    string as HTML. (The browser test shows a hostile platform name as text.)"""
    (script,) = re.findall(r"<script>(.*?)</script>", PAGE.read_text(), re.DOTALL)
    for sink in (
        "innerHTML",
        "outerHTML",
        "insertAdjacentHTML",
        "document.write",
        "eval(",
        "new Function",
        'setAttribute("on',
        "createContextualFragment",
        "DOMParser",
    ):
        assert sink not in script, sink
    # Strings given to setTimeout are evaluated as code; the page passes functions.
    assert not re.search(r"setTimeout\(\s*[\"'`]", script)
