"""`GET /v2/_catalog` (mirror.catalog): what the mirror cached, named as clients pull it,
paginated per the distribution spec, and only what the caller may pull."""

from __future__ import annotations

import base64
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import bcrypt
import httpx
import pytest
from conftest import MirrorFactory
from fakes.server import serve
from fakes.upstream import FakeUpstream
from harness.redisserver import RedisServer

from mirror.catalog import MAX_PAGE, Catalog, parse_n
from mirror.diskstore import DiskStore
from mirror.errors import RegistryError
from mirror.metrics import CacheUsage, Metrics
from mirror.redisindex import RedisIndex
from mirror.reference import Digest
from mirror.store import TagEntry, TagKey

OCI = "application/vnd.oci.image.manifest.v1+json"
MANIFEST = {"schemaVersion": 2, "mediaType": OCI, "layers": []}
D1 = Digest("sha256", "1" * 64)


def htpasswd(path: Path, users: dict[str, str]) -> Path:
    hashed = {u: bcrypt.hashpw(p.encode(), bcrypt.gensalt(rounds=4)) for u, p in users.items()}
    path.write_text("".join(f"{u}:{h.decode()}\n" for u, h in hashed.items()))
    return path


def basic(user: str, password: str) -> dict[str, str]:
    return {"Authorization": "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()}


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def error_code(response: httpx.Response) -> str:
    code: str = response.json()["errors"][0]["code"]
    return code


# What each upstream is asked for: (path the client uses, ns or None).
PULLS = [
    ("team/app", "1.0", None),
    ("team/app", "2.0", None),  # a second tag: still one repository
    ("base", "1.0", None),
    ("zeta/tool", "1.0", None),
    ("regb/team/app", "1.0", None),  # the path prefix of regb.test:5000
    ("other", "1.0", "regb.test:5000"),  # the same upstream by ns
    ("hidden/x", "1.0", "regc.test"),  # no prefix, not the default: ns only
]
EVERYTHING = ["base", "regb/other", "regb/team/app", "team/app", "zeta/tool"]


@pytest.fixture
async def upstreams() -> AsyncIterator[dict[str, Any]]:
    a, b = FakeUpstream(), FakeUpstream()
    for fake in (a, b):
        fake.add_manifest(OCI, MANIFEST, tag="1.0")
        fake.add_manifest(OCI, MANIFEST, tag="2.0")
    async with serve(a) as url_a, serve(b) as url_b:
        yield {
            "upstreams": [
                {"name": "rega.test", "url": url_a},
                {"name": "regb.test:5000", "url": url_b, "path_prefix": "regb"},
                {"name": "regc.test", "url": url_b},
            ],
            "default_upstream": "rega.test",
        }


async def _pull_all(mirror: MirrorFactory, settings: dict[str, Any]) -> None:
    async with mirror(None, **settings) as m, httpx.AsyncClient(base_url=m.url) as c:
        for name, tag, ns in PULLS:
            params = {"ns": ns} if ns else {}
            r = await c.get(f"/v2/{name}/manifests/{tag}", params=params)
            assert r.status_code == 200, (name, r.text)


async def _follow(c: httpx.AsyncClient, url: str, **kwargs: Any) -> tuple[list[str], int]:
    """Every name, following `Link` to the end; and how many pages it took."""
    names: list[str] = []
    pages = 0
    next_url: str | None = url
    while next_url is not None:
        r = await c.get(next_url, **kwargs)
        assert r.status_code == 200, r.text
        assert r.headers["content-type"] == "application/json"
        assert list(r.json()) == ["repositories"]
        names += r.json()["repositories"]
        pages += 1
        link = r.headers.get("link")
        next_url = link.partition(">")[0].lstrip("<") if link else None
        assert link is None or link.endswith('>; rel="next"')
    return names, pages


async def test_lists_cached_repositories_as_clients_name_them(
    upstreams: dict[str, Any], mirror: MirrorFactory
) -> None:
    await _pull_all(mirror, upstreams)
    async with mirror(None, **upstreams) as m, httpx.AsyncClient(base_url=m.url) as c:
        r = await c.get("/v2/_catalog")
        assert r.status_code == 200
        assert r.json() == {"repositories": EVERYTHING}
        assert "link" not in r.headers
        # containerd style: one upstream, its own names.
        ns_b = await c.get("/v2/_catalog", params={"ns": "regb.test:5000"})
        assert ns_b.json() == {"repositories": ["other", "team/app"]}
        ns_c = await c.get("/v2/_catalog", params={"ns": "regc.test"})
        assert ns_c.json() == {"repositories": ["hidden/x"]}
        unknown = await c.get("/v2/_catalog", params={"ns": "elsewhere.test"})
        assert unknown.status_code == 403 and error_code(unknown) == "DENIED"
        # Every listed name pulls (from the cache) as listed.
        for name in EVERYTHING:
            assert (await c.get(f"/v2/{name}/manifests/1.0")).headers["x-cache"] == "HIT"
        assert (await c.head("/v2/_catalog")).status_code == 200
        assert (
            m.metric("mirror_http_requests_total", route="/v2/_catalog", method="GET", status="200")
            == 3
        )
        # Still read-only.
        assert (await c.delete("/v2/_catalog")).status_code == 405


async def test_pagination_follows_link_to_the_end(
    upstreams: dict[str, Any], mirror: MirrorFactory
) -> None:
    await _pull_all(mirror, upstreams)
    async with mirror(None, **upstreams) as m, httpx.AsyncClient(base_url=m.url) as c:
        first = await c.get("/v2/_catalog", params={"n": "2"})
        assert first.json() == {"repositories": EVERYTHING[:2]}
        assert first.headers["link"] == '</v2/_catalog?n=2&last=regb%2Fother>; rel="next"'
        names, pages = await _follow(c, "/v2/_catalog?n=2")
        assert (names, pages) == (EVERYTHING, 3)
        names, pages = await _follow(c, "/v2/_catalog?n=1&ns=regb.test%3A5000")
        assert (names, pages) == (["other", "team/app"], 2)
        # A page that ends exactly at the end has no next link.
        exact = await c.get("/v2/_catalog", params={"n": "5"})
        assert len(exact.json()["repositories"]) == 5 and "link" not in exact.headers
        after = await c.get("/v2/_catalog", params={"last": "regb/team/app"})
        assert after.json() == {"repositories": ["team/app", "zeta/tool"]}
        past = await c.get("/v2/_catalog", params={"last": "zzz"})
        assert past.json() == {"repositories": []}
        empty = await c.get("/v2/_catalog", params={"n": ""})  # as absent (Distribution)
        assert empty.json() == {"repositories": EVERYTHING}
        zero = await c.get("/v2/_catalog", params={"n": "0"})
        assert zero.json() == {"repositories": []} and "link" not in zero.headers
        for bad in ("-1", "abc", "1.5", "\uff11"):  # not even a full-width digit
            r = await c.get("/v2/_catalog", params={"n": bad})
            assert r.status_code == 400, bad
            assert error_code(r) == "PAGINATION_NUMBER_INVALID"


async def test_only_what_the_caller_may_pull(
    upstreams: dict[str, Any], mirror: MirrorFactory, tmp_path: Path
) -> None:
    await _pull_all(mirror, upstreams)
    users = htpasswd(tmp_path / "htpasswd", {"alice": "wonderland", "bob": "builder"})
    rules = [
        {"users": ["alice"], "repositories": ["team/*"]},
        {"users": ["bob"], "upstreams": ["regb.test:5000"]},
    ]
    settings = upstreams | {"auth_htpasswd": users, "access": rules}
    async with mirror(None, **settings) as m, httpx.AsyncClient(base_url=m.url) as c:
        anonymous = await c.get("/v2/_catalog")
        assert anonymous.status_code == 401 and error_code(anonymous) == "UNAUTHORIZED"
        assert 'realm="http://127.0.0.1:' in anonymous.headers["www-authenticate"]
        alice = await c.get("/v2/_catalog", headers=basic("alice", "wonderland"))
        assert alice.json() == {"repositories": ["regb/team/app", "team/app"]}
        bob = await c.get("/v2/_catalog", headers=basic("bob", "builder"))
        assert bob.json() == {"repositories": ["regb/other", "regb/team/app"]}
        names, _ = await _follow(c, "/v2/_catalog?n=1", headers=basic("bob", "builder"))
        assert names == ["regb/other", "regb/team/app"]
        wrong = await c.get("/v2/_catalog", headers=basic("bob", "wrong"))
        assert wrong.status_code == 401
        # A realm token (Docker asks for registry:catalog:*, never granted): the rules
        # decide, not the token's repository list.
        grant = await c.get(
            "/auth/token",
            params={"scope": "registry:catalog:*"},
            headers=basic("alice", "wonderland"),
        )
        token = grant.json()["token"]
        by_token = await c.get("/v2/_catalog", headers=bearer(token))
        assert by_token.json() == {"repositories": ["regb/team/app", "team/app"]}
        assert m.metric("mirror_client_auth_total", method="anonymous", result="denied") == 1


async def test_anonymous_sees_what_anonymous_may_pull(
    upstreams: dict[str, Any], mirror: MirrorFactory, tmp_path: Path
) -> None:
    await _pull_all(mirror, upstreams)
    users = htpasswd(tmp_path / "htpasswd", {"alice": "wonderland"})
    open_rules = [{"anonymous": True, "repositories": ["base", "other"]}, {"users": ["*"]}]
    settings = upstreams | {"auth_htpasswd": users, "auth_anonymous": True}
    async with (
        mirror(None, **settings, access=open_rules) as m,
        httpx.AsyncClient(base_url=m.url) as c,
    ):
        assert (await c.get("/v2/_catalog")).json() == {"repositories": ["base", "regb/other"]}
        alice = await c.get("/v2/_catalog", headers=basic("alice", "wonderland"))
        assert alice.json() == {"repositories": EVERYTHING}
    # Anonymous may pull nothing: told to log in, like at /v2/.
    async with (
        mirror(None, **settings, access=[{"users": ["*"]}]) as m,
        httpx.AsyncClient(base_url=m.url) as c,
    ):
        assert (await c.get("/v2/_catalog")).status_code == 401


async def test_upstream_policy_and_removed_upstreams_hide_cached_repositories(
    upstreams: dict[str, Any], mirror: MirrorFactory
) -> None:
    await _pull_all(mirror, upstreams)
    rega, regb, _ = upstreams["upstreams"]
    changed = {
        "upstreams": [rega | {"deny": ["zeta/*"]}, regb],  # regc.test is gone
        "default_upstream": "rega.test",
    }
    async with mirror(None, **changed) as m, httpx.AsyncClient(base_url=m.url) as c:
        assert (await c.get("/v2/_catalog")).json() == {
            "repositories": ["base", "regb/other", "regb/team/app", "team/app"]
        }
        assert (await c.get("/v2/zeta/tool/manifests/1.0")).status_code == 403


# -- the store's side, and the catalog's cache --------------------------------------


def _key(upstream: str, repo: str, tag: str = "1") -> TagKey:
    return TagKey(upstream, repo, tag, "accept-key")


async def test_disk_store_lists_distinct_pairs_until_their_tags_are_dropped(
    tmp_path: Path,
) -> None:
    store = DiskStore(tmp_path / "cache")
    try:
        keys = [_key("b.test", "x"), _key("b.test", "x", "2"), _key("a.test", "library/y")]
        for key in keys:
            await store.put_tag(key, TagEntry(D1, OCI, 1.0))
        assert store.repositories() == [("a.test", "library/y"), ("b.test", "x")]
        store.drop_tags(keys[:1])
        assert store.repositories() == [("a.test", "library/y"), ("b.test", "x")]
        store.drop_tags(keys[1:])  # the last tags evicted: the repositories go
        assert store.repositories() == []
    finally:
        store.close()


async def test_redis_index_lists_distinct_pairs(redis_server: RedisServer) -> None:
    metrics = Metrics()
    metrics.add_shared_store()
    index = RedisIndex(redis_server.url, metrics, prefix=f"{uuid.uuid4().hex}:")
    try:
        assert index.repositories() == []
        # More than one HSCAN batch.
        for i in range(1500):
            await index.put_tag(_key("r.test", f"repo{i % 700}", str(i)), TagEntry(D1, OCI, 1.0))
        pairs = index.repositories()
        assert pairs == sorted(("r.test", f"repo{i}") for i in range(700))
    finally:
        await index.aclose()


class CountingStore:
    def __init__(self) -> None:
        self.scans = 0
        self.pairs = [("a.test", "x")]

    def repositories(self) -> list[tuple[str, str]]:
        self.scans += 1
        return list(self.pairs)

    def usage(self) -> CacheUsage:
        return CacheUsage(0, 0, 0, len(self.pairs))  # the tag count: the change signal


async def test_catalog_rescans_for_a_first_page_only_when_tags_changed() -> None:
    store = CountingStore()
    now = [0.0]
    catalog = Catalog(store, clock=lambda: now[0], ttl=5.0)  # type: ignore[arg-type]
    assert await catalog.pairs() == [("a.test", "x")]
    assert await catalog.pairs() == [("a.test", "x")] and store.scans == 1
    store.pairs.append(("b.test", "y"))
    now[0] = 4.9
    # The next page of a listing: the scan the listing began with.
    assert await catalog.pairs(first_page=False) == [("a.test", "x")]
    # A new listing: the new tag at once.
    assert await catalog.pairs() == [("a.test", "x"), ("b.test", "y")]
    assert store.scans == 2
    store.pairs.append(("c.test", "z"))
    now[0] = 9.9
    assert len(await catalog.pairs(first_page=False)) == 3  # older than the TTL
    assert store.scans == 3


async def test_slow_scans_are_not_repeated_back_to_back() -> None:
    store = CountingStore()
    now = [0.0]

    def slow_scan() -> list[tuple[str, str]]:
        now[0] += 1.0  # each scan takes a second
        return CountingStore.repositories(store)

    store.repositories = slow_scan  # type: ignore[method-assign]
    catalog = Catalog(store, clock=lambda: now[0], ttl=5.0)  # type: ignore[arg-type]
    await catalog.pairs()  # read at 0, done at 1
    store.pairs.append(("b.test", "y"))
    assert len(await catalog.pairs()) == 1  # changed, but only 1 s after a 1 s scan
    now[0] = 2.0
    assert len(await catalog.pairs()) == 2
    assert store.scans == 2


def test_page_size() -> None:
    assert parse_n(None) == 100
    assert parse_n("7") == 7
    assert parse_n(str(MAX_PAGE * 10)) == MAX_PAGE  # lowered to the cap, not refused
    with pytest.raises(RegistryError):
        parse_n("9" * 40)
