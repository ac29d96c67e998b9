"""The size cap end to end: skopeo pulls more than `max_size` through the mirror process."""

from __future__ import annotations

import time
from pathlib import Path

import httpx
import pytest
from conftest import RealUpstream
from harness import fetch_token
from harness.mirror import MirrorProcess, skopeo_copy

pytestmark = pytest.mark.e2e


def _disk(cache: Path) -> int:
    return sum(p.stat().st_size for p in (cache / "blobs").rglob("*") if p.is_file())


def _size_of(real_upstream: RealUpstream, repo: str, digests: list[str]) -> int:
    token = fetch_token(real_upstream.tokens, repo)
    total = 0
    for digest in digests:
        r = httpx.head(
            f"{real_upstream.registry.url}/v2/{repo}/blobs/{digest}",
            headers={"Authorization": f"Bearer {token}"},
        )
        total += int(r.headers["content-length"])
    return total


def test_cache_stays_under_max_size_and_keeps_the_recent_image(
    real_upstream: RealUpstream, tmp_path: Path
) -> None:
    oci, index = real_upstream.images["oci"], real_upstream.images["index"]
    index_bytes = _size_of(real_upstream, index.repo, list(index.layer_digests))
    oci_bytes = _size_of(real_upstream, oci.repo, list(oci.layer_digests))
    cap = index_bytes + 1000  # the index image fits; with the oci image it does not
    assert oci_bytes > 1000
    env = {"MIRROR_MAX_SIZE": str(cap), "MIRROR_EVICTION_INTERVAL": "0.2"}
    with MirrorProcess(tmp_path / "m", real_upstream.registry.url, env=env) as mirror:
        for image, multi in ((oci, False), (index, True)):  # the index is the most recent
            result = skopeo_copy(
                f"docker://{mirror.host}/{image.repo}:{image.tag}",
                f"oci:{tmp_path / image.repo.replace('/', '_')}:x",
                multi_arch=multi,
            )
            assert result.returncode == 0, result.stderr
        deadline = time.monotonic() + 10
        while _disk(mirror.cache_dir) > cap and time.monotonic() < deadline:
            time.sleep(0.1)
        assert _disk(mirror.cache_dir) <= cap
        assert mirror.metric("mirror_evictions_total", kind="blob", reason="size") > 0
        # The most recently pulled image stayed whole: a warm pull needs no upstream.
        real_upstream.registry.stop()
        try:
            again = skopeo_copy(
                f"docker://{mirror.host}/{index.repo}@{index.digest}",
                f"oci:{tmp_path / 'again'}",
                multi_arch=True,
            )
            assert again.returncode == 0, again.stderr
        finally:
            real_upstream.registry.start()
