"""The OCI referrers API through the mirror, against the in-process fake upstream:
the upstream's API where it has one, the referrers tag schema where it answers 404,
filtering, caching like a tag, and artifacts pulled like images."""

from __future__ import annotations

import asyncio
import hashlib
import json
from typing import Any

import httpx
from click.testing import CliRunner
from conftest import MirrorFactory
from fakes.chain import tier_chain
from fakes.clock import Clock
from fakes.upstream import FakeUpstream, Fault, sha256

from mirror.cli import main
from mirror.mediatypes import OCI_INDEX, OCI_MANIFEST
from mirror.reference import Digest
from mirror.warm import ACCEPT

EMPTY_CONFIG = "application/vnd.oci.empty.v1+json"
SIG = "application/vnd.dev.cosign.artifact.sig.v1+json"
SBOM = "application/spdx+json"
EMPTY_INDEX = {"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": []}


def _image(upstream: FakeUpstream) -> str:
    config = upstream.add_blob(b'{"os":"linux","architecture":"amd64"}')
    return upstream.add_manifest(
        OCI_MANIFEST,
        {
            "schemaVersion": 2,
            "mediaType": OCI_MANIFEST,
            "config": {
                "mediaType": "application/vnd.oci.image.config.v1+json",
                "digest": config,
                "size": 37,
            },
            "layers": [],
        },
        tag="v1",
    )


def _artifact(
    upstream: FakeUpstream, subject: str, artifact_type: str, payload: bytes
) -> dict[str, Any]:
    """An OCI 1.1 artifact: `artifactType`, the empty config, one non-image layer."""
    empty = upstream.add_blob(b"{}")
    layer = upstream.add_blob(payload)
    manifest = {
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "artifactType": artifact_type,
        "config": {"mediaType": EMPTY_CONFIG, "digest": empty, "size": 2, "data": "e30="},
        "layers": [{"mediaType": artifact_type, "digest": layer, "size": len(payload)}],
        "subject": {"mediaType": OCI_MANIFEST, "digest": subject, "size": 1},
        "annotations": {"org.example.kind": artifact_type},
    }
    digest = upstream.add_manifest(OCI_MANIFEST, manifest)
    body = upstream.manifests[digest][1]
    return {
        "mediaType": OCI_MANIFEST,
        "digest": digest,
        "size": len(body),
        "artifactType": artifact_type,
    }


def _referrer_gets(upstream: FakeUpstream) -> int:
    return sum(1 for r in upstream.requests if "/referrers/" in r.path)


def _fallback_tag(digest: str) -> str:
    return digest.replace(":", "-")


async def test_the_upstream_referrers_api_is_used_where_it_exists(
    fake: tuple[FakeUpstream, str], mirror: MirrorFactory
) -> None:
    upstream, url = fake
    subject = _image(upstream)
    sig = _artifact(upstream, subject, SIG, b"signature")
    sbom = _artifact(upstream, subject, SBOM, b'{"spdxVersion":"SPDX-2.3"}')
    upstream.referrers = {subject: [sig, sbom]}
    async with mirror(url) as m, httpx.AsyncClient(base_url=m.url) as c:
        r = await c.get(f"/v2/app/referrers/{subject}")
    assert r.status_code == 200
    assert r.headers["content-type"] == OCI_INDEX
    assert r.headers["x-cache"] == "MISS"
    assert "oci-filters-applied" not in r.headers
    assert r.json() == {"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": [sig, sbom]}
    assert _referrer_gets(upstream) == 1
    assert upstream.count("GET", f"/manifests/{_fallback_tag(subject)}") == 0


