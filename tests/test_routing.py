"""Several upstreams behind one mirror: routing by ns and prefix, isolation, no open proxy.

Two in-process fake registries stand in for, say, docker.io and ghcr.io; the same
scenarios run against two real Distribution registries in tests/e2e/test_multi.py.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import os
import socket
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
from conftest import MirrorFactory, get_when_cached, until
from fakes.server import serve
from fakes.upstream import FakeUpstream

OCI = "application/vnd.oci.image.manifest.v1+json"


def _manifest(marker: str) -> dict[str, Any]:
    return {"schemaVersion": 2, "mediaType": OCI, "annotations": {"from": marker}}


@pytest.fixture
async def two() -> AsyncIterator[tuple[FakeUpstream, str, FakeUpstream, str]]:
    a, b = FakeUpstream(token="token-a"), FakeUpstream(token="token-b")
    async with serve(a) as url_a, serve(b) as url_b:
        a.realm, b.realm = f"{url_a}/token", f"{url_b}/token"
        yield a, url_a, b, url_b


def _upstreams(url_a: str, url_b: str, **b_extra: Any) -> dict[str, Any]:
    return {
        "upstreams": [
            {"name": "rega.test", "url": url_a, "username": "alice", "password": "secret-a"},
            {"name": "regb.test:5000", "url": url_b, "username": "bob", "password": "secret-b"}
            | b_extra,
        ],
        "default_upstream": "rega.test",
    }


def _served(upstream: FakeUpstream, suffix: str) -> int:
    """GETs the upstream answered with content (the first, token-less one gets a 401)."""
    return sum(
        1
        for r in upstream.requests
        if r.method == "GET" and r.path.endswith(suffix) and "authorization" in r.headers
    )


def _basic(user: str, password: str) -> str:
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


async def test_ns_selects_the_upstream_and_tags_never_mix(
    two: tuple[FakeUpstream, str, FakeUpstream, str], mirror: MirrorFactory
) -> None:
    a, url_a, b, url_b = two
    digest_a = a.add_manifest(OCI, _manifest("a"), tag="1.0")
    digest_b = b.add_manifest(OCI, _manifest("b"), tag="1.0")
    async with (
        mirror(None, **_upstreams(url_a, url_b)) as m,
        httpx.AsyncClient(base_url=m.url) as c,
    ):
        for _ in range(2):  # cold, then from the cache: each keeps its own answer
            ra = await c.get("/v2/team/app/manifests/1.0", params={"ns": "rega.test"})
            rb = await c.get("/v2/team/app/manifests/1.0", params={"ns": "regb.test:5000"})
            plain = await c.get("/v2/team/app/manifests/1.0")  # Docker: no ns -> default
            assert ra.headers["docker-content-digest"] == digest_a
            assert rb.headers["docker-content-digest"] == digest_b
            assert plain.headers["docker-content-digest"] == digest_a
            assert json.loads(rb.content)["annotations"]["from"] == "b"
    assert _served(a, "/manifests/1.0") == 1
    assert _served(b, "/manifests/1.0") == 1
    # Each upstream's token service saw only its own credentials.
    assert {r.headers.get("authorization") for r in a.token_requests} == {
        _basic("alice", "secret-a")
    }
    assert {r.headers.get("authorization") for r in b.token_requests} == {_basic("bob", "secret-b")}
    assert all("secret-a" not in str(r) for r in b.requests + b.token_requests)
    assert (
        m.metric(
            "mirror_upstream_requests_total",
            upstream="regb.test:5000",
            kind="manifest",
            status="200",
        )
        == 1
    )


async def test_content_by_digest_is_shared_across_upstreams(
    two: tuple[FakeUpstream, str, FakeUpstream, str], mirror: MirrorFactory
) -> None:
    a, url_a, b, url_b = two
    blob = b"layer shared by both registries" * 1000
    digest = a.add_blob(blob)
    b.add_blob(blob)
    async with (
        mirror(None, **_upstreams(url_a, url_b)) as m,
        httpx.AsyncClient(base_url=m.url) as c,
    ):
        first = await get_when_cached(c, f"/v2/x/blobs/{digest}?ns=rega.test")
        assert first.content == blob
        second = await c.get(f"/v2/y/blobs/{digest}", params={"ns": "regb.test:5000"})
        assert second.content == blob
        assert second.headers["x-cache"] == "HIT"
    # Registry B was asked only whether y holds the digest (a HEAD, after its token
    # challenge): the bytes came from the cache.
    assert {(r.method, r.path) for r in b.requests} == {("HEAD", f"/v2/y/blobs/{digest}")}
    assert m.metric("mirror_served_bytes_total", source="cache") >= len(blob)


async def test_unknown_ns_is_refused_without_any_connection(
    two: tuple[FakeUpstream, str, FakeUpstream, str], mirror: MirrorFactory
) -> None:
    a, url_a, b, url_b = two
    # A listener the mirror would reach if it ever used ns as an address.
    trap = socket.socket()
    trap.bind(("127.0.0.1", 0))
    trap.listen()
    trap.setblocking(False)
    ns = f"127.0.0.1:{trap.getsockname()[1]}"
    try:
        async with (
            mirror(None, **_upstreams(url_a, url_b)) as m,
            httpx.AsyncClient(base_url=m.url) as c,
        ):
            for path in (
                "/v2/library/alpine/manifests/latest",
                "/v2/library/alpine/blobs/sha256:" + "0" * 64,
                "/v2/library/alpine/tags/list",
            ):
                r = await c.get(path, params={"ns": ns})
                assert r.status_code == 403
                error = r.json()["errors"][0]
                assert error["code"] == "DENIED"
                assert "does not serve that registry" in error["message"]
                assert error["detail"]["configured"] == ["rega.test", "regb.test:5000"]
        with pytest.raises(BlockingIOError):
            trap.accept()  # nobody ever connected
    finally:
        trap.close()
    assert a.requests == [] and b.requests == []
    assert a.token_requests == [] and b.token_requests == []


async def test_path_prefix_and_docker_hub_aliases(
    two: tuple[FakeUpstream, str, FakeUpstream, str], mirror: MirrorFactory
) -> None:
    a, url_a, b, url_b = two
    digest_b = b.add_manifest(OCI, _manifest("b"), tag="v2")
    settings = _upstreams(url_a, url_b, path_prefix="regb")
    async with mirror(None, **settings) as m, httpx.AsyncClient(base_url=m.url) as c:
        r = await c.get("/v2/regb/team/app/manifests/v2")
        assert r.status_code == 200
        assert r.headers["docker-content-digest"] == digest_b
    assert _served(b, "/v2/team/app/manifests/v2") == 1
    assert a.requests == []


async def test_repository_allow_and_deny_lists(
    two: tuple[FakeUpstream, str, FakeUpstream, str], mirror: MirrorFactory
) -> None:
    _a, url_a, b, url_b = two
    b.add_manifest(OCI, _manifest("b"), tag="1")
    extra = {"allow": ["myorg/*"], "deny": ["myorg/secret*"]}
    async with (
        mirror(None, **_upstreams(url_a, url_b, **extra)) as m,
        httpx.AsyncClient(base_url=m.url) as c,
    ):
        ns = {"ns": "regb.test:5000"}
        assert (await c.get("/v2/myorg/app/manifests/1", params=ns)).status_code == 200
        for denied in ("/v2/other/app/manifests/1", "/v2/myorg/secret-app/manifests/1"):
            r = await c.get(denied, params=ns)
            assert r.status_code == 403
            assert r.json()["errors"][0]["code"] == "DENIED"
        blob = f"/v2/other/app/blobs/sha256:{hashlib.sha256(b'x').hexdigest()}"
        assert (await c.get(blob, params=ns)).status_code == 403
    assert {r.path for r in b.requests} == {"/v2/myorg/app/manifests/1"}  # only the allowed


async def test_token_realm_on_a_foreign_host_is_refused(
    two: tuple[FakeUpstream, str, FakeUpstream, str], mirror: MirrorFactory
) -> None:
    _a, url_a, b, url_b = two
    b.add_manifest(OCI, _manifest("b"), tag="1")
    # The realm names another host (same loopback address, another name): refused
    # before any token request, so bob's password never leaves.
    b.realm = b.realm.replace("127.0.0.1", "localhost")
    async with (
        mirror(None, **_upstreams(url_a, url_b)) as m,
        httpx.AsyncClient(base_url=m.url) as c,
    ):
        r = await c.get("/v2/team/app/manifests/1", params={"ns": "regb.test:5000"})
        assert r.status_code == 502
        assert r.json()["errors"][0]["code"] == "UNAUTHORIZED"
        assert "token realm" in r.json()["errors"][0]["message"]
    assert b.token_requests == []


async def test_token_hosts_allow_a_configured_realm(
    two: tuple[FakeUpstream, str, FakeUpstream, str], mirror: MirrorFactory
) -> None:
    _a, url_a, b, url_b = two
    digest = b.add_manifest(OCI, _manifest("b"), tag="1")
    b.realm = b.realm.replace("127.0.0.1", "localhost")
    settings = _upstreams(url_a, url_b, token_hosts=["localhost"])
    async with mirror(None, **settings) as m, httpx.AsyncClient(base_url=m.url) as c:
        r = await c.get("/v2/team/app/manifests/1", params={"ns": "regb.test:5000"})
        assert r.status_code == 200
        assert r.headers["docker-content-digest"] == digest
    assert len(b.token_requests) == 1


async def test_library_prefix_follows_the_docker_io_name(
    two: tuple[FakeUpstream, str, FakeUpstream, str], mirror: MirrorFactory
) -> None:
    a, url_a, b, url_b = two
    a.add_manifest(OCI, _manifest("a"), tag="3")
    b.add_manifest(OCI, _manifest("b"), tag="3")
    upstreams = [{"name": "docker.io", "url": url_a}, {"name": "regb.test:5000", "url": url_b}]
    async with (
        mirror(None, upstreams=upstreams) as m,
        httpx.AsyncClient(base_url=m.url) as c,
    ):
        assert (await c.get("/v2/alpine/manifests/3")).status_code == 200
        r = await c.get("/v2/alpine/manifests/3", params={"ns": "regb.test:5000"})
        assert r.status_code == 200
    assert {r.path for r in a.requests} == {"/v2/library/alpine/manifests/3"}
    assert {r.path for r in b.requests} == {"/v2/alpine/manifests/3"}  # only Hub adds it


async def test_realm_on_another_port_of_the_same_host_gets_no_credentials(
    two: tuple[FakeUpstream, str, FakeUpstream, str], mirror: MirrorFactory
) -> None:
    a, url_a, b, url_b = two
    b.add_manifest(OCI, _manifest("b"), tag="1")
    b.realm = f"{url_a}/token"  # B (or whoever answers for it) names A's server
    async with (
        mirror(None, **_upstreams(url_a, url_b)) as m,
        httpx.AsyncClient(base_url=m.url) as c,
    ):
        r = await c.get("/v2/team/app/manifests/1", params={"ns": "regb.test:5000"})
        assert r.status_code == 502
    assert a.token_requests == []  # bob's password never reached A


async def test_tags_list_next_page_stays_with_the_same_upstream(
    two: tuple[FakeUpstream, str, FakeUpstream, str], mirror: MirrorFactory
) -> None:
    a, url_a, _b, url_b = two
    async with (
        mirror(None, **_upstreams(url_a, url_b, path_prefix="regb")) as m,
        httpx.AsyncClient(base_url=m.url) as c,
    ):
        by_ns = await c.get("/v2/team/app/tags/list", params={"ns": "regb.test:5000", "n": 2})
        link = by_ns.headers["link"]
        assert link == '</v2/team/app/tags/list?n=2&last=b&ns=regb.test%3A5000>; rel="next"'
        assert (await c.get(link.split(";")[0].strip("<>"))).status_code == 200
        by_prefix = await c.get("/v2/regb/team/app/tags/list", params={"n": 2})
        assert by_prefix.headers["link"].startswith("</v2/regb/team/app/tags/list?")
    assert not [r for r in a.requests if r.path.endswith("/tags/list")]


async def test_base_endpoint_refuses_an_unknown_ns(
    two: tuple[FakeUpstream, str, FakeUpstream, str], mirror: MirrorFactory
) -> None:
    _a, url_a, _b, url_b = two
    async with (
        mirror(None, **_upstreams(url_a, url_b)) as m,
        httpx.AsyncClient(base_url=m.url) as c,
    ):
        assert (await c.get("/v2/", params={"ns": "evil.example"})).status_code == 403
        assert (await c.get("/v2/", params={"ns": "regb.test:5000"})).status_code == 200
        assert (await c.get("/v2/")).status_code == 200


async def test_single_upstream_shorthand_answers_containerds_docker_io(
    fake: tuple[FakeUpstream, str], mirror: MirrorFactory
) -> None:
    upstream, url = fake
    upstream.add_manifest(OCI, _manifest("x"), tag="1")
    async with mirror(url) as m, httpx.AsyncClient(base_url=m.url) as c:
        r = await c.get("/v2/library/alpine/manifests/1", params={"ns": "docker.io"})
        assert r.status_code == 200
        assert (await c.get("/v2/x/manifests/1", params={"ns": "ghcr.io"})).status_code == 403


async def test_deny_patterns_match_names_as_clients_write_them(
    two: tuple[FakeUpstream, str, FakeUpstream, str], mirror: MirrorFactory
) -> None:
    a, url_a, _b, _url_b = two
    a.add_manifest(OCI, _manifest("a"), tag="1")
    upstreams = [{"name": "docker.io", "url": url_a, "deny": ["alpine"]}]
    async with mirror(None, upstreams=upstreams) as m, httpx.AsyncClient(base_url=m.url) as c:
        assert (await c.get("/v2/alpine/manifests/1")).status_code == 403
        assert (await c.get("/v2/library/alpine/manifests/1")).status_code == 403
        assert (await c.get("/v2/library/busybox/manifests/1")).status_code == 200


async def test_one_upstreams_failure_never_breaks_another_upstreams_pull(
    two: tuple[FakeUpstream, str, FakeUpstream, str], mirror: MirrorFactory
) -> None:
    from fakes.upstream import Fault

    a, url_a, b, url_b = two
    blob = os.urandom(256 * 1024)
    digest = a.add_blob(blob)
    b.add_blob(blob)
    a.faults[digest] = Fault(wrong_bytes=True, delay=0.15)  # slow, then wrong
    async with (
        mirror(None, **_upstreams(url_a, url_b)) as m,
        httpx.AsyncClient(base_url=m.url, timeout=10) as c,
    ):

        async def via_a() -> httpx.Response | Exception:
            try:
                return await c.get(f"/v2/x/blobs/{digest}", params={"ns": "rega.test"})
            except httpx.HTTPError as exc:
                return exc

        broken = asyncio.create_task(via_a())
        await until(lambda: a.count("GET", f"/blobs/{digest}") == 1, "A's download")
        rb = await c.get(f"/v2/y/blobs/{digest}", params={"ns": "regb.test:5000"})
        assert isinstance(await broken, httpx.RemoteProtocolError)
    assert rb.status_code == 200 and rb.content == blob


def test_bad_patterns_and_urls_with_credentials_are_refused() -> None:
    from pydantic import ValidationError

    from mirror.config import Settings

    with pytest.raises(ValidationError, match="without a path or credentials"):
        Settings(upstreams=[{"name": "ghcr.io", "url": "https://bot:ghp_SECRET@ghcr.io"}])
    with pytest.raises(ValidationError, match="can never match"):
        Settings(upstreams=[{"name": "ghcr.io", "allow": ["MyOrg/*"]}])
    with pytest.raises(ValidationError, match="can never match"):
        Settings(upstreams=[{"name": "ghcr.io", "deny": ["ghcr.io/myorg/*"]}])
