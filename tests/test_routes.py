"""The HTTP API as a client sees it, against the in-process fake upstream."""

from __future__ import annotations

import asyncio
import json
from urllib.parse import urlsplit

import httpx
import pytest
from conftest import MirrorFactory, get_when_cached
from fakes.clock import Clock
from fakes.upstream import FakeUpstream, Fault, sha256

from mirror.mediatypes import DOCKER_MANIFEST_LIST, DOCKER_MANIFEST_V2, OCI_MANIFEST

MANIFEST = {"schemaVersion": 2, "mediaType": DOCKER_MANIFEST_V2, "layers": []}


async def raw_request(base: str, target: str, method: str = "GET") -> tuple[int, bytes]:
    """Send a request line exactly as given: no client-side path normalisation."""
    parts = urlsplit(base)
    reader, writer = await asyncio.open_connection(parts.hostname, parts.port)
    writer.write(f"{method} {target} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode())
    await writer.drain()
    data = await reader.read()
    writer.close()
    await writer.wait_closed()
    head, _, body = data.partition(b"\r\n\r\n")
    return int(head.split()[1]), body


async def test_base_endpoint(fake: tuple[FakeUpstream, str], mirror: MirrorFactory) -> None:
    _, url = fake
    async with mirror(url) as m, httpx.AsyncClient(base_url=m.url) as c:
        r = await c.get("/v2/")
        assert (r.status_code, r.json()) == (200, {})
        assert r.headers["docker-distribution-api-version"] == "registry/2.0"
        assert (await c.head("/v2/")).status_code == 200


@pytest.mark.parametrize(
    "target",
    [
        "/v2/../../etc/passwd/blobs/sha256:" + "a" * 64,
        "/v2/%2e%2e/%2e%2e/etc/manifests/latest",
        "/v2/a%00b/manifests/latest",
        "/v2/a/blobs/sha256:..%2f..%2f..%2fetc%2fpasswd",
        "/v2/" + "a/" * 400 + "manifests/latest",
        "/v2/UPPER/manifests/latest",
        "/v2/a/manifests/..",
        "/v2/a/blobs/sha256:" + "g" * 64,
        "/v2/a/blobs/md5:" + "a" * 32,
    ],
)
async def test_hostile_paths_are_refused_without_upstream_traffic(
    fake: tuple[FakeUpstream, str], mirror: MirrorFactory, target: str
) -> None:
    upstream, url = fake
    async with mirror(url) as m:
        status, body = await raw_request(m.url, target)
    assert status in (400, 404)
    assert json.loads(body)["errors"][0]["code"] in (
        "NAME_INVALID",
        "DIGEST_INVALID",
        "TAG_INVALID",
        "NAME_UNKNOWN",
        "MANIFEST_UNKNOWN",
    )
    assert upstream.requests == []


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("POST", "/v2/a/blobs/uploads/"),
        ("PUT", "/v2/a/manifests/latest"),
        ("PATCH", "/v2/a/blobs/uploads/123"),
        ("DELETE", "/v2/a/blobs/sha256:" + "a" * 64),
        ("DELETE", "/v2/a/manifests/latest"),
    ],
)
async def test_writes_are_unsupported(
    fake: tuple[FakeUpstream, str], mirror: MirrorFactory, method: str, path: str
) -> None:
    upstream, url = fake
    async with mirror(url) as m, httpx.AsyncClient(base_url=m.url) as c:
        r = await c.request(method, path)
    assert r.status_code == 405
    assert r.json()["errors"][0]["code"] == "UNSUPPORTED"
    assert upstream.requests == []


async def test_manifest_headers_head_and_etag(
    fake: tuple[FakeUpstream, str], mirror: MirrorFactory
) -> None:
    upstream, url = fake
    digest = upstream.add_manifest(DOCKER_MANIFEST_V2, MANIFEST, tag="v1")
    body = upstream.manifests[digest][1]
    async with mirror(url) as m, httpx.AsyncClient(base_url=m.url) as c:
        head = await c.head("/v2/a/manifests/v1", headers={"Accept": DOCKER_MANIFEST_V2})
        assert head.status_code == 200
        assert head.headers["docker-content-digest"] == digest
        assert head.headers["content-type"] == DOCKER_MANIFEST_V2
        assert head.headers["content-length"] == str(len(body))
        assert head.content == b""
        get = await c.get(f"/v2/a/manifests/{digest}", headers={"Accept": DOCKER_MANIFEST_V2})
        assert get.content == body
        assert get.headers["etag"] == f'"{digest}"'
        cond = await c.get(f"/v2/a/manifests/{digest}", headers={"If-None-Match": f'"{digest}"'})
        assert cond.status_code == 304
    # HEAD fetched and cached the body; the GET by digest was a hit.
    assert upstream.count("GET", "/manifests/v1") == 1
    assert upstream.count("GET", f"/manifests/{digest}") == 0


