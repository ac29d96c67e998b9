"""The status page: one self-contained HTML file (mirror/static/status.html) at /ui, and
/ redirecting to it. The page is static; what it shows it reads from the admin API
(/admin/v1/...) with the browser's own credentials, so it carries no data and no auth.

It is sent with a Content-Security-Policy that allows its own inline <style> and
<script> by their SHA-256 hashes, not with 'unsafe-inline': the page shows names from
upstream registries, and should one ever reach the DOM as markup, no script injected
with it may run. `connect-src 'self'` keeps the page talking to this mirror only,
`frame-ancestors 'none'` keeps another site from framing the Purge buttons.
"""

from __future__ import annotations

import base64
import functools
import hashlib
import re
from dataclasses import dataclass
from importlib import resources

from fastapi import APIRouter, Request
from starlette.responses import RedirectResponse, Response

PATH = "/ui"

# The one <style> and the one <script> of the page; their exact text is what is hashed.
_INLINE = re.compile(r"<(style|script)>(.*?)</\1>", re.DOTALL)


@dataclass(frozen=True)
class Page:
    body: bytes
    headers: dict[str, str]


def _hash(text: str) -> str:
    return "'sha256-" + base64.b64encode(hashlib.sha256(text.encode()).digest()).decode() + "'"


def content_security_policy(html: str) -> str:
    hashes: dict[str, list[str]] = {"style": [], "script": []}
    for kind, text in _INLINE.findall(html):
        hashes[kind].append(_hash(text))
    return "; ".join(
        [
            "default-src 'self'",
            "script-src " + " ".join(hashes["script"]),
            "style-src " + " ".join(hashes["style"]),
            "img-src 'self' data:",  # data: for the empty favicon
            "connect-src 'self'",
            "base-uri 'none'",
            "form-action 'none'",
            "frame-ancestors 'none'",
        ]
    )


@functools.cache
def page() -> Page:
    """Read once, when the first app is built; never at import."""
    html = resources.files("mirror").joinpath("static/status.html").read_text("utf-8")
    headers = {
        "Content-Security-Policy": content_security_policy(html),
        # The page is small and changes with the mirror's version: never a stale copy.
        "Cache-Control": "no-store",
        "X-Content-Type-Options": "nosniff",
        "Referrer-Policy": "no-referrer",
    }
    return Page(html.encode(), headers)


def router() -> APIRouter:
    """The routes of the page; reads the page now, so a broken install fails at start."""
    loaded = page()
    ui = APIRouter()

    @ui.api_route(PATH, methods=["GET", "HEAD"])
    async def status_page(request: Request) -> Response:
        request.state.route = PATH
        return Response(loaded.body, media_type="text/html; charset=utf-8", headers=loaded.headers)

    @ui.api_route("/", methods=["GET", "HEAD"])
    async def root(request: Request) -> Response:
        request.state.route = "/"
        # Relative, so it also works behind a proxy that serves the mirror under a prefix.
        return RedirectResponse("ui", status_code=302)

    return ui
