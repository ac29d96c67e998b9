"""The harness itself against the real registry, so other e2e tests can trust it."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import urllib.error
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from fakes.quota import Quota
from harness import (
    DOCKER_LIST,
    DOCKER_MANIFEST,
    OCI_INDEX,
    OCI_MANIFEST,
    Registry,
    TestImage,
    TokenServer,
    build_and_push_test_images,
    fetch_token,
    registry_get,
    require_root,
    require_tool,
    sha256_digest,
)
from harness.hubfront import HubFront
from harness.redisserver import RedisServer
from harness.rgw import RadosGateway

EXPECTED_TYPES = {
    "schema2": DOCKER_MANIFEST,
    "oci": OCI_MANIFEST,
    "index": OCI_INDEX,
    "list": DOCKER_LIST,
}


@dataclass
class Upstream:
    tokens: TokenServer
    registry: Registry
    images: dict[str, TestImage]
    workdir: Path


@pytest.fixture
def upstream(tmp_path: Path) -> Iterator[Upstream]:
    require_tool("docker-registry")
    require_tool("skopeo")
    with TokenServer(tmp_path) as tokens, Registry(tmp_path / "registry", tokens) as registry:
        images = build_and_push_test_images(tmp_path, registry)
        yield Upstream(tokens, registry, images, tmp_path)


def assert_manifests_served(upstream: Upstream) -> None:
    for name, image in upstream.images.items():
        token = fetch_token(upstream.tokens, image.repo)
        for ref in (image.tag, image.digest):
            path = f"/v2/{image.repo}/manifests/{ref}"
            status, headers, body = registry_get(upstream.registry, path, token)
            assert status == 200, (name, ref, body)
            assert headers.get_content_type() == EXPECTED_TYPES[name]
            assert headers["Docker-Content-Digest"] == image.digest
            assert body == image.manifest


@pytest.mark.e2e
def test_registry_requires_bearer_token(upstream: Upstream) -> None:
    status, headers, _ = registry_get(upstream.registry, "/v2/")
    assert status == 401
    challenge = headers["WWW-Authenticate"]
    assert challenge.startswith("Bearer ")
    assert f'realm="{upstream.tokens.realm}"' in challenge
    assert 'service="registry.docker.io"' in challenge


@pytest.mark.e2e
def test_images_are_pushed_as_expected(upstream: Upstream) -> None:
    assert_manifests_served(upstream)
    images = upstream.images
    assert images["schema2"].reference == "library/small:v1"
    assert set(images["index"].child_digests) == {"linux/amd64", "linux/arm64"}
    assert set(images["list"].child_digests) == {"linux/amd64", "linux/arm64"}
    # The two multi-arch images must not share blobs, or a cache could hide a miss.
    assert not set(images["index"].layer_digests) & set(images["list"].layer_digests)
    for image in images.values():
        token = fetch_token(upstream.tokens, image.repo)
        for digest in image.layer_digests:
            status, _, body = registry_get(
                upstream.registry, f"/v2/{image.repo}/blobs/{digest}", token, accept="*/*"
            )
            assert status == 200
            assert sha256_digest(body) == digest
    layout = upstream.workdir / "layout" / "blobs" / "sha256"
    for name in ("oci", "index"):
        digest = images[name].digest.removeprefix("sha256:")
        assert (layout / digest).read_bytes() == images[name].manifest
    manifest = json.loads(images["oci"].manifest)
    assert len(manifest["layers"]) == 3
    assert max(layer["size"] for layer in manifest["layers"]) > 2 * 1024 * 1024


@pytest.mark.e2e
def test_generation_is_deterministic(
    upstream: Upstream, tmp_path_factory: pytest.TempPathFactory
) -> None:
    workdir = tmp_path_factory.mktemp("again")
    with Registry(workdir / "registry", upstream.tokens) as registry:
        again = build_and_push_test_images(workdir, registry)
    assert again == upstream.images


@pytest.mark.e2e
def test_token_server_grants(upstream: Upstream) -> None:
    tokens = upstream.tokens
    pushes = [r for r in tokens.requests if r.user == "pusher"]
    assert pushes and all(r.status == 200 for r in pushes)
    assert any("repository:team/app/oci:pull,push" in r.scopes for r in pushes)
    tokens.clear()
    repo = upstream.images["oci"].repo
    anonymous = fetch_token(tokens, repo, "pull,push")
    pushed = fetch_token(tokens, repo, "pull,push", ("pusher", "pushpass"))
    assert [r.user for r in tokens.requests] == [None, "pusher"]
    upload = f"/v2/{repo}/blobs/uploads/"
    assert registry_get(upstream.registry, upload, anonymous, method="POST")[0] == 401
    assert registry_get(upstream.registry, upload, pushed, method="POST")[0] == 202
    with pytest.raises(urllib.error.HTTPError, match="401"):
        fetch_token(tokens, repo, "pull", ("pusher", "wrong"))
    assert tokens.requests[-1].status == 401


@pytest.mark.e2e
def test_restart_keeps_content_and_log_is_parsed(upstream: Upstream) -> None:
    registry = upstream.registry
    port = registry.port
    registry.stop()
    with pytest.raises(urllib.error.URLError):
        registry_get(registry, "/v2/")
    registry.start()
    assert registry.port == port
    registry.clear_log()
    assert_manifests_served(upstream)
    image = upstream.images["oci"]
    manifest_path = f"/v2/{image.repo}/manifests/{image.digest}"
    entry = registry.wait_for_request(lambda r: r.path == manifest_path and r.status == 200)
    assert entry.method == "GET"
    assert entry.user_agent is not None and entry.user_agent.startswith("Python-urllib")
    assert all(r.path.startswith("/v2/") for r in registry.requests())
    registry.clear_log()
    assert registry.requests() == []


@pytest.mark.e2e
def test_hub_front_counts_pulls_and_refuses_without_reaching_the_registry(
    upstream: Upstream,
) -> None:
    image = upstream.images["oci"]
    path = f"/v2/{image.repo}/manifests/{image.tag}"
    token = fetch_token(upstream.tokens, image.repo)
    with HubFront(upstream.registry.url, Quota(limit=5, remaining=1, retry_after="7")) as front:
        # The challenge and a HEAD are free; Hub's headers come on every manifest answer.
        status, headers, _ = registry_get(front.url, path)
        assert (status, headers["ratelimit-remaining"]) == (401, "1;w=21600")
        assert 'realm="' + upstream.tokens.realm in headers["WWW-Authenticate"]
        status, headers, _ = registry_get(front.url, path, token, method="HEAD")
        assert (status, headers["Docker-Content-Digest"]) == (200, image.digest)
        status, headers, body = registry_get(front.url, path, token)
        assert (status, body, headers["ratelimit-limit"]) == (200, image.manifest, "5;w=21600")
        assert headers["ratelimit-remaining"] == "0;w=21600"
        big = image.layer_digests[2]  # the 2 MiB layer: many chunks through the front
        status, _, blob = registry_get(front.url, f"/v2/{image.repo}/blobs/{big}", token)
        assert (status, sha256_digest(blob)) == (200, big)

        upstream.registry.clear_log()
        status, headers, body = registry_get(front.url, path, token)
        assert (status, headers["Retry-After"]) == (429, "7")
        assert json.loads(body)["errors"][0]["code"] == "TOOMANYREQUESTS"
        # Blobs are not counted; the refused GET never reached the registry.
        assert registry_get(front.url, f"/v2/{image.repo}/blobs/{big}", token)[0] == 200
        upstream.registry.wait_for_request(lambda r: "/blobs/" in r.path)
        assert [r.path for r in upstream.registry.requests()] == [f"/v2/{image.repo}/blobs/{big}"]
        assert (front.quota.gets, front.quota.refused) == (1, 1)
        assert front.count("GET", path, 429) == 1
        assert [s.status for s in front.seen if s.path == path] == [401, 200, 200, 429]

        front.quota.reset()
        assert registry_get(front.url, path, token)[0] == 200


def test_require_tool_fails_only_in_ci(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    tool = tmp_path / "fake-tool"
    tool.write_text("#!/bin/sh\n")
    tool.chmod(0o755)
    monkeypatch.setenv("PATH", str(tmp_path))
    assert require_tool("fake-tool") == str(tool)
    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception, match="not on PATH"):
        require_tool("docker-registry")
    monkeypatch.delenv("CI")
    with pytest.raises(pytest.skip.Exception, match="not on PATH"):
        require_tool("docker-registry")


def _s3(
    rgw: RadosGateway, method: str, path: str, data: Path | None = None, out: Path | None = None
) -> str:
    """An S3 request signed with SigV4 by curl itself (no client library needed; RGW
    wants the payload hash header, which curl leaves out)."""
    creds = rgw.credentials
    command = [
        require_tool("curl"), "-sS", "--fail-with-body", "-X", method,
        "--aws-sigv4", "aws:amz:us-east-1:s3",
        "--user", f"{creds.access_key}:{creds.secret_key}",
        "-H", "x-amz-content-sha256: UNSIGNED-PAYLOAD",
        f"{rgw.endpoint}{path}",
    ]  # fmt: skip
    if data is not None:
        command += ["--data-binary", f"@{data}", "-H", "content-type: application/octet-stream"]
    if out is not None:
        command += ["-o", str(out)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout


@pytest.mark.e2e
def test_rados_gateway_serves_s3_and_stops_without_a_trace(tmp_path: Path) -> None:
    require_tool("radosgw")
    require_root("run Ceph's daemons as the ceph user")
    payload = tmp_path / "blob"
    payload.write_bytes(os.urandom(1 << 20))
    with RadosGateway() as rgw:
        pids = [d.pid for d in rgw._daemons]
        _s3(rgw, "PUT", "/mirror-test")
        _s3(rgw, "PUT", "/mirror-test/blobs/x", payload)
        listed = _s3(rgw, "GET", "/mirror-test?list-type=2")
        assert "<Key>blobs/x</Key>" in listed
        got = tmp_path / "got"
        _s3(rgw, "GET", "/mirror-test/blobs/x", out=got)
        assert got.read_bytes() == payload.read_bytes()
        root = rgw.root
    assert not root.exists()
    for pid in pids:
        assert pid is not None and not Path(f"/proc/{pid}").exists()


@pytest.mark.e2e
def test_redis_server_answers_and_stops(tmp_path: Path) -> None:
    require_tool("redis-server")
    with RedisServer(tmp_path) as redis:
        with socket.create_connection(("127.0.0.1", redis.port), timeout=2) as conn:
            conn.sendall(b"SET k v\r\nGET k\r\n")
            assert conn.recv(64).startswith(b"+OK\r\n")
        pid = redis.pid
    assert pid is not None and not Path(f"/proc/{pid}").exists()
