"""Clients with credentials through the real `mirror serve`: skopeo with --src-creds,
podman with an auth file, the token realm as clients use it, and access rules across
two real registries (each with token auth)."""

from __future__ import annotations

import base64
import json
import os
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import bcrypt
import httpx
import pytest
from conftest import RealUpstream, SecondUpstream
from harness import OCI_MANIFEST, require_tool
from harness.mirror import MirrorProcess, skopeo_copy

pytestmark = pytest.mark.e2e

USERS = {"alice": "alice-pass", "bob": "bob-pass"}


def _htpasswd(path: Path, users: dict[str, str]) -> Path:
    lines = [
        f"{u}:{bcrypt.hashpw(p.encode(), bcrypt.gensalt(rounds=5)).decode()}"
        for u, p in users.items()
    ]
    tmp = path.with_suffix(".tmp")
    tmp.write_text("\n".join(lines) + "\n")
    tmp.replace(path)  # as `mirror auth htpasswd` and a Secret update do: never half-written
    return path


@pytest.fixture
def htpasswd(tmp_path: Path) -> Path:
    return _htpasswd(tmp_path / "htpasswd", USERS)


@pytest.fixture
def mirror(real_upstream: RealUpstream, tmp_path: Path, htpasswd: Path) -> Iterator[MirrorProcess]:
    env = {"MIRROR_AUTH_HTPASSWD": str(htpasswd)}
    with MirrorProcess(tmp_path / "m", real_upstream.registry.url, env=env) as m:
        yield m


def _creds(user: str) -> list[str]:
    return ["--src-creds", f"{user}:{USERS[user]}"]


def test_skopeo_with_src_creds_and_a_user_removed_while_running(
    real_upstream: RealUpstream, mirror: MirrorProcess, htpasswd: Path, tmp_path: Path
) -> None:
    image = real_upstream.images["oci"]
    src = f"docker://{mirror.host}/{image.repo}:{image.tag}"

    anonymous = skopeo_copy(src, f"oci:{tmp_path / 'anon'}:x")
    assert anonymous.returncode != 0
    assert "credentials required: log in to this mirror" in anonymous.stderr
    wrong = skopeo_copy(src, f"oci:{tmp_path / 'wrong'}:x", extra=["--src-creds", "alice:nope"])
    assert wrong.returncode != 0
    assert "invalid username or password" in wrong.stderr

    ok = skopeo_copy(src, f"oci:{tmp_path / 'ok'}:x", extra=_creds("alice"))
    assert ok.returncode == 0, ok.stderr
    index = json.loads((tmp_path / "ok" / "index.json").read_text())
    assert index["manifests"][0]["digest"] == image.digest
    # skopeo went through the realm: a token there, then bearer requests.
    assert mirror.metric("mirror_client_auth_total", method="realm", result="ok") >= 1
    assert mirror.metric("mirror_client_auth_total", method="bearer", result="ok") >= 2

    # alice is removed while the mirror runs: her next pull is refused.
    _htpasswd(htpasswd, {"bob": USERS["bob"]})
    gone = skopeo_copy(src, f"oci:{tmp_path / 'gone'}:x", extra=_creds("alice"))
    assert gone.returncode != 0
    assert "invalid username or password" in gone.stderr
    still = skopeo_copy(src, f"oci:{tmp_path / 'bob'}:x", extra=_creds("bob"))
    assert still.returncode == 0, still.stderr


def test_token_from_the_mirrors_realm(real_upstream: RealUpstream, mirror: MirrorProcess) -> None:
    image = real_upstream.images["oci"]
    path = f"/v2/{image.repo}/manifests/{image.tag}"
    with httpx.Client(base_url=mirror.url, timeout=30) as c:
        first = c.get(path, headers={"Accept": OCI_MANIFEST})
        assert first.status_code == 401
        assert first.json()["errors"][0]["code"] == "UNAUTHORIZED"
        challenge = first.headers["www-authenticate"]
        assert challenge.startswith(f'Bearer realm="{mirror.url}/auth/token"')
        assert f'scope="repository:{image.repo}:pull"' in challenge
        got = c.get(
            f"{mirror.url}/auth/token",
            params={"service": "mirror", "scope": f"repository:{image.repo}:pull"},
            auth=("bob", USERS["bob"]),
        )
        assert got.status_code == 200
        token = got.json()["token"]
        r = c.get(path, headers={"Accept": OCI_MANIFEST, "Authorization": f"Bearer {token}"})
        assert r.status_code == 200
        assert r.headers["docker-content-digest"] == image.digest
        # The upstream's own token never reaches the client, nor the client's the upstream.
        assert token not in mirror.log_path.read_text()


def _podman(tmp: Path, *args: str, conf: Path | None = None) -> subprocess.CompletedProcess[str]:
    require_tool("podman")
    cmd = [
        "podman",
        "--root",
        str(tmp / "root"),
        "--runroot",
        str(tmp / "run"),
        "--storage-driver",
        "vfs",
        *args,
    ]
    env = {**os.environ, "HOME": str(tmp), "XDG_CONFIG_HOME": str(tmp / "config")}
    if conf is not None:
        env["CONTAINERS_REGISTRIES_CONF"] = str(conf)
    return subprocess.run(cmd, capture_output=True, text=True, timeout=180, env=env)


