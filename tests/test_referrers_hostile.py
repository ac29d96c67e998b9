"""The referrers API and the catalog against a hostile upstream and hostile clients:
what an upstream's referrers answer may put in front of verifiers, and what a client's
referrers requests may leave in the cache for others to see."""

from __future__ import annotations

import asyncio
import hashlib
import json
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import parse_qsl

import httpx
import pytest
from click.testing import CliRunner
from conftest import MirrorFactory
from fakes.clock import Clock
from fakes.server import serve
from fakes.upstream import FakeUpstream, Fault
from harness.redisserver import RedisServer
from starlette.types import Send
from test_referrers import SIG, _artifact, _image

from mirror.cli import main
from mirror.mediatypes import OCI_INDEX, OCI_MANIFEST
from mirror.metrics import Metrics
from mirror.redisindex import RedisIndex
from mirror.reference import Digest
from mirror.referrers import CACHE_KEY as REFERRERS
from mirror.store import TagEntry, TagKey
from mirror.upstream import REFERRERS_MAX_PAGES


async def test_descriptors_a_client_cannot_fetch_are_dropped_from_the_index(
    fake: tuple[FakeUpstream, str], mirror: MirrorFactory
) -> None:
    upstream, url = fake
    subject = _image(upstream)
    good = _artifact(upstream, subject, SIG, b"signature")
    hexes = "a" * 64
    bad = [
        {**good, "digest": "../../../v2/_catalog"},  # not a digest: a path for warm
        {**good, "digest": f"sha256:{hexes.upper()}"},  # uppercase hex
        {**good, "digest": f"md5:{'a' * 32}"},  # an algorithm nobody can fetch by
        {**good, "digest": f"sha256:{'b' * 64}", "size": -1},  # a negative size
        {**good, "digest": f"sha256:{'c' * 64}", "size": True},  # bool is not a size
    ]
    upstream.referrers = {subject: [bad[0], good, *bad[1:]]}
    async with mirror(url) as m, httpx.AsyncClient(base_url=m.url) as c:
        r = await c.get(f"/v2/app/referrers/{subject}")
    assert r.status_code == 200
    assert r.json()["manifests"] == [good]


async def test_referrers_asked_of_any_name_do_not_list_it_in_the_catalog(
    fake: tuple[FakeUpstream, str], mirror: MirrorFactory
) -> None:
    upstream, url = fake
    _image(upstream)  # tag v1 of every repository
    digest = f"sha256:{'d' * 64}"
    async with mirror(url) as m, httpx.AsyncClient(base_url=m.url) as c:
        assert (await c.get("/v2/app/manifests/v1")).status_code == 200
        # Any client may name any repository: the (empty) answer is cached, but the
        # name is no repository the mirror holds.
        for name in ("made/up", "zz-spam"):
            r = await c.get(f"/v2/{name}/referrers/{digest}")
            assert (r.status_code, r.json()["manifests"]) == (200, [])
        listing = await c.get("/v2/_catalog")
    assert listing.json() == {"repositories": ["app"]}


async def test_the_synthesised_index_is_not_a_manifest_of_the_repository(
    fake: tuple[FakeUpstream, str], mirror: MirrorFactory
) -> None:
    upstream, url = fake
    subject = _image(upstream)
    upstream.referrers = {subject: [_artifact(upstream, subject, SIG, b"signature")]}
    async with mirror(url) as m, httpx.AsyncClient(base_url=m.url) as c:
        r = await c.get(f"/v2/app/referrers/{subject}")
        index_digest = "sha256:" + hashlib.sha256(r.content).hexdigest()
        for repo in ("app", "other"):
            got = await c.get(
                f"/v2/{repo}/manifests/{index_digest}",
                headers={"Accept": f"{OCI_MANIFEST}, application/vnd.oci.image.index.v1+json"},
            )
            assert got.status_code == 404, (repo, got.status_code)