async def test_without_a_referrers_api_the_tag_schema_is_used(
    fake: tuple[FakeUpstream, str], mirror: MirrorFactory
) -> None:
    upstream, url = fake
    subject = _image(upstream)
    sig = _artifact(upstream, subject, SIG, b"signature")
    fallback = {"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": [sig]}
    upstream.add_manifest(OCI_INDEX, fallback, tag=_fallback_tag(subject))
    async with mirror(url) as m, httpx.AsyncClient(base_url=m.url) as c:
        r = await c.get(f"/v2/app/referrers/{subject}")
        assert (r.status_code, r.json()["manifests"]) == (200, [sig])
        # A referrer fetched by digest then goes the normal way: verified and cached.
        got = await c.get(f"/v2/app/manifests/{sig['digest']}", headers={"Accept": OCI_MANIFEST})
    assert got.status_code == 200
    assert sha256(got.content) == sig["digest"]
    assert got.headers["content-type"] == OCI_MANIFEST
    assert _referrer_gets(upstream) == 1
    assert upstream.count("GET", f"/manifests/{_fallback_tag(subject)}") == 1


async def test_no_referrers_at_all_is_an_empty_index(
    fake: tuple[FakeUpstream, str], mirror: MirrorFactory
) -> None:
    upstream, url = fake
    subject = _image(upstream)
    async with mirror(url) as m, httpx.AsyncClient(base_url=m.url) as c:
        for repo, api in (("app", None), ("other", {})):
            upstream.referrers = api  # no API (Distribution 2.x); an API with nothing
            r = await c.get(f"/v2/{repo}/referrers/{subject}")
            assert r.status_code == 200
            assert r.headers["content-type"] == OCI_INDEX
            assert r.json() == EMPTY_INDEX


async def test_filtering_by_artifact_type_is_done_by_the_mirror_and_said(
    fake: tuple[FakeUpstream, str], mirror: MirrorFactory
) -> None:
    upstream, url = fake
    subject = _image(upstream)
    sig = _artifact(upstream, subject, SIG, b"signature")
    sbom = _artifact(upstream, subject, SBOM, b"{}")
    upstream.referrers = {subject: [sig, sbom]}
    async with mirror(url) as m, httpx.AsyncClient(base_url=m.url) as c:
        only = await c.get(f"/v2/app/referrers/{subject}", params={"artifactType": SBOM})
        none = await c.get(f"/v2/app/referrers/{subject}", params={"artifactType": "x/y"})
        everything = await c.get(f"/v2/app/referrers/{subject}")
    assert only.json()["manifests"] == [sbom]
    assert only.headers["oci-filters-applied"] == "artifactType"
    assert (none.status_code, none.json()) == (200, EMPTY_INDEX)
    assert none.headers["oci-filters-applied"] == "artifactType"
    assert everything.json()["manifests"] == [sig, sbom]
    assert "oci-filters-applied" not in everything.headers
    # One unfiltered answer, cached, serves every filter.
    assert _referrer_gets(upstream) == 1
    assert all("artifactType" not in r.query for r in upstream.requests)


async def test_cached_like_a_tag_revalidated_after_its_ttl_and_stale_when_upstream_fails(
    fake: tuple[FakeUpstream, str], mirror: MirrorFactory
) -> None:
    upstream, url = fake
    clock = Clock()
    subject = _image(upstream)
    sig = _artifact(upstream, subject, SIG, b"signature")
    upstream.referrers = {subject: [sig]}
    path = f"/v2/app/referrers/{subject}"
    async with (
        mirror(url, clock=clock, tag_ttl="5m", max_stale="1h") as m,
        httpx.AsyncClient(base_url=m.url) as c,
    ):
        assert (await c.get(path)).headers["x-cache"] == "MISS"
        clock.now += 299
        hit = await c.get(path)
        assert (hit.headers["x-cache"], hit.json()["manifests"]) == ("HIT", [sig])
        assert _referrer_gets(upstream) == 1  # within the TTL: no upstream request

        sbom = _artifact(upstream, subject, SBOM, b"{}")
        upstream.referrers[subject].append(sbom)
        clock.now += 2
        again = await c.get(path)
        assert (again.headers["x-cache"], again.json()["manifests"]) == ("REVALIDATED", [sig, sbom])
        assert _referrer_gets(upstream) == 2

        upstream.faults[f"referrers:{subject}"] = Fault(status=503)
        clock.now += 301
        stale = await c.get(path, params={"artifactType": SBOM})
        assert stale.status_code == 200
        assert (stale.headers["x-cache"], stale.json()["manifests"]) == ("STALE", [sbom])

        clock.now += 3600  # past max_stale: the upstream's trouble shows
        gone = await c.get(path)
        assert gone.status_code >= 500
        assert "errors" in gone.json()