def test_podman_with_an_auth_file(real_upstream: RealUpstream, mirror: MirrorProcess) -> None:
    image = real_upstream.images["oci"]
    with tempfile.TemporaryDirectory(prefix="podman-") as scratch:
        tmp = Path(scratch)
        authfile = tmp / "auth.json"
        auth = base64.b64encode(f"alice:{USERS['alice']}".encode()).decode()
        authfile.write_text(json.dumps({"auths": {mirror.host: {"auth": auth}}}))
        ref = f"{mirror.host}/{image.repo}:{image.tag}"
        pulled = _podman(tmp, "pull", "--tls-verify=false", "--authfile", str(authfile), ref)
        assert pulled.returncode == 0, pulled.stderr
        digest = _podman(tmp, "image", "inspect", "--format", "{{.Digest}}", ref)
        assert digest.stdout.strip() == image.digest
        # Without the auth file podman is refused, with the mirror's message.
        _podman(tmp, "rmi", "-a", "-f")
        refused = _podman(tmp, "pull", "--tls-verify=false", ref)
        assert refused.returncode != 0
        assert "credentials required: log in to this mirror" in refused.stderr

        # As a registries.conf mirror of a registry podman cannot reach itself: the
        # auth file's entry for the mirror's host is what it logs in with.
        conf = tmp / "registries.conf"
        conf.write_text(
            '[[registry]]\nprefix = "unreachable.invalid"\nlocation = "unreachable.invalid"\n'
            f'[[registry.mirror]]\nlocation = "{mirror.host}"\ninsecure = true\n'
        )
        via = f"unreachable.invalid/{image.repo}:{image.tag}"
        mirrored = _podman(tmp, "pull", "--authfile", str(authfile), via, conf=conf)
        assert mirrored.returncode == 0, mirrored.stderr
        digest = _podman(tmp, "image", "inspect", "--format", "{{.Digest}}", via, conf=conf)
        assert digest.stdout.strip() == image.digest


def test_access_rules_across_two_registries(
    real_upstream: RealUpstream, second_upstream: SecondUpstream, tmp_path: Path, htpasswd: Path
) -> None:
    """alice may pull only from docker.io (the first registry); bob only from the
    private second one. Knowing a digest of the private registry's content gets alice
    nothing: 403, no bytes, and no request to that registry."""
    upstreams = [
        {
            "name": "docker.io",
            "url": real_upstream.registry.url,
            "username": "pusher",
            "password_env": "TEST_A_PASSWORD",
        },
        {
            "name": SecondUpstream.NAME,
            "url": second_upstream.registry.url,
            "username": SecondUpstream.CREDS[0],
            "password_env": "TEST_B_PASSWORD",
            "path_prefix": "regb",
        },
    ]
    access = [
        {"users": ["alice"], "upstreams": ["docker.io"]},
        {"users": ["bob"], "upstreams": [SecondUpstream.NAME]},
    ]
    env = {
        "MIRROR_UPSTREAMS": json.dumps(upstreams),
        "MIRROR_ACCESS": json.dumps(access),
        "MIRROR_AUTH_HTPASSWD": str(htpasswd),
        "TEST_A_PASSWORD": "pushpass",
        "TEST_B_PASSWORD": SecondUpstream.CREDS[1],
    }
    own = second_upstream.own
    with MirrorProcess(tmp_path / "m", None, env=env) as mirror:
        # bob pulls the private image (prefix route, as podman and skopeo reach it).
        src = f"docker://{mirror.host}/regb/{own.repo}:1.0"
        pulled = skopeo_copy(src, f"oci:{tmp_path / 'bob'}:x", extra=_creds("bob"))
        assert pulled.returncode == 0, pulled.stderr
        denied_by_skopeo = skopeo_copy(src, f"oci:{tmp_path / 'alice'}:x", extra=_creds("alice"))
        assert denied_by_skopeo.returncode != 0
        assert "denied" in denied_by_skopeo.stderr.lower()

        second_upstream.registry.clear_log()
        layer = own.layer_digests[-1]
        with httpx.Client(base_url=mirror.url, auth=("alice", USERS["alice"]), timeout=30) as c:
            for path, params in (
                (f"/v2/regb/{own.repo}/blobs/{layer}", {}),
                (f"/v2/{own.repo}/blobs/{layer}", {"ns": SecondUpstream.NAME}),
                (f"/v2/{own.repo}/manifests/{own.digest}", {"ns": SecondUpstream.NAME}),
            ):
                r = c.get(path, params=params, headers={"Accept": OCI_MANIFEST})
                assert r.status_code == 403, (path, r.status_code)
                assert r.json()["errors"][0]["code"] == "DENIED"
                assert "alice may not pull" in r.json()["errors"][0]["message"]
            # Allowed for docker.io, which she may pull from: the first registry's image.
            first = real_upstream.images["oci"]
            r = c.get(f"/v2/{first.repo}/manifests/{first.tag}", headers={"Accept": OCI_MANIFEST})
            assert r.status_code == 200
        assert second_upstream.registry.requests() == []


