"""Two real registries (each with its own token service and users) behind one mirror."""

from __future__ import annotations

import base64
import json
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from conftest import RealUpstream, SecondUpstream
from harness import OCI_MANIFEST, Registry, TokenServer, sha256_digest
from harness.mirror import MirrorProcess, skopeo_copy

pytestmark = pytest.mark.e2e

A_CREDS = ("pusher", "pushpass")  # a user of the first registry's token service


def _env(real_upstream: RealUpstream, second: SecondUpstream, **extra: str) -> dict[str, str]:
    upstreams = [
        {
            "name": "docker.io",
            "url": real_upstream.registry.url,
            "username": A_CREDS[0],
            "password_env": "TEST_A_PASSWORD",
        },
        {
            "name": SecondUpstream.NAME,
            "url": second.registry.url,
            "username": SecondUpstream.CREDS[0],
            "password_env": "TEST_B_PASSWORD",
            "path_prefix": "regb",  # for clients that cannot send ns (podman, skopeo)
        },
    ]
    return {
        "MIRROR_UPSTREAMS": json.dumps(upstreams),
        "TEST_A_PASSWORD": A_CREDS[1],
        "TEST_B_PASSWORD": SecondUpstream.CREDS[1],
        **extra,
    }


def _basic_user(header: str | None) -> str | None:
    if not header:
        return None
    return base64.b64decode(header.split(" ", 1)[1]).decode().partition(":")[0]


def _manifest(mirror: MirrorProcess, repo: str, ref: str, ns: str | None) -> httpx.Response:
    params = {"ns": ns} if ns else {}
    r = httpx.get(
        f"{mirror.url}/v2/{repo}/manifests/{ref}",
        params=params,
        headers={"Accept": OCI_MANIFEST},
        timeout=30,
    )
    assert r.status_code == 200, r.text
    return r


def test_ns_routes_to_each_registry_with_its_own_credentials(
    real_upstream: RealUpstream, second_upstream: SecondUpstream, tmp_path: Path
) -> None:
    first = real_upstream.images["oci"]
    own = second_upstream.own
    assert (first.repo, first.tag) == (own.repo, "1.0")  # the same name on both
    real_upstream.tokens.clear()
    second_upstream.tokens.clear()
    env = _env(real_upstream, second_upstream)
    with MirrorProcess(tmp_path / "m", None, env=env) as mirror:
        for _ in range(2):  # cold, then cached: the answers never mix
            # containerd-style, ?ns= names the registry.
            b = _manifest(mirror, own.repo, "1.0", SecondUpstream.NAME)
            a = _manifest(mirror, first.repo, first.tag, "docker.io")
            assert b.headers["docker-content-digest"] == own.digest
            assert b.content == own.manifest
            assert a.headers["docker-content-digest"] == first.digest
        # Docker-style, no ns: the default upstream (docker.io). skopeo checks digests.
        result = skopeo_copy(
            f"docker://{mirror.host}/{first.repo}:{first.tag}", f"dir:{tmp_path / 'a'}"
        )
        assert result.returncode == 0, result.stderr
        assert sha256_digest((tmp_path / "a" / "manifest.json").read_bytes()) == first.digest
        # A path prefix reaches the second registry without ns (podman's mirror path).
        result = skopeo_copy(f"docker://{mirror.host}/regb/{own.repo}:1.0", f"dir:{tmp_path / 'b'}")
        assert result.returncode == 0, result.stderr
        assert sha256_digest((tmp_path / "b" / "manifest.json").read_bytes()) == own.digest
        log = mirror.log()
    # The private registry needed bob, and only ever saw bob; the first never saw him.
    b_users = {_basic_user(r.authorization_header) for r in second_upstream.tokens.requests}
    a_users = {_basic_user(r.authorization_header) for r in real_upstream.tokens.requests}
    assert b_users == {"bob"}
    assert a_users == {"pusher"}
    assert all(r.status == 200 for r in second_upstream.tokens.requests)
    for secret in (A_CREDS[1], SecondUpstream.CREDS[1]):
        assert secret not in log
    for r in second_upstream.registry.requests():
        assert r.path.startswith(("/v2/team/app/oci/", "/v2/")), r.path


