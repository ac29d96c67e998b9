"""End to end: the real Distribution registry (token auth) upstream, skopeo as client,
and the real `mirror serve` process in between."""

from __future__ import annotations

import json
import urllib.request
from pathlib import Path

import httpx
import pytest
from conftest import RealUpstream
from harness import DOCKER_LIST, DOCKER_MANIFEST, OCI_INDEX, OCI_MANIFEST, sha256_digest
from harness.mirror import MirrorProcess, skopeo_copy, skopeo_inspect_raw

pytestmark = pytest.mark.e2e

# What docker sends: six separate Accept lines.
DOCKER_ACCEPT = [
    ("Accept", DOCKER_MANIFEST),
    ("Accept", DOCKER_LIST),
    ("Accept", OCI_MANIFEST),
    ("Accept", OCI_INDEX),
    ("Accept", "application/vnd.docker.distribution.manifest.v1+prettyjws"),
    ("Accept", "application/json"),
]


def _layout_blobs(layout: Path) -> set[str]:
    return {f"sha256:{p.name}" for p in (layout / "blobs" / "sha256").iterdir()}


def _dir_blobs(directory: Path) -> set[str]:
    return {f"sha256:{p.name}" for p in directory.iterdir() if len(p.name) == 64}


def _index_digest(layout: Path) -> str:
    index = json.loads((layout / "index.json").read_text())
    digest: str = index["manifests"][0]["digest"]
    return digest


def _upstream_manifest_requests(real_upstream: RealUpstream) -> list[str]:
    return [r.path for r in real_upstream.registry.requests() if "/manifests/" in r.path]


def test_skopeo_pulls_every_image_cold_then_warm(
    real_upstream: RealUpstream, tmp_path: Path
) -> None:
    images = real_upstream.images
    with MirrorProcess(tmp_path / "m", real_upstream.registry.url) as mirror:
        for name, image in images.items():
            multi = name in ("index", "list")
            for round_ in ("cold", "warm"):
                dest = tmp_path / f"{name}-{round_}"
                src = f"docker://{mirror.host}/{image.repo}:{image.tag}"
                if name in ("oci", "index"):
                    result = skopeo_copy(src, f"oci:{dest}:{image.tag}", multi_arch=multi)
                    assert result.returncode == 0, result.stderr
                    # Every layer and config blob arrived, under its own digest.
                    assert set(image.layer_digests) <= _layout_blobs(dest)
                    assert _index_digest(dest) == image.digest
                else:
                    # dir: keeps Docker manifests byte for byte (oci: would convert them).
                    result = skopeo_copy(src, f"dir:{dest}", multi_arch=multi)
                    assert result.returncode == 0, result.stderr
                    assert set(image.layer_digests) <= _dir_blobs(dest)
                    assert sha256_digest((dest / "manifest.json").read_bytes()) == image.digest
            raw = skopeo_inspect_raw(f"docker://{mirror.host}/{image.repo}:{image.tag}")
            assert sha256_digest(raw) == image.digest
            assert raw == image.manifest
        served = mirror.metric("mirror_cache_requests_total", kind="blob", result="hit")
        assert served > 0

    # Every blob went upstream at most once across both rounds.
    blob_gets = [
        r.path
        for r in real_upstream.registry.requests()
        if r.method == "GET" and "/blobs/" in r.path and r.status == 200
    ]
    assert len(blob_gets) == len(set(blob_gets))


def test_warm_pull_by_digest_needs_no_upstream_even_after_restart(
    real_upstream: RealUpstream, tmp_path: Path
) -> None:
    image = real_upstream.images["oci"]
    mirror = MirrorProcess(tmp_path / "m", real_upstream.registry.url)
    with mirror:
        cold = skopeo_copy(
            f"docker://{mirror.host}/{image.repo}@{image.digest}", f"oci:{tmp_path / 'cold'}"
        )
        assert cold.returncode == 0, cold.stderr
        real_upstream.registry.clear_log()
        warm = skopeo_copy(
            f"docker://{mirror.host}/{image.repo}@{image.digest}", f"oci:{tmp_path / 'warm'}"
        )
        assert warm.returncode == 0, warm.stderr
        assert real_upstream.registry.requests() == []
    # A new process on the same cache directory, with the upstream gone.
    real_upstream.registry.stop()
    try:
        with MirrorProcess(
            tmp_path / "m2", real_upstream.registry.url, cache_dir=mirror.cache_dir
        ) as restarted:
            again = skopeo_copy(
                f"docker://{restarted.host}/{image.repo}@{image.digest}",
                f"oci:{tmp_path / 'again'}",
            )
            assert again.returncode == 0, again.stderr
            assert _index_digest(tmp_path / "again") == image.digest
            assert (
                restarted.metric(
                    "mirror_upstream_requests_total",
                    upstream=real_upstream.registry.host,
                    kind="blob",
                    status="200",
                )
                == 0
            )
    finally:
        real_upstream.registry.start()