def test_warm_with_a_robot_token_file(
    real_upstream: RealUpstream, tmp_path: Path, htpasswd: Path
) -> None:
    import hashlib
    import sys

    token = "robot-token-for-warming-0123456789"
    robots = [{"name": "warmer", "sha256": hashlib.sha256(token.encode()).hexdigest()}]
    env = {"MIRROR_AUTH_HTPASSWD": str(htpasswd), "MIRROR_AUTH_TOKENS": json.dumps(robots)}
    image = real_upstream.images["oci"]
    token_file = tmp_path / "token"
    token_file.write_text(token + "\n")
    with MirrorProcess(tmp_path / "m", real_upstream.registry.url, env=env) as mirror:
        base = [sys.executable, "-m", "mirror", "warm", "--mirror", mirror.url]
        ref = f"{image.repo}:{image.tag}"
        refused = subprocess.run([*base, ref], capture_output=True, text=True, timeout=120)
        assert refused.returncode == 1
        assert "answered 401" in refused.stderr
        assert "give credentials with --token-file" in refused.stderr
        warmed = subprocess.run(
            [*base, "--token-file", str(token_file), ref],
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert warmed.returncode == 0, warmed.stderr
        assert "bytes warm" in warmed.stdout
        assert mirror.metric("mirror_client_auth_total", method="robot", result="ok") >= 2
        assert token not in mirror.log_path.read_text()


def test_an_edge_logs_in_to_an_authenticated_central_tier(
    real_upstream: RealUpstream, tmp_path: Path, htpasswd: Path
) -> None:
    """A node's mirror chained to a central one that wants credentials: the tier's own
    username and password go to the central's realm, and nothing falls back to the
    registry."""
    registry = real_upstream.registry.url
    upstreams = json.dumps([{"name": "docker.io", "url": registry}])
    central_env = {"MIRROR_UPSTREAMS": upstreams, "MIRROR_AUTH_HTPASSWD": str(htpasswd)}
    image = real_upstream.images["oci"]
    with MirrorProcess(tmp_path / "central", None, env=central_env) as central:
        tier = {"url": central.url, "username": "bob", "password_env": "TEST_TIER_PASSWORD"}
        edge_upstreams = json.dumps([{"name": "docker.io", "url": registry, "mirrors": [tier]}])
        edge_env = {"MIRROR_UPSTREAMS": edge_upstreams, "TEST_TIER_PASSWORD": USERS["bob"]}
        with MirrorProcess(tmp_path / "edge", None, env=edge_env) as edge:
            dest = tmp_path / "pulled"
            result = skopeo_copy(f"docker://{edge.host}/{image.repo}:{image.tag}", f"dir:{dest}")
            assert result.returncode == 0, result.stderr
            assert (dest / "manifest.json").read_bytes() == image.manifest
            assert central.metric("mirror_client_auth_total", method="realm", result="ok") >= 1
            assert central.metric("mirror_client_auth_total", method="bearer", result="ok") >= 3
            served = central.metric("mirror_cache_requests_total", kind="blob", result="miss")
            assert served == len(image.layer_digests)


def test_containerd_logs_in_through_the_realm(
    real_upstream: RealUpstream, mirror: MirrorProcess, tmp_path: Path
) -> None:
    """ctr with credentials: containerd answers the mirror's Bearer challenge at its
    realm (OAuth2's password grant by POST first), then pulls with the token."""
    from harness import require_root
    from harness.containerd import Containerd

    require_root("run containerd")
    require_tool("containerd")
    image = real_upstream.images["schema2"]
    ref = f"docker.io/{image.repo}:{image.tag}"
    hosts = tmp_path / "hosts" / "docker.io"
    hosts.mkdir(parents=True)
    (hosts / "hosts.toml").write_text(
        'server = "http://127.0.0.1:9"\n\n'
        f'[host."{mirror.url}"]\n  capabilities = ["pull", "resolve"]\n'
    )
    with Containerd(tmp_path / "ctd") as containerd:
        refused = containerd.pull(ref, tmp_path / "hosts")
        assert refused.returncode != 0
        wrong = containerd.pull(ref, tmp_path / "hosts", user="alice:nope")
        assert wrong.returncode != 0
        assert containerd.images() == {}
        pulled = containerd.pull(ref, tmp_path / "hosts", user=f"alice:{USERS['alice']}")
        assert pulled.returncode == 0, f"{pulled.stderr}\n{mirror.log_tail()}"
        assert containerd.image_digest(ref) == image.digest
    assert mirror.metric("mirror_client_auth_total", method="realm", result="ok") >= 1
    assert mirror.metric("mirror_client_auth_total", method="bearer", result="ok") >= 2
    realm_posts = [line for line in mirror.log().splitlines() if "POST /auth/token 200" in line]
    assert realm_posts, "containerd did not use the password grant"