def test_unknown_ns_makes_no_connection_at_all(
    real_upstream: RealUpstream, second_upstream: SecondUpstream, tmp_path: Path
) -> None:
    trap = socket.socket()
    trap.bind(("127.0.0.1", 0))
    trap.listen()
    trap.setblocking(False)
    ns = f"127.0.0.1:{trap.getsockname()[1]}"
    env = _env(real_upstream, second_upstream)
    try:
        with MirrorProcess(tmp_path / "m", None, env=env) as mirror:
            real_upstream.registry.clear_log()
            second_upstream.registry.clear_log()
            real_upstream.tokens.clear()
            for target in (ns, "ghcr.io", "evil.example"):
                r = httpx.get(
                    f"{mirror.url}/v2/library/alpine/manifests/latest", params={"ns": target}
                )
                assert r.status_code == 403
                assert r.json()["errors"][0]["code"] == "DENIED"
            sent = mirror.metrics()
        with pytest.raises(BlockingIOError):
            trap.accept()
    finally:
        trap.close()
    assert real_upstream.registry.requests() == []
    assert second_upstream.registry.requests() == []
    assert real_upstream.tokens.requests == []
    assert not [k for k, v in sent.items() if k[0] == "mirror_upstream_requests_total" and v]


def test_blobs_are_shared_across_registries_by_digest(
    real_upstream: RealUpstream, second_upstream: SecondUpstream, tmp_path: Path
) -> None:
    first = real_upstream.images["oci"]
    shared = second_upstream.shared
    assert set(shared.layer_digests) == set(first.layer_digests)
    env = _env(real_upstream, second_upstream)
    with MirrorProcess(tmp_path / "m", None, env=env) as mirror:
        result = skopeo_copy(
            f"docker://{mirror.host}/{first.repo}:{first.tag}", f"dir:{tmp_path / 'a'}"
        )
        assert result.returncode == 0, result.stderr
        second_upstream.registry.clear_log()
        saved = 0
        for digest in shared.layer_digests:
            for _ in range(100):  # the first pull's commits land just after its bytes
                r = httpx.get(
                    f"{mirror.url}/v2/{shared.repo}/blobs/{digest}",
                    params={"ns": SecondUpstream.NAME},
                )
                assert r.status_code == 200
                if r.headers["x-cache"] == "HIT":
                    break
            assert r.headers["x-cache"] == "HIT"
            assert sha256_digest(r.content) == digest
            saved += len(r.content)
    blob_requests = [r for r in second_upstream.registry.requests() if "/blobs/" in r.path]
    # The second registry was asked once per blob whether shared/app holds it (a HEAD:
    # content by digest crosses no upstream unconfirmed), never for its bytes.
    answered = [r for r in blob_requests if r.status < 400]
    assert {r.method for r in answered} == {"HEAD"}
    assert sorted(r.path for r in answered) == sorted(
        f"/v2/{shared.repo}/blobs/{digest}" for digest in shared.layer_digests
    )
    assert saved > 2 << 20  # the 2 MiB layer and the rest came from the cache
    print(f"bytes not fetched from the second registry: {saved}")


def test_token_realm_on_a_foreign_host_is_refused(tmp_path: Path) -> None:
    # A registry whose challenges name a token service under another host name.
    with (
        TokenServer(tmp_path) as tokens,
        Registry(tmp_path / "registry", tokens, realm_host="localhost") as registry,
    ):
        upstreams = [
            {
                "name": "regc.test",
                "url": registry.url,
                "username": "pusher",
                "password_env": "TEST_C_PASSWORD",
            }
        ]
        env = {"MIRROR_UPSTREAMS": json.dumps(upstreams), "TEST_C_PASSWORD": "pushpass"}
        with MirrorProcess(tmp_path / "m", None, env=env) as mirror:
            r = httpx.get(f"{mirror.url}/v2/team/app/manifests/1", params={"ns": "regc.test"})
            assert r.status_code == 502
            error = r.json()["errors"][0]
            assert error["code"] == "UNAUTHORIZED"
            assert "token realm" in error["message"]
        assert tokens.requests == []  # the password never left


def test_warm_a_second_registry_image_by_its_full_name(
    real_upstream: RealUpstream, second_upstream: SecondUpstream, tmp_path: Path
) -> None:
    own = second_upstream.own
    env = _env(real_upstream, second_upstream)
    with MirrorProcess(tmp_path / "m", None, env=env) as mirror:
        image = f"{SecondUpstream.NAME}/{own.repo}:1.0"
        result = subprocess.run(
            [sys.executable, "-m", "mirror", "warm", image, "--mirror", mirror.url],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert result.returncode == 0, result.stderr
        second_upstream.registry.stop()  # everything warmed must now come from the cache
        try:
            for digest in own.layer_digests:
                for _ in range(100):  # warm's last blob commits just after its bytes
                    r = httpx.get(
                        f"{mirror.url}/v2/{own.repo}/blobs/{digest}",
                        params={"ns": SecondUpstream.NAME},
                    )
                    if r.headers.get("x-cache") == "HIT":
                        break
                    time.sleep(0.02)
                assert r.status_code == 200
                assert r.headers["x-cache"] == "HIT"
                assert sha256_digest(r.content) == digest
        finally:
            second_upstream.registry.start()