def test_token_fetched_once_per_repository_scope(
    real_upstream: RealUpstream, tmp_path: Path
) -> None:
    image = real_upstream.images["oci"]
    real_upstream.tokens.clear()
    with MirrorProcess(tmp_path / "m", real_upstream.registry.url) as mirror:
        result = skopeo_copy(
            f"docker://{mirror.host}/{image.repo}:{image.tag}", f"oci:{tmp_path / 'out'}:x"
        )
        assert result.returncode == 0, result.stderr
        upstream_gets = mirror.metric(
            "mirror_upstream_requests_total",
            upstream=real_upstream.registry.host,
            kind="blob",
            status="200",
        )
    scopes = [s for r in real_upstream.tokens.requests for s in r.scopes]
    # Manifest + config + three layers went upstream on one cached token.
    assert upstream_gets == len(image.layer_digests)
    assert scopes == [f"repository:{image.repo}:pull"]
    assert all(r.user is None for r in real_upstream.tokens.requests)  # anonymous pull


def test_push_through_the_mirror_is_refused(real_upstream: RealUpstream, tmp_path: Path) -> None:
    image = real_upstream.images["schema2"]
    with MirrorProcess(tmp_path / "m", real_upstream.registry.url) as mirror:
        pulled = skopeo_copy(
            f"docker://{mirror.host}/{image.repo}:{image.tag}", f"oci:{tmp_path / 'img'}:x"
        )
        assert pulled.returncode == 0, pulled.stderr
        pushed = skopeo_copy(f"oci:{tmp_path / 'img'}:x", f"docker://{mirror.host}/evil/x:y")
        assert pushed.returncode != 0
        assert "unsupported: this mirror is read-only" in pushed.stderr
        resp = httpx.post(f"{mirror.url}/v2/evil/x/blobs/uploads/")
        assert resp.status_code == 405
        assert resp.json()["errors"][0]["code"] == "UNSUPPORTED"
        assert resp.headers["docker-distribution-api-version"] == "registry/2.0"
    # skopeo's existence checks (HEAD) are reads and may pass through; no write did.
    evil = [r for r in real_upstream.registry.requests() if r.path.startswith("/v2/evil/")]
    assert {r.method for r in evil} <= {"HEAD", "GET"}


def test_negotiation_per_client_kind(real_upstream: RealUpstream, tmp_path: Path) -> None:
    lst = real_upstream.images["list"]
    index = real_upstream.images["index"]
    with MirrorProcess(tmp_path / "m", real_upstream.registry.url) as mirror:
        url = f"{mirror.url}/v2/{lst.repo}/manifests/{lst.tag}"
        for _ in range(2):  # second round: both answers come from the cache
            full = httpx.get(url, headers=DOCKER_ACCEPT)
            assert full.status_code == 200
            assert full.headers["content-type"] == DOCKER_LIST
            assert full.headers["docker-content-digest"] == lst.digest
            assert full.content == lst.manifest
            # A schema2-only client gets the amd64 image, never the list.
            old = httpx.get(url, headers={"Accept": DOCKER_MANIFEST})
            assert old.status_code == 200
            assert old.headers["content-type"] == DOCKER_MANIFEST
            assert old.headers["docker-content-digest"] == lst.child_digests["linux/amd64"]
            assert sha256_digest(old.content) == lst.child_digests["linux/amd64"]
            # containerd: one comma-joined line ending in */*.
            ctrd = httpx.get(url, headers={"Accept": f"{OCI_INDEX}, {DOCKER_LIST}, */*"})
            assert ctrd.headers["docker-content-digest"] == lst.digest
            real_upstream.registry.clear_log()
        assert _upstream_manifest_requests(real_upstream) == []
        # An OCI index is never handed to a client that cannot read one.
        idx = httpx.get(
            f"{mirror.url}/v2/{index.repo}/manifests/{index.tag}",
            headers={"Accept": DOCKER_MANIFEST},
        )
        assert idx.status_code == 404
        assert idx.json()["errors"][0]["code"] == "MANIFEST_UNKNOWN"
        by_digest = httpx.get(
            f"{mirror.url}/v2/{index.repo}/manifests/{index.digest}",
            headers={"Accept": DOCKER_MANIFEST},
        )
        assert by_digest.status_code == 404
        # HEAD carries what docker and containerd need, and the body's length.
        head = httpx.head(url, headers=DOCKER_ACCEPT)
        assert head.headers["docker-content-digest"] == lst.digest
        assert head.headers["content-length"] == str(len(lst.manifest))
        assert head.headers["etag"] == f'"{lst.digest}"'


