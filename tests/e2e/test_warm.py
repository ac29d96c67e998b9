"""`mirror warm` against the real registry: the chosen platform is cached, the rest is not."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
from conftest import RealUpstream
from harness import OCI_INDEX, OCI_MANIFEST
from harness.mirror import MirrorProcess

pytestmark = pytest.mark.e2e


def _blobs(manifest: bytes) -> list[str]:
    m = json.loads(manifest)
    return [m["config"]["digest"], *(layer["digest"] for layer in m["layers"])]


def test_warm_one_platform_then_pull_it_with_the_upstream_gone(
    real_upstream: RealUpstream, tmp_path: Path
) -> None:
    image = real_upstream.images["index"]
    amd64, arm64 = image.child_digests["linux/amd64"], image.child_digests["linux/arm64"]
    with MirrorProcess(tmp_path / "m", real_upstream.registry.url) as mirror:
        run = subprocess.run(
            [
                sys.executable,
                "-m",
                "mirror",
                "warm",
                f"{image.repo}:{image.tag}",
                "--mirror",
                mirror.url,
                "--platform",
                "linux/amd64",
            ],
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert run.returncode == 0, run.stderr
        assert f"{image.repo}:{image.tag} (linux/amd64): 2 manifests" in run.stdout
        real_upstream.registry.stop()
        try:
            accept = {"Accept": f"{OCI_INDEX}, {OCI_MANIFEST}"}
            child = httpx.get(f"{mirror.url}/v2/{image.repo}/manifests/{amd64}", headers=accept)
            assert (child.status_code, child.headers["x-cache"]) == (200, "HIT")
            for digest in _blobs(child.content):
                r = httpx.get(f"{mirror.url}/v2/{image.repo}/blobs/{digest}")
                assert (r.status_code, r.headers["x-cache"]) == (200, "HIT"), digest
            other = httpx.get(f"{mirror.url}/v2/{image.repo}/manifests/{arm64}", headers=accept)
            assert other.status_code == 502  # never warmed, and the upstream is gone
        finally:
            real_upstream.registry.start()


def test_warm_reports_a_bad_image_and_exits_1(tmp_path: Path) -> None:
    run = subprocess.run(
        [sys.executable, "-m", "mirror", "warm", "UPPER/case", "--mirror", "http://127.0.0.1:9"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert run.returncode == 1
    assert "UPPER/case: failed" in run.stderr