async def test_tag_ttl_with_injected_clock(
    fake: tuple[FakeUpstream, str], mirror: MirrorFactory
) -> None:
    upstream, url = fake
    upstream.add_manifest(DOCKER_MANIFEST_V2, MANIFEST, tag="v1")
    clock = Clock()
    accept = {"Accept": DOCKER_MANIFEST_V2}
    async with mirror(url, clock=clock, tag_ttl="5m") as m, httpx.AsyncClient(base_url=m.url) as c:
        assert (await c.get("/v2/a/manifests/v1", headers=accept)).status_code == 200
        clock.now += 299
        assert (await c.get("/v2/a/manifests/v1", headers=accept)).status_code == 200
        assert upstream.count("GET", "/manifests/v1") == 1  # within TTL: no upstream request
        changed = upstream.add_manifest(DOCKER_MANIFEST_V2, {**MANIFEST, "x": 1}, tag="v1")
        clock.now += 2
        r = await c.get("/v2/a/manifests/v1", headers=accept)
        assert r.headers["docker-content-digest"] == changed
        assert upstream.count("GET", "/manifests/v1") == 2


async def test_manifest_with_wrong_digest_is_refused_and_not_cached(
    fake: tuple[FakeUpstream, str], mirror: MirrorFactory
) -> None:
    upstream, url = fake
    digest = upstream.add_manifest(DOCKER_MANIFEST_V2, MANIFEST, tag="v1")
    upstream.faults[digest] = upstream.faults["v1"] = Fault(wrong_bytes=True)
    async with mirror(url) as m, httpx.AsyncClient(base_url=m.url) as c:
        for path in (f"/v2/a/manifests/{digest}", "/v2/a/manifests/v1"):
            r = await c.get(path, headers={"Accept": DOCKER_MANIFEST_V2})
            assert r.status_code == 502
            assert r.json()["errors"][0]["code"] == "DIGEST_INVALID"
        again = await c.get(f"/v2/a/manifests/{digest}", headers={"Accept": DOCKER_MANIFEST_V2})
        assert again.status_code == 502
    assert upstream.count("GET", f"/manifests/{digest}") == 2  # nothing was cached
    assert m.metric("mirror_digest_mismatches_total", kind="manifest") == 3


async def test_oversized_manifest_is_refused(
    fake: tuple[FakeUpstream, str], mirror: MirrorFactory
) -> None:
    upstream, url = fake
    big = {**MANIFEST, "annotations": {"x": "y" * (4 * 1024 * 1024)}}
    digest = upstream.add_manifest(DOCKER_MANIFEST_V2, big, tag="big")
    async with mirror(url) as m, httpx.AsyncClient(base_url=m.url) as c:
        r = await c.get(f"/v2/a/manifests/{digest}", headers={"Accept": DOCKER_MANIFEST_V2})
    assert r.status_code == 502
    assert r.json()["errors"][0]["code"] == "MANIFEST_INVALID"


async def test_unacceptable_media_type_is_never_served(
    fake: tuple[FakeUpstream, str], mirror: MirrorFactory
) -> None:
    upstream, url = fake
    digest = upstream.add_manifest(DOCKER_MANIFEST_LIST, {"manifests": []}, tag="multi")
    async with mirror(url) as m, httpx.AsyncClient(base_url=m.url) as c:
        for ref in ("multi", digest):
            r = await c.get(
                f"/v2/a/manifests/{ref}",
                headers={"Accept": f"{DOCKER_MANIFEST_V2}, {OCI_MANIFEST}"},
            )
            assert r.status_code == 404
            assert r.json()["errors"][0]["code"] == "MANIFEST_UNKNOWN"
        ok = await c.get(f"/v2/a/manifests/{digest}", headers={"Accept": DOCKER_MANIFEST_LIST})
        assert ok.status_code == 200


async def test_unknown_manifest_and_blob(
    fake: tuple[FakeUpstream, str], mirror: MirrorFactory
) -> None:
    _, url = fake
    async with mirror(url) as m, httpx.AsyncClient(base_url=m.url) as c:
        r = await c.get("/v2/a/manifests/nope")
        assert (r.status_code, r.json()["errors"][0]["code"]) == (404, "MANIFEST_UNKNOWN")
        r = await c.get("/v2/a/blobs/" + sha256(b"nope"))
        assert (r.status_code, r.json()["errors"][0]["code"]) == (404, "BLOB_UNKNOWN")
        r = await c.head("/v2/a/blobs/" + sha256(b"nope"))
        assert r.status_code == 404


