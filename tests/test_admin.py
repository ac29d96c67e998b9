"""The admin API against the fake upstream, with real pulls through the in-process mirror:
listing, purge (unique blobs go, shared ones stay), pins through a size-cap round, warm
jobs, downloads in flight, and who may do what."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
from conftest import MirrorFactory, RunningMirror, until
from fakes.server import serve
from fakes.upstream import FakeUpstream, Fault, sha256
from fakes.webhook import Receiver
from test_clientauth import htpasswd
from test_events import hook_settings

from mirror.app import create_admin_app
from mirror.components import Components
from mirror.mediatypes import OCI_MANIFEST

CONFIG = "application/vnd.oci.image.config.v1+json"
LAYER = "application/vnd.oci.image.layer.v1.tar+gzip"


def image(
    upstream: FakeUpstream, tag: str, layers: list[bytes], arch: str = "amd64"
) -> dict[str, Any]:
    """Push an image to the fake: its config names the platform."""
    config = json.dumps({"os": "linux", "architecture": arch, "tag": tag}).encode()
    upstream.add_blob(config)
    for layer in layers:
        upstream.add_blob(layer)
    manifest = {
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "config": {"mediaType": CONFIG, "digest": sha256(config), "size": len(config)},
        "layers": [{"mediaType": LAYER, "digest": sha256(x), "size": len(x)} for x in layers],
    }
    digest = upstream.add_manifest(OCI_MANIFEST, manifest, tag)
    return {"digest": digest, "config": sha256(config), "layers": [sha256(x) for x in layers]}


async def pull(c: httpx.AsyncClient, repo: str, tag: str) -> str:
    r = await c.get(f"/v2/{repo}/manifests/{tag}", headers={"Accept": OCI_MANIFEST})
    assert r.status_code == 200, r.text
    m = r.json()
    for desc in [m["config"], *m["layers"]]:
        b = await c.get(f"/v2/{repo}/blobs/{desc['digest']}")
        assert b.status_code == 200
    return str(r.headers["docker-content-digest"])


@asynccontextmanager
async def admin(m: RunningMirror) -> AsyncIterator[httpx.AsyncClient]:
    async with (
        serve(create_admin_app(m.app), lifespan="off") as url,
        httpx.AsyncClient(base_url=url, timeout=30) as client,
    ):
        yield client


def built(m: RunningMirror) -> Components:
    components: Components = m.app.state.components
    return components


def cached_blobs(m: RunningMirror) -> set[str]:
    return {str(b.digest) for b in built(m).store.scan().blobs}


@pytest.fixture
async def two_images(
    fake: tuple[FakeUpstream, str],
) -> tuple[FakeUpstream, str, dict[str, Any], dict[str, Any], bytes]:
    upstream, url = fake
    base = b"base layer " * 1000
    a = image(upstream, "1", [base, b"only in a " * 500])
    b = image(upstream, "2", [base, b"only in b " * 700], arch="arm64")
    return upstream, url, a, b, base


async def test_list_then_purge_a_tag_frees_its_unique_blobs_and_keeps_shared_ones(
    mirror: MirrorFactory,
    two_images: tuple[FakeUpstream, str, dict[str, Any], dict[str, Any], bytes],
) -> None:
    upstream, url, a, b, base = two_images
    async with mirror(url) as m, httpx.AsyncClient(base_url=m.url) as c, admin(m) as api:
        await pull(c, "library/app", "1")
        await pull(c, "library/app", "1")
        await pull(c, "other/tool", "2")
        name = built(m).router.names[0]

        listed = (await api.get("/admin/v1/images")).json()["images"]
        rows = {(i["repository"], i["reference"]): i for i in listed}
        assert set(rows) == {("library/app", "1"), ("other/tool", "2")}
        app = rows["library/app", "1"]
        assert (app["upstream"], app["kind"], app["digest"]) == (name, "tag", a["digest"])
        assert app["platforms"] == ["linux/amd64"]
        assert rows["other/tool", "2"]["platforms"] == ["linux/arm64"]
        assert app["pulls"] == 2 and rows["other/tool", "2"]["pulls"] == 1
        assert app["size"] == app["cached_bytes"] > len(base)
        assert app["last_pull"] is not None and not app["pinned"]
        repos = (await api.get(f"/admin/v1/upstreams/{name}/repositories")).json()
        assert [(r["name"], r["tags"], r["pulls"]) for r in repos["repositories"]] == [
            ("library/app", 1, 2),
            ("other/tool", 1, 1),
        ]
        searched = (await api.get("/admin/v1/images", params={"q": "tool"})).json()["images"]
        assert [i["repository"] for i in searched] == ["other/tool"]

        r = await api.post(
            "/admin/v1/purge", json={"upstream": name, "repository": "library/app", "tag": "1"}
        )
        assert r.status_code == 200, r.text
        purged = r.json()
        unique = [a["config"], a["layers"][1]]
        assert (purged["tags"], purged["manifests"], purged["blobs"], purged["blobs_kept"]) == (
            1,
            1,
            2,
            1,
        )
        assert purged["bytes_freed"] == sum(len(upstream.blobs[d]) for d in unique)
        left = cached_blobs(m)
        assert not set(unique) & left
        assert a["layers"][0] in left  # the shared base layer: image b still names it
        assert {b["config"], b["layers"][1]} <= left
        listed = (await api.get("/admin/v1/images")).json()["images"]
        assert [(i["repository"], i["reference"]) for i in listed] == [("other/tool", "2")]

        # The purged image is fetched again on its next pull; the shared layer is a hit.
        before = upstream.count("GET", f"/blobs/{a['layers'][0]}")
        r = await c.get("/v2/library/app/manifests/1", headers={"Accept": OCI_MANIFEST})
        assert r.headers["x-cache"] == "MISS"
        r = await c.get(f"/v2/library/app/blobs/{a['layers'][0]}")
        assert r.headers["x-cache"] == "HIT"
        assert upstream.count("GET", f"/blobs/{a['layers'][0]}") == before


async def test_purge_a_repository_an_upstream_and_a_digest(
    mirror: MirrorFactory,
    two_images: tuple[FakeUpstream, str, dict[str, Any], dict[str, Any], bytes],
) -> None:
    _upstream, url, _a, b, _ = two_images
    async with mirror(url) as m, httpx.AsyncClient(base_url=m.url) as c, admin(m) as api:
        await pull(c, "library/app", "1")
        await pull(c, "other/tool", "2")
        await pull(c, "other/tool", b["digest"])  # by digest: the tag reaches it already
        name = built(m).router.names[0]
        listed = (await api.get("/admin/v1/images")).json()["images"]
        assert len(listed) == 2
        # A blob by digest goes whatever names it (a corrupt layer, say).
        r = await api.post("/admin/v1/purge", json={"digest": b["layers"][1]})
        assert (r.status_code, r.json()["blobs"]) == (200, 1)
        assert b["layers"][1] not in cached_blobs(m)
        r = await api.post("/admin/v1/purge", json={"upstream": name, "repository": "other/tool"})
        assert r.json()["tags"] == 1 and r.json()["manifests"] == 1
        r = await api.post("/admin/v1/purge", json={"upstream": name})
        assert r.json()["tags"] == 1
        assert cached_blobs(m) == set()
        assert (await api.get("/admin/v1/images")).json()["images"] == []
        assert built(m).store.usage().blob_bytes == 0


@pytest.mark.parametrize(
    ("body", "status", "code"),
    [
        pytest.param({}, 400, "UNSUPPORTED", id="nothing-named"),
        pytest.param({"upstream": "nope.example"}, 404, "NAME_UNKNOWN", id="unknown-upstream"),
        pytest.param({"digest": "sha256:xyz"}, 400, "DIGEST_INVALID", id="bad-digest"),
        pytest.param(
            {"upstream": "NAME", "repository": "Bad Name"}, 400, "NAME_INVALID", id="bad-repo"
        ),
        pytest.param(
            {"upstream": "NAME", "repository": "x/y", "tag": "1"},
            404,
            "MANIFEST_UNKNOWN",
            id="not-cached",
        ),
    ],
)
async def test_bad_purges_get_an_oci_error(
    mirror: MirrorFactory,
    fake: tuple[FakeUpstream, str],
    body: dict[str, str],
    status: int,
    code: str,
) -> None:
    _, url = fake
    async with mirror(url) as m, admin(m) as api:
        name = built(m).router.names[0]
        body = {k: (name if v == "NAME" else v) for k, v in body.items()}
        r = await api.post("/admin/v1/purge", json=body)
        assert r.status_code == status
        assert r.json()["errors"][0]["code"] == code
        r = await api.post(
            "/admin/v1/purge", content=b"not json", headers={"Content-Type": "application/json"}
        )
        assert r.status_code == 400 and r.json()["errors"][0]["code"] == "UNSUPPORTED"


async def test_a_pinned_image_survives_a_size_cap_round_and_unpinning_releases_it(
    mirror: MirrorFactory,
    two_images: tuple[FakeUpstream, str, dict[str, Any], dict[str, Any], bytes],
) -> None:
    upstream, url, a, b, base = two_images
    async with mirror(url, max_size=len(base) + 100) as m, admin(m) as api:
        name = built(m).router.names[0]
        async with httpx.AsyncClient(base_url=m.url) as c:
            await pull(c, "other/tool", "2")
        r = await api.put(
            "/admin/v1/pins", json={"upstream": name, "repository": "library/app", "reference": "1"}
        )
        assert r.status_code == 201, r.text
        job = built(m).jobs.get(r.json()["job"])
        assert job is not None
        await built(m).jobs.wait(job)  # pinning caches the image at once
        assert (job.state, job.blobs_done, job.blobs_total) == ("done", 3, 3)
        pinned = {a["config"], *a["layers"]}
        assert pinned <= cached_blobs(m)
        await built(m).evictor.run_once()  # over max_size: only b's own blobs may go
        left = cached_blobs(m)
        assert pinned <= left
        assert not {b["config"], b["layers"][1]} & left
        rows = (await api.get("/admin/v1/images")).json()["images"]
        assert [(i["reference"], i["pinned"]) for i in rows] == [("1", True), ("2", False)]
        assert (await api.get("/admin/v1/pins")).json()["pins"][0]["reference"] == "1"

        r = await api.delete(
            "/admin/v1/pins",
            params={"upstream": name, "repository": "library/app", "reference": "1"},
        )
        assert r.status_code == 200
        await built(m).evictor.run_once()
        assert sum(len(upstream.blobs[d]) for d in cached_blobs(m)) <= len(base) + 100
        r = await api.delete(
            "/admin/v1/pins",
            params={"upstream": name, "repository": "library/app", "reference": "1"},
        )
        assert r.status_code == 404


async def test_a_pinned_tag_is_refreshed_once_its_ttl_passed(
    mirror: MirrorFactory, fake: tuple[FakeUpstream, str]
) -> None:
    upstream, url = fake
    old = image(upstream, "stable", [b"v1 layer" * 100])
    async with mirror(url, tag_ttl=0) as m, admin(m) as api:
        name = built(m).router.names[0]
        r = await api.put(
            "/admin/v1/pins",
            json={"upstream": name, "repository": "library/app", "reference": "stable"},
        )
        job = built(m).jobs.get(r.json()["job"])
        assert job is not None and (await built(m).jobs.wait(job)).state == "done"
        assert old["layers"][0] in cached_blobs(m)
        new = image(upstream, "stable", [b"v2 layer" * 100])  # the tag moves upstream
        refresh = await built(m).pins.refresh_once()
        assert refresh is not None and refresh.kind == "refresh"
        assert (await built(m).jobs.wait(refresh)).state == "done"
        assert new["layers"][0] in cached_blobs(m)
        rows = (await api.get("/admin/v1/images")).json()["images"]
        assert rows[0]["digest"] == new["digest"]


async def test_warm_job_reports_progress_and_failures(
    mirror: MirrorFactory,
    two_images: tuple[FakeUpstream, str, dict[str, Any], dict[str, Any], bytes],
) -> None:
    _upstream, url, a, _b, _ = two_images
    async with mirror(url) as m, admin(m) as api:
        r = await api.post("/admin/v1/warm", json={"images": ["library/app:1", "missing/image:x"]})
        assert r.status_code == 202
        job_id = r.json()["id"]
        job = built(m).jobs.get(job_id)
        assert job is not None
        await built(m).jobs.wait(job)
        shown = (await api.get(f"/admin/v1/jobs/{job_id}")).json()
        assert shown["state"] == "failed"
        assert list(shown["failed_images"]) == ["missing/image:x"]
        assert (shown["blobs_done"], shown["blobs_total"]) == (3, 3)
        assert shown["bytes_done"] == shown["bytes_total"] > 0
        assert {a["config"], *a["layers"]} <= cached_blobs(m)
        assert [j["id"] for j in (await api.get("/admin/v1/jobs")).json()["jobs"]] == [job_id]
        r = await api.post("/admin/v1/warm", json={"images": ["Bad Name"]})
        assert (r.status_code, r.json()["errors"][0]["code"]) == (400, "NAME_INVALID")
        assert (await api.get("/admin/v1/jobs/nope")).status_code == 404


async def test_a_job_is_shown_by_every_process_sharing_the_cache(
    mirror: MirrorFactory,
    two_images: tuple[FakeUpstream, str, dict[str, Any], dict[str, Any], bytes],
    tmp_path: Path,
) -> None:
    """Workers share one admin listener: a job started through one is watched through
    another. Two mirrors on one cache directory stand in for two workers."""
    upstream, url, _a, _b, _ = two_images
    upstream.manifest_delay = 0.3  # the job is still running when the other looks
    cache = tmp_path / "shared-cache"
    async with (
        mirror(url, cache_dir=cache) as one,
        mirror(url, cache_dir=cache) as other,
        admin(one) as api_one,
        admin(other) as api_other,
    ):
        r = await api_one.post("/admin/v1/warm", json={"images": ["library/app:1"]})
        job_id = r.json()["id"]
        seen = (await api_other.get(f"/admin/v1/jobs/{job_id}")).json()
        assert (seen["id"], seen["state"]) == (job_id, "running")
        summary = (await api_other.get("/admin/v1/summary")).json()
        assert summary["jobs_running"] == 1
        job = built(one).jobs.get(job_id)
        assert job is not None and (await built(one).jobs.wait(job)).state == "done"
        seen = (await api_other.get(f"/admin/v1/jobs/{job_id}")).json()
        assert (seen["state"], seen["blobs_done"], seen["blobs_total"]) == ("done", 3, 3)
        assert [j["id"] for j in (await api_other.get("/admin/v1/jobs")).json()["jobs"]] == [job_id]
        # A record left running by a process that died is not shown running forever.
        dead = {"id": "warm-dead", "kind": "warm", "state": "running", "started": 1.0}
        built(other).store.put_job("warm-dead", json.dumps({**dead, "updated": 1.0}))
        seen = (await api_one.get("/admin/v1/jobs/warm-dead")).json()
        assert (seen["state"], seen["error"]) == ("failed", "its process stopped")


async def test_downloads_in_flight_show_progress(
    mirror: MirrorFactory, fake: tuple[FakeUpstream, str]
) -> None:
    upstream, url = fake
    slow = upstream.add_blob(b"x" * (2 << 20))
    upstream.faults[slow] = Fault(chunk=128 * 1024, delay=0.05)
    async with mirror(url) as m, admin(m) as api, httpx.AsyncClient(base_url=m.url) as c:

        async def fetch() -> bytes:
            r = await c.get(f"/v2/library/app/blobs/{slow}")
            return r.content

        task = asyncio.create_task(fetch())
        seen: list[int] = []

        async def progressed() -> bool:
            rows = (await api.get("/admin/v1/downloads")).json()["downloads"]
            if rows:
                assert rows[0]["digest"] == slow and rows[0]["size"] == 2 << 20
                assert rows[0]["readers"] == 1 and rows[0]["repository"] == "library/app"
                seen.append(rows[0]["bytes"])
            return len(set(seen)) >= 2

        deadline = asyncio.get_running_loop().time() + 20
        while not await progressed():
            assert asyncio.get_running_loop().time() < deadline, seen
            await asyncio.sleep(0.05)
        assert seen == sorted(seen)
        assert len(await task) == 2 << 20
        await until(lambda: built(m).store.usage().blobs == 1, "download committed")
        assert (await api.get("/admin/v1/downloads")).json()["downloads"] == []
        summary = (await api.get("/admin/v1/summary")).json()
        assert summary["traffic"]["misses"] == 1 and summary["cache"]["blobs"] == 1
        assert summary["upstreams"][0]["healthy"] is True


async def test_summary_counts_hits_and_bytes_saved(
    mirror: MirrorFactory,
    two_images: tuple[FakeUpstream, str, dict[str, Any], dict[str, Any], bytes],
) -> None:
    upstream, url, a, _, _ = two_images
    upstream.rate_limit = ("100;w=21600", "76;w=21600")
    async with (
        mirror(url, ratelimit_reserve="80%") as m,
        httpx.AsyncClient(base_url=m.url) as c,
        admin(m) as api,
    ):
        await pull(c, "library/app", "1")
        await pull(c, "library/app", "1")
        s = (await api.get("/admin/v1/summary")).json()
        layer_bytes = sum(len(upstream.blobs[d]) for d in [a["config"], *a["layers"]])
        assert s["traffic"]["bytes_saved"] >= layer_bytes
        assert s["traffic"]["hits"] == 4 and s["traffic"]["misses"] == 4
        assert s["traffic"]["hit_ratio"] == 0.5
        # 76 left is under a reserve of 80: revalidations spend no pulls.
        assert s["upstreams"][0]["ratelimit"] == {
            "limit": 100,
            "remaining": 76,
            "budget": "reserve",
        }
        assert s["cache"]["blobs"] == 3 and s["pins"] == 0


async def test_writes_need_the_admin_listener_or_an_admin(
    mirror: MirrorFactory, fake: tuple[FakeUpstream, str], tmp_path: Path
) -> None:
    _, url = fake
    async with mirror(url) as m, httpx.AsyncClient(base_url=m.url) as c:
        # No credentials configured, no admin listener: reads are open, writes are not.
        who = (await c.get("/admin/v1/whoami")).json()
        assert who == {"user": None, "auth": False, "can_write": False}
        r = await c.post("/admin/v1/purge", json={"digest": "sha256:" + "0" * 64})
        assert (r.status_code, r.json()["errors"][0]["code"]) == (403, "DENIED")
    users = htpasswd(tmp_path / "htpasswd", {"alice": "wonderland", "bob": "builder"})
    async with mirror(url, auth_htpasswd=users, admin_users=["alice"]) as m, admin(m) as api:
        r = await api.get("/admin/v1/images")
        assert r.status_code == 401
        assert r.headers["www-authenticate"].startswith('Basic realm="mirror"')
        r = await api.get("/admin/v1/whoami", auth=("alice", "wrong"))
        assert r.status_code == 401
        who = (await api.get("/admin/v1/whoami", auth=("bob", "builder"))).json()
        assert who == {"user": "bob", "auth": True, "can_write": False}
        assert (await api.get("/admin/v1/images", auth=("bob", "builder"))).status_code == 200
        r = await api.post("/admin/v1/warm", json={"images": ["a/b:1"]}, auth=("bob", "builder"))
        assert (r.status_code, r.json()["errors"][0]["code"]) == (403, "DENIED")
        who = (await api.get("/admin/v1/whoami", auth=("alice", "wonderland"))).json()
        assert who["can_write"] is True
        r = await api.post(
            "/admin/v1/purge", json={"digest": "sha256:" + "0" * 64}, auth=("alice", "wonderland")
        )
        assert r.status_code == 404  # allowed, and nothing by that digest is cached


async def test_a_purge_reports_delete_events_for_what_it_freed(
    mirror: MirrorFactory,
    two_images: tuple[FakeUpstream, str, dict[str, Any], dict[str, Any], bytes],
) -> None:
    upstream, url, a, _, _ = two_images
    receiver = Receiver()
    async with (
        serve(receiver, lifespan="off") as hook,
        mirror(url, notifications=hook_settings(f"{hook}/events")) as m,
        httpx.AsyncClient(base_url=m.url) as c,
        admin(m) as api,
    ):
        await pull(c, "library/app", "1")
        await pull(c, "other/tool", "2")
        name = built(m).router.names[0]
        r = await api.post(
            "/admin/v1/purge", json={"upstream": name, "repository": "library/app", "tag": "1"}
        )
        assert r.status_code == 200
        await until(lambda: sum(e["action"] == "delete" for e in receiver.events) == 3, "deletes")
    deletes = [e for e in receiver.events if e["action"] == "delete"]
    by_digest = {e["target"]["digest"]: e for e in deletes}
    assert set(by_digest) == {a["digest"], a["config"], a["layers"][1]}  # not the shared base
    assert by_digest[a["digest"]]["target"]["repository"] == "library/app"
    assert by_digest[a["digest"]]["target"]["tag"] == "1"
    assert by_digest[a["layers"][1]]["target"]["size"] == len(upstream.blobs[a["layers"][1]])


async def test_writes_refuse_forms_other_origins_and_careless_bodies(
    mirror: MirrorFactory, fake: tuple[FakeUpstream, str]
) -> None:
    _, url = fake
    async with mirror(url) as m, admin(m) as api:
        name = built(m).router.names[0]
        # What a page elsewhere could send without a preflight: refused before anything.
        r = await api.post(
            "/admin/v1/purge",
            content=json.dumps({"upstream": name}),
            headers={"Content-Type": "text/plain"},
        )
        assert (r.status_code, r.json()["errors"][0]["code"]) == (415, "UNSUPPORTED")
        r = await api.post(
            "/admin/v1/purge", json={"upstream": name}, headers={"Origin": "http://evil.example"}
        )
        assert (r.status_code, r.json()["errors"][0]["code"]) == (403, "DENIED")
        # A typo or a null must never widen a purge to the whole upstream.
        for body in (
            {"upstream": name, "repo": "library/nginx"},
            {"upstream": name, "repository": None},
        ):
            r = await api.post("/admin/v1/purge", json=body)
            assert (r.status_code, r.json()["errors"][0]["code"]) == (400, "UNSUPPORTED")
        r = await api.post(
            "/admin/v1/purge", content=b"[" * 60_000, headers={"Content-Type": "application/json"}
        )
        assert r.status_code == 400
        r = await api.post(
            "/admin/v1/purge",
            content=b" " * (128 << 10),
            headers={"Content-Type": "application/json"},
        )
        assert r.status_code == 413


@pytest.mark.parametrize("host", ["rebound.evil.example", "localhost", "[::1]", "admin.internal"])
async def test_without_credentials_writes_need_an_address_or_a_listed_host(
    mirror: MirrorFactory, fake: tuple[FakeUpstream, str], host: str
) -> None:
    """DNS rebinding: a page at rebound.evil.example whose name now points at 127.0.0.1
    is same-origin to the browser (Origin and Host agree), but its name is in Host."""
    upstream, url = fake
    digest = upstream.add_manifest(OCI_MANIFEST, {"schemaVersion": 2}, tag="1")
    async with mirror(url, admin_hosts=["admin.internal"]) as m, admin(m) as api:
        async with httpx.AsyncClient(base_url=m.url) as c:
            pulled = await c.get("/v2/app/manifests/1", headers={"Accept": OCI_MANIFEST})
            assert pulled.status_code == 200
        port = api.base_url.port
        same_origin = {"Host": f"{host}:{port}", "Origin": f"http://{host}:{port}"}
        who = (await api.get("/admin/v1/whoami", headers=same_origin)).json()
        r = await api.post("/admin/v1/purge", json={"digest": digest}, headers=same_origin)
        if host == "rebound.evil.example":
            assert who["can_write"] is False  # the page shows no write buttons
            assert (r.status_code, r.json()["errors"][0]["code"]) == (403, "DENIED")
            assert "admin_hosts" in r.json()["errors"][0]["message"]
        else:
            assert who["can_write"] is True
            assert r.status_code == 200, r.text
        # Reads stay open: the page and `mirror admin images` work by any name.
        assert (await api.get("/admin/v1/images", headers=same_origin)).status_code == 200


async def test_purging_a_digest_in_one_repository_keeps_what_another_tag_reaches(
    mirror: MirrorFactory,
    two_images: tuple[FakeUpstream, str, dict[str, Any], dict[str, Any], bytes],
) -> None:
    _, url, a, _, _ = two_images
    async with mirror(url) as m, httpx.AsyncClient(base_url=m.url) as c, admin(m) as api:
        await pull(c, "library/app", "1")
        await pull(c, "mine/app", a["digest"])  # the same image, by digest, elsewhere
        name = built(m).router.names[0]
        rows = (await api.get("/admin/v1/images")).json()["images"]
        assert {(i["repository"], i["kind"]) for i in rows} == {
            ("library/app", "tag"),
            ("mine/app", "digest"),
        }
        r = await api.post(
            "/admin/v1/purge",
            json={"upstream": name, "repository": "mine/app", "digest": a["digest"]},
        )
        assert r.status_code == 200, r.text
        assert (r.json()["manifests"], r.json()["blobs"]) == (0, 0)
        assert {a["config"], *a["layers"]} <= cached_blobs(m)
        rows = (await api.get("/admin/v1/images")).json()["images"]
        assert [(i["repository"], i["cached_bytes"] == i["size"]) for i in rows] == [
            ("library/app", True)
        ]