def test_a_client_without_accept_gets_a_verified_v2_manifest_not_schema1(
    real_upstream: RealUpstream, tmp_path: Path
) -> None:
    """curl sends no Accept; asked that way, Distribution answers with a signed schema1
    manifest whose digest is not its body's. The mirror asks for v2 and OCI instead."""
    image = real_upstream.images["oci"]
    with MirrorProcess(tmp_path / "m", real_upstream.registry.url) as mirror:
        url = f"{mirror.url}/v2/{image.repo}/manifests/{image.tag}"
        r = httpx.get(url, headers={"Accept": ""})
        assert r.status_code == 200
        assert r.headers["content-type"] == OCI_MANIFEST
        assert r.headers["docker-content-digest"] == image.digest == sha256_digest(r.content)
        assert mirror.metric("mirror_digest_mismatches_total", kind="manifest") == 0
        # The conformance suite's reference that is neither tag nor digest: 404.
        for method in ("GET", "HEAD"):
            bad = httpx.request(method, f"{mirror.url}/v2/{image.repo}/manifests/.INVALID_NAME")
            assert bad.status_code == 404
            if method == "GET":
                assert bad.json()["errors"][0]["code"] == "MANIFEST_UNKNOWN"
        wrong = httpx.get(f"{mirror.url}/v2/{image.repo}/manifests/sha256:totallywrong")
        assert (wrong.status_code, wrong.json()["errors"][0]["code"]) == (400, "DIGEST_INVALID")


def test_library_prefix_is_not_added_for_non_docker_hub(
    real_upstream: RealUpstream, tmp_path: Path
) -> None:
    # The upstream is not Docker Hub, so `small` stays `small` (and is unknown there).
    with MirrorProcess(tmp_path / "m", real_upstream.registry.url) as mirror:
        r = httpx.get(f"{mirror.url}/v2/small/manifests/v1", headers=DOCKER_ACCEPT)
        assert r.status_code == 404
        assert r.json()["errors"][0]["code"] == "MANIFEST_UNKNOWN"
        ok = httpx.get(f"{mirror.url}/v2/library/small/manifests/v1", headers=DOCKER_ACCEPT)
        assert ok.status_code == 200


def test_tags_list_is_proxied(real_upstream: RealUpstream, tmp_path: Path) -> None:
    image = real_upstream.images["oci"]
    with MirrorProcess(tmp_path / "m", real_upstream.registry.url) as mirror:
        r = httpx.get(f"{mirror.url}/v2/{image.repo}/tags/list", params={"n": "10"})
        assert r.status_code == 200
        assert r.json() == {"name": image.repo, "tags": [image.tag]}
        missing = httpx.get(f"{mirror.url}/v2/no/such/tags/list")
        assert missing.status_code == 404
        assert missing.json()["errors"][0]["code"] == "NAME_UNKNOWN"


def test_blob_range_and_head_against_real_upstream(
    real_upstream: RealUpstream, tmp_path: Path
) -> None:
    image = real_upstream.images["oci"]
    big = max(image.layer_digests, key=lambda d: _blob_size(real_upstream, image.repo, d))
    with MirrorProcess(tmp_path / "m", real_upstream.registry.url) as mirror:
        url = f"{mirror.url}/v2/{image.repo}/blobs/{big}"
        head = httpx.head(url)
        assert head.status_code == 200
        size = int(head.headers["content-length"])
        part = httpx.get(url, headers={"Range": "bytes=100-"})  # uncached: starts the download
        assert part.status_code == 206
        assert part.headers["content-range"] == f"bytes 100-{size - 1}/{size}"
        full = httpx.get(url)  # cached now
        assert sha256_digest(full.content) == big
        assert part.content == full.content[100:]
        assert httpx.get(url, headers={"Range": f"bytes={size}-"}).status_code == 416


def _blob_size(real_upstream: RealUpstream, repo: str, digest: str) -> int:
    from harness import fetch_token

    token = fetch_token(real_upstream.tokens, repo)
    req = urllib.request.Request(
        f"{real_upstream.registry.url}/v2/{repo}/blobs/{digest}",
        method="HEAD",
        headers={"Authorization": f"Bearer {token}"},
    )
    with urllib.request.urlopen(req, timeout=10) as resp:
        return int(resp.headers["content-length"])


def test_credentials_from_environment_reach_only_the_token_realm(
    real_upstream: RealUpstream, tmp_path: Path
) -> None:
    image = real_upstream.images["schema2"]
    real_upstream.tokens.clear()
    env = {"MIRROR_UPSTREAM_USERNAME": "pusher", "MIRROR_UPSTREAM_PASSWORD": "pushpass"}
    with MirrorProcess(tmp_path / "m", real_upstream.registry.url, env=env) as mirror:
        result = skopeo_copy(
            f"docker://{mirror.host}/{image.repo}:{image.tag}", f"dir:{tmp_path / 'out'}"
        )
        assert result.returncode == 0, result.stderr
        metrics_text = httpx.get(f"{mirror.url}/metrics").text
    assert [r.user for r in real_upstream.tokens.requests] == ["pusher"]
    assert "pushpass" not in mirror.log()
    assert "pushpass" not in metrics_text
