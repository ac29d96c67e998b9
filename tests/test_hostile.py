"""Hostile and broken upstreams, at the socket level: never a 500, never a wrong cache
entry, stale content where `max_stale` allows (issue: "never a 500, never a hang")."""

from __future__ import annotations

import gzip
import hashlib
import json
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest
from conftest import MirrorFactory, until
from fakes.clock import Clock
from fakes.rawupstream import (
    OCI,
    RawUpstream,
    Request,
    Script,
    manifest,
    manifest_response,
    response,
)
from fakes.upstream import FakeUpstream

from mirror.diskstore import DiskStore

BODY, DIGEST = manifest("good")
MOVED, MOVED_DIGEST = manifest("moved")


def _oci_error(r: httpx.Response) -> str:
    assert r.status_code in (502, 504), (r.status_code, r.text)
    code: str = r.json()["errors"][0]["code"]
    return code


# -- malformed and truncated responses ---------------------------------------------------

MALFORMED: dict[str, bytes] = {
    "bad status line": b"HTTP/1.1 2OO OK\r\ncontent-length: 0\r\n\r\n",
    "header without colon": b"HTTP/1.1 200 OK\r\ncontent-type " + OCI.encode() + b"\r\n\r\n",
    "NUL in a header": b"HTTP/1.1 200 OK\r\nx-a: b\x00c\r\ncontent-length: 2\r\n\r\n{}",
    "bad content-length": b"HTTP/1.1 200 OK\r\ncontent-length: 12x\r\n\r\n{}",
    "two content-lengths": b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\ncontent-length: 3\r\n\r\n{}",
    "content-length and chunked": (
        b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\ntransfer-encoding: chunked\r\n\r\n"
        b"2\r\n{}\r\n0\r\n\r\n"
    ),
    "header over 8 KB": b"HTTP/1.1 200 OK\r\nx-big: " + b"a" * 70000 + b"\r\n\r\n",
    "200 headers": b"HTTP/1.1 200 OK\r\n" + b"".join(b"x-%d: y\r\n" % i for i in range(200)),
    "HTTP/0.9 reply": BODY,
    "bad chunk size": b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\nzz\r\n{}\r\n0\r\n\r\n",
    "cut mid-body": response(200, BODY, {"content-type": OCI})[: -len(BODY) // 2],
}


@pytest.mark.parametrize("fault", list(MALFORMED), ids=list(MALFORMED))
async def test_a_malformed_answer_is_a_502_and_a_cached_tag_is_served_stale(
    fault: str, mirror: MirrorFactory
) -> None:
    broken = False

    def answer(request: Request) -> Script:
        if broken:
            return Script([MALFORMED[fault], None])
        return Script([manifest_response(BODY, DIGEST, head=request.method == "HEAD")])

    upstream = RawUpstream(answer)
    clock = Clock()
    async with (
        upstream.serve() as url,
        mirror(url, clock=clock, tag_ttl=60) as m,
        httpx.AsyncClient(base_url=m.url, timeout=30) as c,
    ):
        assert (await c.get("/v2/app/manifests/v1")).status_code == 200
        broken = True
        clock.now += 61  # past the TTL: the revalidation meets the fault
        stale = await c.get("/v2/app/manifests/v1")
        assert (stale.status_code, stale.headers["x-cache"]) == (200, "STALE")
        assert stale.content == BODY
        cold = await c.get("/v2/app/manifests/other")  # nothing cached to fall back on
        assert _oci_error(cold) in ("UNAVAILABLE", "MANIFEST_INVALID")
    assert (
        m.metric(
            "mirror_http_requests_total",
            route="/v2/{name}/manifests/{reference}",
            method="GET",
            status="500",
        )
        == 0
    )


# -- hostile content -------------------------------------------------------------------

HOSTILE: dict[str, tuple[dict[str, str], bytes]] = {
    "mediaType with CR/LF": (
        {"content-type": OCI},
        json.dumps({"schemaVersion": 2, "mediaType": "application/x\r\nset-cookie: a"}).encode(),
    ),
    "non-ASCII content type": ({"content-type": "application/vnd.\u00e9+json"}, b"{}"),
    "deep nesting": ({"content-type": OCI}, b"[" * 100_000 + b"]" * 100_000),
    "HTML": ({"content-type": "text/html"}, b"<html>login</html>"),
    "not JSON": ({"content-type": OCI}, b"\x89PNG not json"),
    "mediaType contradicts content type": (
        {"content-type": OCI},
        json.dumps(
            {"schemaVersion": 2, "mediaType": "application/vnd.oci.image.index.v1+json"}
        ).encode(),
    ),
    "malformed digest header": (
        {"content-type": OCI, "docker-content-digest": "sha256:nothex"},
        BODY,
    ),
}


@pytest.mark.parametrize("case", list(HOSTILE), ids=list(HOSTILE))
async def test_hostile_content_is_refused_and_never_cached(
    case: str, mirror: MirrorFactory
) -> None:
    headers, body = HOSTILE[case]
    upstream = RawUpstream(lambda r: Script([response(200, body, headers)]))
    async with (
        upstream.serve() as url,
        mirror(url) as m,
        httpx.AsyncClient(base_url=m.url, timeout=30) as c,
    ):
        for _ in range(2):  # refused each time: nothing was cached
            r = await c.get("/v2/app/manifests/v1", headers={"Accept": "*/*"})
            assert _oci_error(r) == "MANIFEST_INVALID"
    assert upstream.count("GET", "/manifests/v1") == 2
    assert m.metric("mirror_cache_entries", kind="manifest") == 0


async def test_no_accept_never_asks_for_schema1_and_a_schema1_answer_is_no_mismatch(
    mirror: MirrorFactory,
) -> None:
    signed = b'{"schemaVersion":1,"signatures":[]}'
    headers = {
        "content-type": "application/vnd.docker.distribution.manifest.v1+prettyjws",
        "docker-content-digest": DIGEST,  # of the payload, not of this body
    }
    upstream = RawUpstream(lambda r: Script([response(200, signed, headers)]))
    async with (
        upstream.serve() as url,
        mirror(url) as m,
        httpx.AsyncClient(base_url=m.url) as c,
    ):
        r = await c.get("/v2/app/manifests/v1", headers={"Accept": ""})
        assert r.status_code == 502
        assert "schema1" in r.json()["errors"][0]["message"]
    accept = upstream.requests[0].headers["accept"]
    assert "application/vnd.oci.image.index.v1+json" in accept
    assert "application/vnd.docker.distribution.manifest.v2+json" in accept
    assert "distribution.manifest.v1" not in accept
    assert m.metric("mirror_digest_mismatches_total", kind="manifest") == 0


# -- tokens and forwarded headers --------------------------------------------------------


def _token_flow(token_answer: bytes) -> Callable[[Request], Script]:
    realm: list[str] = []

    def answer(request: Request) -> Script:
        if request.path.startswith("/token"):
            return Script([token_answer, None])
        if "authorization" not in request.headers:
            host = request.headers["host"]
            challenge = f'Bearer realm="http://{host}/token",service="s"'
            realm.append(challenge)
            return Script([response(401, b"{}", {"www-authenticate": challenge})])
        return Script([manifest_response(BODY, DIGEST)])

    return answer


TOKENS: dict[str, tuple[bytes, str]] = {  # the answer, and what the client is told
    "256 MiB body": (
        response(200, b"", {"content-length": str(256 << 20)}, length=False)
        + b'{"token":"'
        + b"a" * (4 << 20),
        "token response too large",
    ),
    "gzip bomb": (
        response(200, gzip.compress(b" " * (64 << 20)), {"content-encoding": "gzip"}),
        "token service sent an encoded body",
    ),
    "CR/LF in the token": (
        response(200, json.dumps({"token": "a\r\nb"}).encode()),
        "token service returned a malformed token",
    ),
    "non-ASCII token": (
        response(200, json.dumps({"token": "t\u00e9"}).encode()),
        "token service returned a malformed token",
    ),
}


@pytest.mark.parametrize("case", list(TOKENS), ids=list(TOKENS))
async def test_a_hostile_token_answer_is_a_502(case: str, mirror: MirrorFactory) -> None:
    answer, told = TOKENS[case]
    upstream = RawUpstream(_token_flow(answer))
    async with (
        upstream.serve() as url,
        mirror(url) as m,
        httpx.AsyncClient(base_url=m.url, timeout=30) as c,
    ):
        r = await c.get("/v2/app/manifests/v1")
    assert _oci_error(r) == "UNAVAILABLE"
    # Refused as what it is, before reading more than a bounded amount of it.
    assert r.json()["errors"][0]["message"] == told


async def test_a_retry_after_that_is_no_number_or_date_is_dropped(mirror: MirrorFactory) -> None:
    limited = b"HTTP/1.1 429 Too Many\r\nretry-after: \xe9\xe9\r\ncontent-length: 0\r\n\r\n"
    upstream = RawUpstream(lambda r: Script([limited]))
    async with upstream.serve() as url, mirror(url) as m, httpx.AsyncClient(base_url=m.url) as c:
        r = await c.get("/v2/app/manifests/v1")
    assert (r.status_code, r.json()["errors"][0]["code"]) == (429, "TOOMANYREQUESTS")
    assert "retry-after" not in r.headers


# -- availability ------------------------------------------------------------------------


async def test_a_refused_challenge_fails_one_request_not_the_upstream(
    mirror: MirrorFactory,
) -> None:
    foreign = True

    def answer(request: Request) -> Script:
        if foreign:
            challenge = 'Bearer realm="http://evil.example:1/token",service="s"'
            return Script([response(401, b"{}", {"www-authenticate": challenge})])
        return Script([manifest_response(BODY, DIGEST)])

    upstream = RawUpstream(answer)
    async with upstream.serve() as url, mirror(url) as m, httpx.AsyncClient(base_url=m.url) as c:
        assert (await c.get("/v2/app/manifests/v1")).status_code == 502
        foreign = False  # the registry is public after all
        again = await c.get("/v2/app/manifests/v1")
        assert (again.status_code, again.content) == (200, BODY)


async def test_a_trickling_manifest_meets_the_fetch_deadline(mirror: MirrorFactory) -> None:
    head = response(200, BODY, {"content-type": OCI, "docker-content-digest": DIGEST})
    split = len(head) - len(BODY)
    trickle: list[bytes | float | None] = [head[:split]]
    for byte in BODY:
        trickle += [bytes([byte]), 0.05]  # under any read timeout, forever in total
    upstream = RawUpstream(lambda r: Script(trickle))
    async with (
        upstream.serve() as url,
        mirror(url, fetch_timeout=1) as m,
        httpx.AsyncClient(base_url=m.url, timeout=30) as c,
    ):
        r = await c.get("/v2/app/manifests/v1")
    assert r.status_code == 504
    assert "longer than 1 s" in r.json()["errors"][0]["message"]


@pytest.mark.parametrize("length", [str(10 * 10**12), None], ids=["10 TB announced", "endless"])
async def test_a_blob_is_bounded_by_max_blob_size(
    length: str | None, mirror: MirrorFactory, tmp_path: Path
) -> None:
    digest = "sha256:" + "ab" * 32
    if length is not None:
        head = response(200, b"", {"content-length": length}, length=False)
        steps: list[bytes | float | None] = [head, b"x" * 65536, None]
    else:
        head = response(200, b"", {"transfer-encoding": "chunked"}, length=False)
        chunk = b"10000\r\n" + b"x" * 65536 + b"\r\n"
        steps = [head, *[chunk] * 64]  # 4 MiB and counting, never a last chunk
    upstream = RawUpstream(lambda r: Script(steps))
    async with (
        upstream.serve() as url,
        mirror(url, max_blob_size="1MiB") as m,
        httpx.AsyncClient(base_url=m.url, timeout=30) as c,
    ):
        if length is not None:  # refused before a byte: clients never hear of 10 TB
            r = await c.get(f"/v2/app/blobs/{digest}")
            assert _oci_error(r) == "UNAVAILABLE"
        else:  # cut at the limit: the client sees a broken transfer, never a "complete" one
            with pytest.raises(httpx.RemoteProtocolError):
                await c.get(f"/v2/app/blobs/{digest}")
    assert m.metric("mirror_downloads_in_flight") == 0
    assert not any((tmp_path / "cache" / "tmp").iterdir())


# -- the connection pool -----------------------------------------------------------------


async def test_stray_bytes_on_an_idle_connection_never_answer_the_next_request(
    mirror: MirrorFactory,
) -> None:
    def answer(request: Request) -> Script:
        if request.path.endswith("/x/manifests/v1"):
            # The answer, then a complete response nobody asked for on the idle connection.
            return Script(
                [manifest_response(BODY, DIGEST)], after=manifest_response(MOVED, MOVED_DIGEST)
            )
        return Script([manifest_response(BODY, DIGEST)])

    upstream = RawUpstream(answer)
    async with upstream.serve() as url, mirror(url) as m, httpx.AsyncClient(base_url=m.url) as c:
        assert (await c.get("/v2/x/manifests/v1")).content == BODY
        await upstream.after_sent.wait()  # the stray response is on the idle connection
        y = await c.get("/v2/y/manifests/v1")
        assert y.headers["docker-content-digest"] == DIGEST  # y's own answer, not the stray
    assert upstream.count("GET", "/y/manifests/v1") == 1


async def test_a_body_after_a_head_answer_does_not_break_the_next_request(
    mirror: MirrorFactory,
) -> None:
    clock = Clock()

    def answer(request: Request) -> Script:
        # A common server bug: the HEAD answer carries the body anyway (the GET answer).
        return Script([manifest_response(BODY, DIGEST)])

    upstream = RawUpstream(answer)
    async with (
        upstream.serve() as url,
        mirror(url, clock=clock, tag_ttl=60) as m,
        httpx.AsyncClient(base_url=m.url) as c,
    ):
        assert (await c.get("/v2/app/manifests/v1")).status_code == 200
        for _ in range(3):
            clock.now += 61
            r = await c.get("/v2/app/manifests/v1")  # a HEAD revalidates it each time
            assert (r.status_code, r.headers["x-cache"]) == (200, "REVALIDATED")
        other = await c.get("/v2/app/manifests/v2")
        assert (other.status_code, other.content) == (200, BODY)


# -- shutdown and failing disks ----------------------------------------------------------


async def test_a_commit_in_progress_at_shutdown_finishes(
    fake: tuple[FakeUpstream, str],
    mirror: MirrorFactory,
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
) -> None:
    """A client had every verified byte; the fsync was still running when the mirror
    was told to stop: the blob must reach the cache, not be thrown away."""
    import os
    import threading

    from mirror.downloads import Downloads
    from mirror.reference import Digest

    upstream, url = fake
    data = os.urandom(1 << 20)
    digest = upstream.add_blob(data)
    disk_caught_up = threading.Event()
    real_fsync, real_aclose = os.fsync, Downloads.aclose

    def slow_fsync(fd: int) -> None:
        disk_caught_up.wait(timeout=30)
        real_fsync(fd)

    async def stop_then_let_the_disk_catch_up(self: Downloads) -> None:
        disk_caught_up.set()  # only once shutdown has begun
        await real_aclose(self)

    monkeypatch.setattr(os, "fsync", slow_fsync)
    monkeypatch.setattr(Downloads, "aclose", stop_then_let_the_disk_catch_up)
    async with mirror(url) as m, httpx.AsyncClient(base_url=m.url) as c:
        assert (await c.get(f"/v2/a/blobs/{digest}")).content == data
    # The mirror has stopped; its cache holds the blob.
    store = DiskStore(tmp_path / "cache")
    assert await store.blob_size(Digest.parse(digest)) == len(data)
    store.close()
    assert m.metric("mirror_cache_write_failures_total", kind="blob") == 0


async def test_a_commit_on_a_read_only_disk_fails_once_and_the_sweep_cleans_up(
    fake: tuple[FakeUpstream, str],
    mirror: MirrorFactory,
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    import errno
    import os

    from mirror import eviction

    upstream, url = fake
    data = os.urandom(1 << 20)
    digest = upstream.add_blob(data)
    tmp = tmp_path / "cache" / "tmp"

    async def read_only_commit(*args: object) -> None:
        raise OSError(errno.EROFS, "Read-only file system")

    real_unlink = Path.unlink

    def read_only_unlink(self: Path, missing_ok: bool = False) -> None:
        if self.parent == tmp:
            raise OSError(errno.EROFS, "Read-only file system")
        real_unlink(self, missing_ok)

    monkeypatch.setattr(DiskStore, "commit_blob", read_only_commit)
    monkeypatch.setattr(Path, "unlink", read_only_unlink)
    async with mirror(url) as m, httpx.AsyncClient(base_url=m.url) as c:
        assert (await c.get(f"/v2/a/blobs/{digest}")).content == data
        await until(lambda: m.metric("mirror_downloads_in_flight") == 0, "the download to end")
        assert m.metric("mirror_cache_write_failures_total", kind="blob") == 1
        [left] = list(tmp.iterdir())  # the disk would not let it go
        monkeypatch.setattr(Path, "unlink", real_unlink)  # writable again
        old = left.stat().st_mtime - eviction.TEMP_MAX_AGE - 1
        os.utime(left, (old, old))
        await m.app.state.components.evictor.run_once()
        assert list(tmp.iterdir()) == []
    assert "never retrieved" not in caplog.text


async def test_a_blob_is_bounded_by_the_size_its_manifest_descriptor_gives(
    mirror: MirrorFactory, tmp_path: Path
) -> None:
    blob = b"x" * 5000  # the upstream serves 5000 bytes for a layer described as 1000
    layer = "sha256:" + "cd" * 32
    body = json.dumps(
        {
            "schemaVersion": 2,
            "mediaType": OCI,
            "config": {"mediaType": "x/y+json", "digest": "sha256:" + "ef" * 32, "size": 2},
            "layers": [{"mediaType": "x/y", "digest": layer, "size": 1000}],
        }
    ).encode()
    digest = "sha256:" + hashlib.sha256(body).hexdigest()

    def answer(request: Request) -> Script:
        if "/manifests/" in request.path:
            return Script([manifest_response(body, digest)])
        return Script([response(200, blob)])

    upstream = RawUpstream(answer)
    async with (
        upstream.serve() as url,
        mirror(url) as m,
        httpx.AsyncClient(base_url=m.url) as c,
    ):
        assert (await c.get("/v2/app/manifests/v1")).status_code == 200
        r = await c.get(f"/v2/app/blobs/{layer}")
        assert _oci_error(r) == "UNAVAILABLE"  # refused before a byte reached anyone
    assert not any((tmp_path / "cache" / "tmp").iterdir())


# -- found by review: each a 500, a hang or a poisoned name before its fix ---------------


def _manifest_naming(layer: str, size: int) -> tuple[bytes, str]:
    body = json.dumps(
        {
            "schemaVersion": 2,
            "mediaType": OCI,
            "config": {"mediaType": "x/y+json", "digest": "sha256:" + "ef" * 32, "size": 2},
            "layers": [{"mediaType": "x/y", "digest": layer, "size": size}],
        }
    ).encode()
    return body, "sha256:" + hashlib.sha256(body).hexdigest()


async def test_another_repositorys_manifest_cannot_make_a_blob_unpullable(
    mirror: MirrorFactory,
) -> None:
    blob = b"y" * 5000
    layer = "sha256:" + hashlib.sha256(blob).hexdigest()
    lie = _manifest_naming(layer, 10)  # "this popular layer is 10 bytes"

    def answer(request: Request) -> Script:
        if "/manifests/" in request.path:
            return Script([manifest_response(*lie)])
        return Script([response(200, blob)])

    upstream = RawUpstream(answer)
    async with upstream.serve() as url, mirror(url) as m, httpx.AsyncClient(base_url=m.url) as c:
        assert (await c.get("/v2/attacker/img/manifests/latest")).status_code == 200
        victim = await c.get(f"/v2/library/ubuntu/blobs/{layer}")
        assert (victim.status_code, victim.content) == (200, blob)


async def test_a_descriptor_cannot_lift_max_blob_size(mirror: MirrorFactory) -> None:
    layer = "sha256:" + "cd" * 32
    body, digest = _manifest_naming(layer, 10**13)
    chunk = b"10000\r\n" + b"x" * 65536 + b"\r\n"
    endless = [response(200, b"", {"transfer-encoding": "chunked"}, length=False), *[chunk] * 64]

    def answer(request: Request) -> Script:
        if "/manifests/" in request.path:
            return Script([manifest_response(body, digest)])
        return Script(list(endless))

    upstream = RawUpstream(answer)
    async with (
        upstream.serve() as url,
        mirror(url, max_blob_size="1MiB") as m,
        httpx.AsyncClient(base_url=m.url) as c,
    ):
        assert (await c.get("/v2/app/manifests/v1")).status_code == 200
        with pytest.raises(httpx.RemoteProtocolError):
            await c.get(f"/v2/app/blobs/{layer}")
    assert m.metric("mirror_upstream_bytes_total", upstream=url.removeprefix("http://")) < 2 << 20


async def test_a_manifest_of_a_million_brackets_is_refused_before_parsing(
    mirror: MirrorFactory,
) -> None:
    flood = b"[" + b"[]," * 1_000_000 + b"[]]"
    upstream = RawUpstream(lambda r: Script([response(200, flood, {"content-type": OCI})]))
    async with upstream.serve() as url, mirror(url) as m, httpx.AsyncClient(base_url=m.url) as c:
        r = await c.get("/v2/app/manifests/v1")
    assert _oci_error(r) == "MANIFEST_INVALID"
    assert "more than 50000 objects and arrays" in r.json()["errors"][0]["message"]


@pytest.mark.parametrize(
    "challenge",
    [
        'Bearer realm="http://127.0.0.1:abc/token",service="s"',
        'Bearer realm="http://[::1/token",service="s"',
    ],
    ids=["port not a number", "unclosed bracket"],
)
async def test_an_unparsable_realm_is_refused_not_a_500(
    challenge: str, mirror: MirrorFactory
) -> None:
    upstream = RawUpstream(
        lambda r: Script([response(401, b"{}", {"www-authenticate": challenge})])
    )
    async with upstream.serve() as url, mirror(url) as m, httpx.AsyncClient(base_url=m.url) as c:
        r = await c.get("/v2/app/manifests/v1")
    assert r.status_code == 502
    assert "token realm" in r.json()["errors"][0]["message"]


async def test_a_deeply_nested_token_answer_is_a_502(mirror: MirrorFactory) -> None:
    upstream = RawUpstream(_token_flow(response(200, b"[" * 100_000)))
    async with upstream.serve() as url, mirror(url) as m, httpx.AsyncClient(base_url=m.url) as c:
        r = await c.get("/v2/app/manifests/v1")
    assert r.json()["errors"][0]["message"] == "token service returned no token"


async def test_a_client_accept_that_is_not_a_media_type_is_never_forwarded(
    mirror: MirrorFactory,
) -> None:
    upstream = RawUpstream(lambda r: Script([manifest_response(BODY, DIGEST)]))
    async with upstream.serve() as url, mirror(url) as m, httpx.AsyncClient(base_url=m.url) as c:
        accept = f"{OCI}, application/\u00e9t\u00e9".encode()
        r = await c.get("/v2/app/manifests/v1", headers=[(b"accept", accept)])
    assert r.status_code == 200
    assert upstream.requests[0].headers["accept"] == OCI


async def test_a_manifest_cached_before_checks_existed_is_fetched_anew(
    mirror: MirrorFactory, tmp_path: Path
) -> None:
    from mirror.reference import Digest
    from mirror.store import StoredManifest

    store = DiskStore(tmp_path / "cache")
    poisoned = StoredManifest(Digest.parse(DIGEST), "text/html", BODY)
    await store.put_manifest(poisoned)
    store.close()
    upstream = RawUpstream(lambda r: Script([manifest_response(BODY, DIGEST)]))
    async with upstream.serve() as url, mirror(url) as m, httpx.AsyncClient(base_url=m.url) as c:
        r = await c.get(f"/v2/app/manifests/{DIGEST}")
    assert (r.status_code, r.headers["content-type"]) == (200, OCI)
    assert upstream.count("GET", f"/manifests/{DIGEST}") == 1


async def test_a_body_broken_before_its_first_byte_is_still_resumed(
    mirror: MirrorFactory,
) -> None:
    """A resume at offset 0 still asks with `Range: bytes=0-` (RemoteBlob accepts only
    a 206 for a resume)."""
    blob = bytes(range(256)) * 20
    digest = "sha256:" + hashlib.sha256(blob).hexdigest()
    first = True

    def answer(req: Request) -> Script:
        nonlocal first
        if "/blobs/" not in req.path:
            return Script([response(404, b"")])
        if first:
            first = False
            return Script(
                [response(200, b"", {"content-length": str(len(blob))}, length=False), None]
            )
        rng = req.headers.get("range")
        if rng:
            start = int(rng.split("=")[1].rstrip("-"))
            return Script(
                [
                    response(
                        206,
                        blob[start:],
                        {"content-range": f"bytes {start}-{len(blob) - 1}/{len(blob)}"},
                    )
                ]
            )
        return Script([response(200, blob)])

    upstream = RawUpstream(answer)
    async with (
        upstream.serve() as url,
        mirror(url) as m,
        httpx.AsyncClient(base_url=m.url, timeout=30) as c,
    ):
        r = await c.get(f"/v2/app/blobs/{digest}")
    assert r.status_code == 200, (r.status_code, r.text, [x.headers for x in upstream.requests])
    assert r.content == blob