async def test_a_404_from_the_upstream_is_never_hidden_by_a_stale_answer(
    fake: tuple[FakeUpstream, str], mirror: MirrorFactory
) -> None:
    """Tag schema: once the tag is gone, the referrers are gone (an empty index)."""
    upstream, url = fake
    clock = Clock()
    subject = _image(upstream)
    sig = _artifact(upstream, subject, SIG, b"signature")
    tag = _fallback_tag(subject)
    upstream.add_manifest(OCI_INDEX, {**EMPTY_INDEX, "manifests": [sig]}, tag=tag)
    path = f"/v2/app/referrers/{subject}"
    async with mirror(url, clock=clock, tag_ttl="1m") as m, httpx.AsyncClient(base_url=m.url) as c:
        assert (await c.get(path)).json()["manifests"] == [sig]
        upstream.faults[tag] = Fault(status=502)
        clock.now += 61
        assert (await c.get(path)).headers["x-cache"] == "STALE"
        del upstream.manifests[tag]
        clock.now += 61
        r = await c.get(path)
    assert (r.headers["x-cache"], r.json()) == ("REVALIDATED", EMPTY_INDEX)


async def test_ttl_rules_match_the_referrers_pseudo_tag(
    fake: tuple[FakeUpstream, str], mirror: MirrorFactory
) -> None:
    upstream, url = fake
    clock = Clock()
    subject = _image(upstream)
    upstream.referrers = {}
    rules = [{"pattern": "app:sha256-*", "ttl": "10s"}]
    path = f"/v2/app/referrers/{subject}"
    async with (
        mirror(url, clock=clock, tag_ttl="1h", tag_ttl_rules=rules) as m,
        httpx.AsyncClient(base_url=m.url) as c,
    ):
        await c.get(path)
        clock.now += 11
        assert (await c.get(path)).headers["x-cache"] == "REVALIDATED"
    assert _referrer_gets(upstream) == 2


async def test_head_answers_headers_only(
    fake: tuple[FakeUpstream, str], mirror: MirrorFactory
) -> None:
    upstream, url = fake
    subject = _image(upstream)
    upstream.referrers = {subject: [_artifact(upstream, subject, SIG, b"s")]}
    async with mirror(url) as m, httpx.AsyncClient(base_url=m.url) as c:
        head = await c.head(f"/v2/app/referrers/{subject}")
        get = await c.get(f"/v2/app/referrers/{subject}")
    assert (head.status_code, head.content) == (200, b"")
    assert head.headers["content-type"] == OCI_INDEX
    assert head.headers["content-length"] == str(len(get.content))
    assert _referrer_gets(upstream) == 1


async def test_a_malformed_digest_is_digest_invalid_without_upstream_traffic(
    fake: tuple[FakeUpstream, str], mirror: MirrorFactory
) -> None:
    upstream, url = fake
    async with mirror(url) as m, httpx.AsyncClient(base_url=m.url) as c:
        for bad in ("sha256:abc", "latest:x", "md5:" + "a" * 32):
            r = await c.get(f"/v2/app/referrers/{bad}")
            assert r.status_code == 400
            assert r.json()["errors"][0]["code"] == "DIGEST_INVALID"
        write = await c.delete(f"/v2/app/referrers/sha256:{'a' * 64}")
        assert write.status_code == 405
    assert upstream.requests == []


