"""The referrers API and the catalog against a hostile upstream and hostile clients:
what an upstream's referrers answer may put in front of verifiers, and what a client's
referrers requests may leave in the cache for others to see."""

from __future__ import annotations

import hashlib

import httpx
from conftest import MirrorFactory
from fakes.upstream import FakeUpstream
from test_referrers import SIG, _artifact, _image

from mirror.mediatypes import OCI_MANIFEST


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