@dataclass
class RawReferrers(FakeUpstream):
    """An upstream whose referrers endpoint answers exactly these bytes, in `chunks`
    pieces `delay` seconds apart (a trickle)."""

    raw: bytes = b""
    raw_type: str = OCI_INDEX
    chunks: int = 1
    delay: float = 0.0

    async def _referrers(self, send: Send, digest: str, query: str) -> None:
        hdrs = [(b"content-type", self.raw_type.encode())]
        hdrs.append((b"content-length", str(len(self.raw)).encode()))
        await send({"type": "http.response.start", "status": 200, "headers": hdrs})
        step = -(-len(self.raw) // self.chunks)
        for i in range(0, len(self.raw), step):
            await asyncio.sleep(self.delay)
            more = i + step < len(self.raw)
            await send(
                {"type": "http.response.body", "body": self.raw[i : i + step], "more_body": more}
            )


@pytest.fixture
async def raw() -> AsyncIterator[tuple[RawReferrers, str]]:
    upstream = RawReferrers()
    async with serve(upstream) as url:
        yield upstream, url


def _index(manifests: object) -> bytes:
    return json.dumps({"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": manifests}).encode()


async def test_answers_that_are_no_index_are_a_502_never_a_500(
    raw: tuple[RawReferrers, str], mirror: MirrorFactory
) -> None:
    upstream, url = raw
    subject = _image(upstream)
    good = _artifact(upstream, subject, SIG, b"signature")
    cases = [
        b"<html>not json</html>",
        b"\xff\xfe\x00garbage",
        b"[" * 100_000 + b"]" * 100_000,  # nesting deep enough to break a recursive parser
        b'["manifests"]',
        b'{"manifests": {"0": 1}}',
        b"null",
        _index([good] * 60_000),  # over manifest_max_bytes (4 MiB)
    ]
    async with mirror(url) as m, httpx.AsyncClient(base_url=m.url) as c:
        for body in cases:
            upstream.raw = body
            r = await c.get(f"/v2/app/referrers/{subject}")
            assert r.status_code == 502, (body[:30], r.status_code)
            assert r.json()["errors"][0]["code"] == "MANIFEST_INVALID"
        # A Content-Type lie (text/html) over a real index is just bytes: parsed, and
        # answered as an OCI index.
        upstream.raw, upstream.raw_type = _index([good, "junk", {"digest": 1}]), "text/html"
        r = await c.get(f"/v2/app/referrers/{subject}")
    assert (r.status_code, r.headers["content-type"]) == (200, OCI_INDEX)
    assert r.json()["manifests"] == [good]


async def test_a_trickling_answer_is_cut_at_fetch_timeout(
    raw: tuple[RawReferrers, str], mirror: MirrorFactory
) -> None:
    upstream, url = raw
    subject = _image(upstream)
    upstream.raw = _index([_artifact(upstream, subject, SIG, b"signature")])
    upstream.chunks, upstream.delay = 20, 0.25  # 5 s in all
    async with mirror(url, fetch_timeout="1s") as m, httpx.AsyncClient(base_url=m.url) as c:
        started = time.monotonic()
        r = await c.get(f"/v2/app/referrers/{subject}", timeout=10)
        took = time.monotonic() - started
    assert r.status_code >= 500 and "errors" in r.json()
    assert r.status_code != 500
    assert took < 3


async def test_hostile_client_requests(
    fake: tuple[FakeUpstream, str], mirror: MirrorFactory
) -> None:
    upstream, url = fake
    subject = _image(upstream)
    sig = _artifact(upstream, subject, SIG, b"signature")
    upstream.referrers = {subject: [sig]}
    path = f"/v2/app/referrers/{subject}"
    async with mirror(url) as m, httpx.AsyncClient(base_url=m.url) as c:
        # CRLF and a long value in artifactType: a filter value, echoed nowhere.
        for wanted in (f"{SIG}\r\nX-Evil: 1", "x" * 6000):
            r = await c.get(path, params={"artifactType": wanted})
            assert r.status_code == 200
            assert r.json()["manifests"] == []
            assert "x-evil" not in r.headers
            assert r.headers["oci-filters-applied"] == "artifactType"
        # Digest tricks: uppercase, unknown algorithm, traversal, a trailing segment.
        hexes = subject.partition(":")[2]
        for bad in (f"sha256:{hexes.upper()}", f"sha1:{hexes[:40]}", f"sha256:{hexes}/.."):
            r = await c.get(f"/v2/app/referrers/{bad}")
            assert r.status_code in (400, 404), (bad, r.status_code)
            assert "errors" in r.json()
        traversal = await c.get(f"/v2/app/referrers/..%2F..%2F{subject}")
        assert traversal.status_code in (400, 404) and "errors" in traversal.json()
        # sha512 subjects have a tag-schema tag longer than a tag may be: still answered.
        long = await c.get(f"/v2/app/referrers/sha512:{'a' * 128}")
        assert (long.status_code, long.json()["manifests"]) == (200, [])
        # Another repository, the same digest: asked of the upstream, not app's entry.
        assert (await c.get(f"/v2/other/referrers/{subject}")).headers["x-cache"] == "MISS"
    assert sum(1 for s in upstream.requests if s.path == f"/v2/other/referrers/{subject}") == 1


async def test_catalog_parameters_from_a_hostile_client(
    fake: tuple[FakeUpstream, str], mirror: MirrorFactory
) -> None:
    upstream, url = fake
    _image(upstream)
    async with mirror(url) as m, httpx.AsyncClient(base_url=m.url) as c:
        for name in ("a", "b", "c"):
            assert (await c.get(f"/v2/{name}/manifests/v1")).status_code == 200
        for n in ("-1", "1.5", "\u0661", "\u00b2", "0x10", "9" * 13, " 1"):
            r = await c.get("/v2/_catalog", params={"n": n})
            assert r.status_code == 400, (n, r.status_code)
            assert r.json()["errors"][0]["code"] == "PAGINATION_NUMBER_INVALID"
        # `last` comes back in Link only as the last name shown, and encoded.
        evil = 'a\r\nSet-Cookie: x=1"><https://evil.test/>'
        r = await c.get("/v2/_catalog", params={"n": "1", "last": evil})
        assert r.status_code == 200 and "set-cookie" not in r.headers
        assert r.json() == {"repositories": ["b"]}
        assert r.headers["link"] == '</v2/_catalog?n=1&last=b>; rel="next"'
        big = await c.get("/v2/_catalog", params={"n": "99999"})  # lowered to the cap
        assert (big.json(), big.headers.get("link")) == ({"repositories": ["a", "b", "c"]}, None)
        bad_ns = await c.get("/v2/_catalog", params={"ns": "x\r\nY: 1"})
        assert bad_ns.status_code in (400, 403) and "errors" in bad_ns.json()


async def test_warm_reports_a_referrer_failing_verification_and_does_not_count_it(
    fake: tuple[FakeUpstream, str], mirror: MirrorFactory
) -> None:
    upstream, url = fake
    subject = _image(upstream)
    sig = _artifact(upstream, subject, SIG, b"signature")
    bad = _artifact(upstream, subject, SIG, b"tampered")
    # A cycle: the signature names the image's manifest as a referrer of itself.
    upstream.referrers = {subject: [bad, sig], sig["digest"]: [{**sig, "digest": subject}]}
    upstream.faults[bad["digest"]] = Fault(wrong_bytes=True)
    async with mirror(url) as m:
        result = await asyncio.to_thread(
            CliRunner().invoke, main, ["warm", "--mirror", m.url, "--with-referrers", "app:v1"]
        )
    assert result.exit_code == 1
    assert f"app:v1: failed: the mirror answered 502 for /v2/app/manifests/{bad['digest']}" in (
        result.output
    )
    assert "DIGEST_INVALID" in result.output
    assert "referrers," not in result.output  # nothing claimed warm


@dataclass
class PagedReferrers(FakeUpstream):
    """A referrers API that pages (`Link: <...>; rel="next"`, as the spec allows),
    `page` descriptors at a time; `next_base` points the link elsewhere."""

    page: int = 2
    next_base: str = ""

    async def _referrers(self, send: Send, digest: str, query: str) -> None:
        listed = (self.referrers or {}).get(digest, [])
        start = int(dict(parse_qsl(query)).get("page", "0"))
        body = _index(listed[start : start + self.page])
        hdrs = [(b"content-type", OCI_INDEX.encode()), (b"content-length", b"%d" % len(body))]
        if start + self.page < len(listed):
            link = f"<{self.next_base}/v2/app/referrers/{digest}?page={start + self.page}>"
            hdrs.append((b"link", f'{link}; rel="next"'.encode()))
        await send({"type": "http.response.start", "status": 200, "headers": hdrs})
        await send({"type": "http.response.body", "body": body})


async def test_a_paged_upstream_answer_is_followed_to_the_end_on_the_upstream_only(
    mirror: MirrorFactory, tmp_path: Path
) -> None:
    upstream, elsewhere = PagedReferrers(), PagedReferrers()
    subject = _image(upstream)
    listed = [_artifact(upstream, subject, SIG, b"s%d" % i) for i in range(5)]
    upstream.referrers = elsewhere.referrers = {subject: listed}
    async with serve(upstream) as url, serve(elsewhere) as off_site:
        async with mirror(url) as m, httpx.AsyncClient(base_url=m.url) as c:
            r = await c.get(f"/v2/app/referrers/{subject}")
            assert r.json()["manifests"] == listed
            assert sum(1 for s in upstream.requests if "/referrers/" in s.path) == 3
        # A link to another host is not followed: its answer is no upstream's.
        upstream.next_base = off_site
        async with (
            mirror(url, cache_dir=tmp_path / "other") as m2,
            httpx.AsyncClient(base_url=m2.url) as c,
        ):
            r = await c.get(f"/v2/app/referrers/{subject}")
        assert r.status_code == 502
        assert elsewhere.requests == []


async def test_an_upstream_paging_without_end_is_cut_at_the_page_bound(
    mirror: MirrorFactory,
) -> None:
    upstream = PagedReferrers(page=1)
    subject = _image(upstream)
    sig = _artifact(upstream, subject, SIG, b"s")
    upstream.referrers = {subject: [sig] * (REFERRERS_MAX_PAGES + 10)}
    async with serve(upstream) as url, mirror(url) as m, httpx.AsyncClient(base_url=m.url) as c:
        r = await c.get(f"/v2/app/referrers/{subject}")
    assert (r.status_code, r.json()["errors"][0]["code"]) == (502, "MANIFEST_INVALID")
    assert sum(1 for s in upstream.requests if "/referrers/" in s.path) == REFERRERS_MAX_PAGES


async def test_the_redis_index_does_not_list_referrers_only_names(
    redis_server: RedisServer,
) -> None:
    metrics = Metrics()
    metrics.add_shared_store()
    index = RedisIndex(redis_server.url, metrics, prefix=f"{uuid.uuid4().hex}:")
    digest = Digest("sha256", "1" * 64)
    try:
        await index.put_tag(TagKey("r.test", "real", "v1", "-"), TagEntry(digest, OCI_INDEX, 1.0))
        ghost = TagKey("r.test", "ghost", f"sha256-{'2' * 64}", REFERRERS)
        await index.put_tag(ghost, TagEntry(digest, OCI_INDEX, 1.0))
        assert index.repositories() == [("r.test", "real")]
    finally:
        await index.aclose()


async def test_a_pull_of_the_tag_schema_tag_never_gets_the_cached_referrers_answer(
    fake: tuple[FakeUpstream, str], mirror: MirrorFactory
) -> None:
    upstream, url = fake
    subject = _image(upstream)
    upstream.referrers = {subject: [_artifact(upstream, subject, SIG, b"signature")]}
    tag = subject.replace(":", "-")
    async with mirror(url) as m, httpx.AsyncClient(base_url=m.url) as c:
        assert (await c.get(f"/v2/app/referrers/{subject}")).status_code == 200
        for accept in ("referrers", OCI_INDEX, "*/*", ""):
            r = await c.get(f"/v2/app/manifests/{tag}", headers={"Accept": accept})
            assert r.status_code == 404, (accept, r.status_code)  # the upstream has no such tag
    assert upstream.count("GET", f"/manifests/{tag}") == 4


async def test_a_429_serves_the_stale_answer_and_a_manifest_tag_is_no_index(
    fake: tuple[FakeUpstream, str], mirror: MirrorFactory
) -> None:
    upstream, url = fake
    clock = Clock()
    subject = _image(upstream)
    sig = _artifact(upstream, subject, SIG, b"signature")
    upstream.referrers = {subject: [sig]}
    path = f"/v2/app/referrers/{subject}"
    async with (
        mirror(url, clock=clock, tag_ttl="1m", max_stale="1h") as m,
        httpx.AsyncClient(base_url=m.url) as c,
    ):
        assert (await c.get(path)).status_code == 200
        upstream.faults[f"referrers:{subject}"] = Fault(status=429)
        clock.now += 61
        stale = await c.get(path)
        assert (stale.status_code, stale.headers["x-cache"]) == (200, "STALE")
        assert stale.json()["manifests"] == [sig]
        # Tag schema: a tag `sha256-<hex>` holding an image manifest, not an index.
        upstream.referrers, upstream.faults = None, {}
        other = _image(upstream)  # the same image: its digest is the subject's
        upstream.manifests[subject.replace(":", "-")] = upstream.manifests[other]
        r = await c.get(f"/v2/fresh/referrers/{subject}")
    assert (r.status_code, r.json()["errors"][0]["code"]) == (502, "MANIFEST_INVALID")