async def test_a_malformed_upstream_answer_is_refused_and_not_cached(
    fake: tuple[FakeUpstream, str], mirror: MirrorFactory
) -> None:
    upstream, url = fake
    subject = _image(upstream)
    upstream.add_manifest("application/json", {"not": "an index"}, tag=_fallback_tag(subject))
    async with mirror(url) as m, httpx.AsyncClient(base_url=m.url) as c:
        first = await c.get(f"/v2/app/referrers/{subject}")
        second = await c.get(f"/v2/app/referrers/{subject}")
    assert first.status_code == second.status_code == 502
    assert first.json()["errors"][0]["code"] == "MANIFEST_INVALID"
    assert _referrer_gets(upstream) == 2


async def test_artifacts_are_pulled_and_cached_like_images(
    fake: tuple[FakeUpstream, str], mirror: MirrorFactory
) -> None:
    """artifactType, a subject, the empty config, non-image layer types; and a
    cosign-style `.sig` tag, which is an ordinary tag."""
    upstream, url = fake
    subject = _image(upstream)
    sig = _artifact(upstream, subject, SIG, b"signature bytes")
    media_type, body = upstream.manifests[sig["digest"]]
    cosign_tag = _fallback_tag(subject) + ".sig"
    upstream.manifests[cosign_tag] = (media_type, body)
    layer = json.loads(body)["layers"][0]["digest"]
    empty = json.loads(body)["config"]["digest"]
    async with mirror(url) as m, httpx.AsyncClient(base_url=m.url) as c:
        accept = {"Accept": OCI_MANIFEST}
        by_tag = await c.get(f"/v2/app/manifests/{cosign_tag}", headers=accept)
        by_digest = await c.get(f"/v2/app/manifests/{sig['digest']}", headers=accept)
        blob = await c.get(f"/v2/app/blobs/{layer}")
        config = await c.get(f"/v2/app/blobs/{empty}")
        manifest_gets = upstream.count("GET", f"/manifests/{sig['digest']}")
        again = await c.get(f"/v2/app/manifests/{sig['digest']}", headers=accept)
    assert by_tag.status_code == by_digest.status_code == 200
    assert by_tag.content == by_digest.content == body
    assert by_tag.headers["docker-content-digest"] == sig["digest"]
    assert by_tag.headers["content-type"] == OCI_MANIFEST
    assert (blob.status_code, blob.content) == (200, b"signature bytes")
    assert (config.status_code, config.content) == (200, b"{}")
    assert again.headers["x-cache"] == "HIT"
    assert upstream.count("GET", f"/manifests/{sig['digest']}") == manifest_gets


