"""bench/compare/'s nginx reference: a real nginx with the bench's config, a fake upstream.

What the benchmark relies on: nginx forwards the bench's long-lived bearer token, keeps
a blob after the first GET (a hit never reaches the upstream), sends concurrent cold
requests for one blob upstream once, and is gone, workers included, once stopped.
"""

from __future__ import annotations

import hashlib
import sys
import threading
import time
import urllib.request
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import SimpleNamespace
from typing import Any, cast

import jwt
import pytest
from harness import TokenServer, require_tool

# bench/ is no package: its modules import each other by top-level names.
sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))

from compare.nginx import TOKEN_TTL, Nginx
from front import Front

pytestmark = pytest.mark.e2e

REPO = "library/big"
PIECES = 8
PIECE = 256 * 1024


class _Upstream(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.gets: Counter[str] = Counter()
        self.authorization: list[str] = []
        self.lock = threading.Lock()
        # Sent piece by piece with pauses, so that concurrent clients overlap the miss.
        self.body = bytes(range(256)) * (PIECES * PIECE // 256)
        self.pause = 0.05


class _Handler(BaseHTTPRequestHandler):
    server: _Upstream
    protocol_version = "HTTP/1.1"

    def do_GET(self) -> None:
        with self.server.lock:
            self.server.gets[self.path] += 1
            self.server.authorization.append(self.headers.get("Authorization", ""))
        body = b"{}" if self.path == "/v2/" else self.server.body
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        for start in range(0, len(body), PIECE):
            self.wfile.write(body[start : start + PIECE])
            if self.path != "/v2/":
                time.sleep(self.server.pause)

    def log_message(self, format: str, *args: Any) -> None:
        pass


@pytest.fixture
def upstream() -> Iterator[_Upstream]:
    server = _Upstream()
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()


@pytest.fixture
def nginx(tmp_path: Path, upstream: _Upstream) -> Iterator[tuple[Nginx, TokenServer]]:
    require_tool("nginx")
    tokens = TokenServer(tmp_path)
    # Only the upstream's URL of the counting front is used by nginx's config.
    front = cast(Front, SimpleNamespace(url=f"http://127.0.0.1:{upstream.server_address[1]}"))
    subject = Nginx(tmp_path / "runs", front, tokens, [REPO])
    subject.fresh()
    yield subject, tokens
    subject.stop()


def _get(url: str) -> tuple[int, bytes]:
    with urllib.request.urlopen(url, timeout=60) as resp:
        return resp.status, resp.read()


def test_a_blob_is_fetched_once_with_the_token_and_then_served_from_the_cache(
    nginx: tuple[Nginx, TokenServer], upstream: _Upstream
) -> None:
    subject, tokens = nginx
    path = f"/v2/{REPO}/blobs/sha256:" + "a" * 64
    for _ in range(3):
        status, body = _get(subject.url + path)
        assert status == 200
        assert hashlib.sha256(body).digest() == hashlib.sha256(upstream.body).digest()
    assert upstream.gets[path] == 1
    subject.settle("sha256:" + "a" * 64, len(upstream.body), timeout=10)

    bearer = upstream.authorization[-1].removeprefix("Bearer ")
    claims = jwt.decode(bearer, options={"verify_signature": False})
    assert claims["access"] == [{"type": "repository", "name": REPO, "actions": ["pull"]}]
    assert claims["exp"] - claims["iat"] == TOKEN_TTL
    assert tokens.expires_in < TOKEN_TTL


def test_concurrent_cold_requests_go_upstream_once(
    nginx: tuple[Nginx, TokenServer], upstream: _Upstream
) -> None:
    subject, _ = nginx
    path = f"/v2/{REPO}/blobs/sha256:" + "b" * 64
    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(lambda _: _get(subject.url + path), range(8)))
    assert [status for status, _ in answers] == [200] * 8
    assert all(body == upstream.body for _, body in answers)
    assert upstream.gets[path] == 1


def test_stopping_ends_the_master_and_its_workers(nginx: tuple[Nginx, TokenServer]) -> None:
    subject, _ = nginx
    master, worker = subject.root_pid, subject.pid
    assert worker != master
    subject.stop()
    assert not Path(f"/proc/{master}").exists()
    assert not Path(f"/proc/{worker}").exists()
