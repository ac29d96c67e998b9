"""End to end: a real containerd (`ctr images pull` with a hosts.toml mirror entry)
pulls through the real `mirror serve` process from the real Distribution registry."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from conftest import RealUpstream, SecondUpstream
from harness import LoggedRequest, require_root, require_tool
from harness.containerd import Containerd, write_hosts_toml
from harness.mirror import MirrorProcess

pytestmark = pytest.mark.e2e

# Nothing listens on the discard port: if containerd ever fell back from the mirror
# to the `server`, the pull would fail instead of reaching Docker Hub.
UNREACHABLE = "http://127.0.0.1:9"

_HARNESS_PATHS = ("/readyz", "/metrics")  # MirrorProcess's readiness probe and metric()


def _mirror_requests(
    mirror: MirrorProcess, expected: list[tuple[str, str, int]], timeout: float = 5.0
) -> list[tuple[str, str, int]]:
    """(method, target, status) of the clients' requests in the mirror's JSON access
    log, once it holds all of `expected` (a line is written when its response ends)."""
    deadline = time.monotonic() + timeout
    while True:
        found = []
        for line in mirror.log().splitlines():
            try:
                entry = json.loads(line)
            except ValueError:
                continue
            if entry.get("logger") == "mirror.access" and entry["path"] not in _HARNESS_PATHS:
                found.append((entry["method"], entry["path"], entry["status"]))
        if all(e in found for e in expected) or time.monotonic() >= deadline:
            return found
        time.sleep(0.05)


def _get_of(path_end: str) -> Callable[[LoggedRequest], bool]:
    return lambda r: r.method == "GET" and r.status == 200 and r.path.endswith(path_end)


def test_containerd_pulls_docker_hub_image_through_the_mirror(
    real_upstream: RealUpstream, tmp_path: Path
) -> None:
    require_root("run containerd")
    require_tool("containerd")
    require_tool("ctr")
    image = real_upstream.images["schema2"]
    ref = f"docker.io/{image.repo}:{image.tag}"
    hosts_dir = tmp_path / "hosts"
    real_upstream.registry.clear_log()
    # The mirror stands in for docker.io, which here is the real registry on loopback.
    upstreams = json.dumps([{"name": "docker.io", "url": real_upstream.registry.url}])
    env = {"MIRROR_UPSTREAMS": upstreams, "MIRROR_LOG_FORMAT": "json"}
    with MirrorProcess(tmp_path / "mirror", None, env=env) as mirror:
        # As the node-local DaemonSet's init container does: hosts.toml files from the
        # mirror's own settings (fallback `server`: the upstream, here on loopback).
        written = subprocess.run(
            [
                *(sys.executable, "-m", "mirror", "containerd-hosts"),
                *("--mirror-url", mirror.url, "--dir", str(hosts_dir)),
            ],
            env={**os.environ, **env},
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert written.returncode == 0, written.stderr
        assert (hosts_dir / "docker.io" / "hosts.toml").is_file()

        with Containerd(tmp_path / "cold") as containerd:
            result = containerd.pull(ref, hosts_dir)
            assert result.returncode == 0, f"{result.stderr}\n{mirror.log()}"
            assert containerd.image_digest(ref) == image.digest
            check = containerd.check(ref)
            assert check.status == "complete"
            assert check.unpacked
            # The layer really was unpacked into the snapshotter.
            motd = [d / "etc/motd" for d in containerd.snapshot_dirs() if (d / "etc/motd").exists()]
            assert [p.read_bytes() for p in motd] == [b"small image\n"]
        assert mirror.metric("mirror_cache_requests_total", kind="blob", result="miss") > 0

        # Every request containerd made went to the mirror, tagged with the registry
        # it stands in for (`?ns=docker.io`), and the mirror answered it.
        prefix = f"/v2/{image.repo}/"
        expected = [("HEAD", f"{prefix}manifests/{image.tag}?ns=docker.io", 200)]
        expected += [
            ("GET", f"{prefix}{kind}/{digest}?ns=docker.io", 200)
            for kind, digests in (("manifests", [image.digest]), ("blobs", image.layer_digests))
            for digest in digests
        ]
        requests = _mirror_requests(mirror, expected)
        assert sorted(requests) == sorted(expected), mirror.log()

        # The real registry served them, without the mirror's query parameter.
        for blob in image.layer_digests:
            real_upstream.registry.wait_for_request(_get_of(f"/blobs/{blob}"))
        upstream = real_upstream.registry.requests()
        assert all(r.path.startswith(f"/v2/{image.repo}/") for r in upstream if r.path != "/v2/")
        assert not [r for r in upstream if "ns=" in r.path]

        # A second, empty containerd gets everything from the mirror's cache.
        real_upstream.registry.clear_log()
        with Containerd(tmp_path / "warm") as containerd:
            result = containerd.pull(ref, hosts_dir)
            assert result.returncode == 0, f"{result.stderr}\n{mirror.log()}"
            assert containerd.image_digest(ref) == image.digest
        hits = mirror.metric("mirror_cache_requests_total", kind="blob", result="hit")
        assert hits == len(image.layer_digests)
        assert not [r for r in real_upstream.registry.requests() if "/blobs/" in r.path]


def test_containerd_pulls_a_non_docker_hub_registry_through_the_mirror(
    real_upstream: RealUpstream, second_upstream: SecondUpstream, tmp_path: Path
) -> None:
    """`regb.test:5000/team/app/oci:1.0`: containerd asks the mirror with
    `?ns=regb.test:5000`, and the mirror fetches from the second (private) registry
    with its own credentials, not from docker.io, which has a repository of that name
    with other content."""
    require_root("run containerd")
    require_tool("containerd")
    require_tool("ctr")
    image = second_upstream.own
    ref = f"{SecondUpstream.NAME}/{image.repo}:1.0"
    hosts_dir = tmp_path / "hosts"
    upstreams = [
        {"name": "docker.io", "url": real_upstream.registry.url},
        {
            "name": SecondUpstream.NAME,
            "url": second_upstream.registry.url,
            "username": SecondUpstream.CREDS[0],
            "password_env": "TEST_B_PASSWORD",
        },
    ]
    env = {
        "MIRROR_UPSTREAMS": json.dumps(upstreams),
        "TEST_B_PASSWORD": SecondUpstream.CREDS[1],
        "MIRROR_LOG_FORMAT": "json",
    }
    second_upstream.registry.clear_log()
    second_upstream.tokens.clear()
    with MirrorProcess(tmp_path / "mirror", None, env=env) as mirror:
        # `_default` (every registry without a directory of its own), as in
        # deploy/containerd/certs.d/_default/hosts.toml.
        write_hosts_toml(hosts_dir, "_default", mirror.url, server=UNREACHABLE)
        with Containerd(tmp_path / "ctd") as containerd:
            result = containerd.pull(ref, hosts_dir)
            assert result.returncode == 0, f"{result.stderr}\n{mirror.log()}"
            assert containerd.image_digest(ref) == image.digest
            check = containerd.check(ref)
            assert check.status == "complete" and check.unpacked
            marker = [
                d / "etc/which-registry"
                for d in containerd.snapshot_dirs()
                if (d / "etc/which-registry").exists()
            ]
            assert [p.read_bytes() for p in marker] == [b"regb\n"]
        ns = "ns=" + SecondUpstream.NAME.replace(":", "%3A")
        expected = [("HEAD", f"/v2/{image.repo}/manifests/1.0?{ns}", 200)]
        requests = _mirror_requests(mirror, expected)
        assert expected[0] in requests
        assert all(target.endswith(f"?{ns}") for _, target, _ in requests), requests
    for blob in image.layer_digests:
        second_upstream.registry.wait_for_request(_get_of(f"/blobs/{blob}"))
    assert {r.user for r in second_upstream.tokens.requests} == {"bob"}