async def test_blob_head_miss_does_not_download(
    fake: tuple[FakeUpstream, str], mirror: MirrorFactory
) -> None:
    upstream, url = fake
    digest = upstream.add_blob(b"z" * 5000)
    async with mirror(url) as m, httpx.AsyncClient(base_url=m.url) as c:
        r = await c.head(f"/v2/a/blobs/{digest}")
    assert r.status_code == 200
    assert r.headers["content-length"] == "5000"
    assert r.headers["docker-content-digest"] == digest
    assert upstream.count("GET", f"/blobs/{digest}") == 0
    assert upstream.count("HEAD", f"/blobs/{digest}") == 1


async def test_upstream_down_is_a_clear_502(mirror: MirrorFactory) -> None:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{s.getsockname()[1]}"
    async with mirror(dead) as m, httpx.AsyncClient(base_url=m.url) as c:
        r = await c.get("/v2/a/manifests/latest")
    assert r.status_code == 502
    err = r.json()["errors"][0]
    assert err["code"] == "UNAVAILABLE"
    assert "unreachable" in err["message"]


async def test_client_leaving_does_not_stop_the_download(
    fake: tuple[FakeUpstream, str], mirror: MirrorFactory
) -> None:
    upstream, url = fake
    data = bytes(range(256)) * 8192  # 2 MiB
    digest = upstream.add_blob(data)
    upstream.faults[digest] = Fault(delay=0.005, chunk=16384)
    async with mirror(url) as m, httpx.AsyncClient(base_url=m.url) as c:
        async with c.stream("GET", f"/v2/a/blobs/{digest}") as r:
            async for _ in r.aiter_raw():
                break  # hang up after the first chunk
        # The download goes on without any client, into the cache.
        full = await get_when_cached(c, f"/v2/a/blobs/{digest}")
        assert full.content == data
    assert upstream.count("GET", f"/blobs/{digest}") == 1


async def test_metrics_use_route_templates(
    fake: tuple[FakeUpstream, str], mirror: MirrorFactory
) -> None:
    upstream, url = fake
    digest = upstream.add_blob(b"abc")
    async with mirror(url) as m, httpx.AsyncClient(base_url=m.url) as c:
        await c.get(f"/v2/some/repo/blobs/{digest}")
        text = (await c.get("/metrics")).text
    assert (
        'mirror_http_requests_total{method="GET",route="/v2/{name}/blobs/{digest}",'
        'status="200"} 1.0'
    ) in text
    assert "some/repo" not in text
    host = url.removeprefix("http://")
    labels = {"upstream": host, "kind": "blob", "status": "200"}
    assert m.metric("mirror_upstream_requests_total", **labels) == 1
    assert 'mirror_served_bytes_total{source="upstream"} 3.0' in text


async def test_tags_list_forwards_pagination_and_link(
    fake: tuple[FakeUpstream, str], mirror: MirrorFactory
) -> None:
    upstream, url = fake
    async with mirror(url) as m, httpx.AsyncClient(base_url=m.url) as c:
        r = await c.get("/v2/team/app/tags/list", params={"n": "2", "last": "a"})
        bad = await c.get("/v2/team/app/tags/list", params={"last": "../x"})
    assert r.status_code == 200
    assert r.json() == {"name": "team/app", "tags": ["a", "b"]}
    assert r.headers["link"] == '</v2/team/app/tags/list?n=2&last=b>; rel="next"'
    assert upstream.requests[-1].query == "n=2&last=a"
    assert bad.status_code == 400
    assert bad.json()["errors"][0]["code"] == "TAG_INVALID"


async def test_concurrent_tag_requests_cause_one_upstream_request(
    fake: tuple[FakeUpstream, str], mirror: MirrorFactory
) -> None:
    upstream, url = fake
    digest = upstream.add_manifest(DOCKER_MANIFEST_V2, MANIFEST, tag="v1")
    upstream.manifest_delay = 0.2
    accept = {"Accept": DOCKER_MANIFEST_V2}
    async with mirror(url) as m, httpx.AsyncClient(base_url=m.url) as c:
        rs = await asyncio.gather(*(c.get("/v2/a/manifests/v1", headers=accept) for _ in range(20)))
        by_digest = await asyncio.gather(
            *(c.get(f"/v2/b/manifests/{digest}", headers=accept) for _ in range(5))
        )
    assert all(
        r.status_code == 200 and r.headers["docker-content-digest"] == digest
        for r in [*rs, *by_digest]
    )
    assert upstream.count("GET", "/manifests/v1") == 1
    assert upstream.count("GET", f"/manifests/{digest}") == 0  # cached by the tag fetch
    assert m.metric("mirror_coalesced_requests_total", kind="manifest") == 19