async def test_warm_with_referrers_leaves_signatures_served_with_the_upstream_gone(
    fake: tuple[FakeUpstream, str], mirror: MirrorFactory
) -> None:
    upstream, url = fake
    clock = Clock()
    subject = _image(upstream)
    sig = _artifact(upstream, subject, SIG, b"signature")
    sbom = _artifact(upstream, subject, SBOM, b"{}")
    upstream.referrers = {subject: [sig, sbom]}
    cosign_tag = _fallback_tag(subject) + ".sig"
    upstream.manifests[cosign_tag] = upstream.manifests[sig["digest"]]
    layers = [
        json.loads(upstream.manifests[d["digest"]][1])["layers"][0]["digest"] for d in (sig, sbom)
    ]
    async with mirror(url, clock=clock, tag_ttl="1m") as m:
        result = await asyncio.to_thread(
            CliRunner().invoke, main, ["warm", "--mirror", m.url, "--with-referrers", "app:v1"]
        )
        assert result.exit_code == 0, result.output
        assert (
            f"app:v1: 2 referrers, 1 cosign tags: {sig['digest']}, {sbom['digest']}, {cosign_tag}"
            in result.output
        )
        upstream.faults[f"referrers:{subject}"] = Fault(status=503)
        for key in (subject, sig["digest"], sbom["digest"], cosign_tag, *layers):
            upstream.faults[key] = Fault(status=503)
        before = len(upstream.requests)
        clock.now += 30  # within the TTL: nothing at all goes upstream
        async with httpx.AsyncClient(base_url=m.url) as c:
            listed = await c.get(f"/v2/app/referrers/{subject}")
            assert (listed.headers["x-cache"], listed.json()["manifests"]) == ("HIT", [sig, sbom])
            accept = {"Accept": OCI_MANIFEST}
            for d in (sig, sbom):
                got = await c.get(f"/v2/app/manifests/{d['digest']}", headers=accept)
                assert (got.status_code, sha256(got.content)) == (200, d["digest"])
            for layer in layers:
                assert (await c.get(f"/v2/app/blobs/{layer}")).status_code == 200
            # A tag's answer is cached per Accept set: the one warm sends.
            tagged = await c.get(f"/v2/app/manifests/{cosign_tag}", headers={"Accept": ACCEPT})
            assert tagged.headers["docker-content-digest"] == sig["digest"]
            assert len(upstream.requests) == before
            clock.now += 60  # past it: served stale
            stale = await c.get(f"/v2/app/referrers/{subject}")
            assert (stale.status_code, stale.headers["x-cache"]) == (200, "STALE")


async def test_the_same_authentication_and_access_rules_as_a_pull(
    fake: tuple[FakeUpstream, str], mirror: MirrorFactory
) -> None:
    upstream, url = fake
    subject = _image(upstream)
    upstream.referrers = {}
    token = "robot-token-0123456789abcdef"
    robot = {"name": "ci", "sha256": hashlib.sha256(token.encode()).hexdigest()}
    settings: dict[str, Any] = {
        "auth_anonymous": True,
        "auth_tokens": [robot],
        "access": [
            {"anonymous": True, "repositories": ["public/*"]},
            {"users": ["ci"], "repositories": ["team/*"]},
        ],
    }
    path = f"referrers/{subject}"
    async with mirror(url, **settings) as m, httpx.AsyncClient(base_url=m.url) as c:
        anonymous = await c.get(f"/v2/team/app/{path}")
        assert anonymous.status_code == 401
        assert 'scope="repository:team/app:pull"' in anonymous.headers["www-authenticate"]
        denied = await c.get(f"/v2/other/app/{path}", headers={"Authorization": f"Bearer {token}"})
        assert (denied.status_code, denied.json()["errors"][0]["code"]) == (403, "DENIED")
        assert _referrer_gets(upstream) == 0
        robot_ok = await c.get(f"/v2/team/app/{path}", headers={"Authorization": f"Bearer {token}"})
        assert (robot_ok.status_code, robot_ok.json()) == (200, EMPTY_INDEX)
        assert (await c.get(f"/v2/public/app/{path}")).status_code == 200


async def test_through_tiers_the_tier_answers_and_the_registry_backs_it_up() -> None:
    async with tier_chain() as chain:
        subject = sha256(b"image")
        listed = [{"mediaType": OCI_MANIFEST, "digest": sha256(b"sig"), "size": 3}]
        chain.tier.referrers = {subject: listed}
        chain.registry.referrers = {subject: []}
        digest = Digest.parse(subject)
        assert json.loads(await chain.tiers.referrers("app", digest, 1 << 20) or b"") == {
            **EMPTY_INDEX,
            "manifests": listed,
        }
        assert _referrer_gets(chain.registry) == 0
        chain.tier.faults[f"referrers:{subject}"] = Fault(status=502)
        from_registry = await chain.tiers.referrers("app", digest, 1 << 20)
        assert json.loads(from_registry or b"")["manifests"] == []
        # A tier without the API (an older mirror) is no answer: the tag schema applies.
        chain.tier.referrers = None
        chain.tier.faults.clear()
        assert await chain.tiers.referrers("app", digest, 1 << 20) is None
