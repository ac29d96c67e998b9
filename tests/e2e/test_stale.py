"""Stale-if-error end to end: the real registry goes away behind the mirror process."""

from __future__ import annotations

import time
from pathlib import Path

import httpx
import pytest
from conftest import RealUpstream
from harness import OCI_MANIFEST
from harness.mirror import MirrorProcess

pytestmark = pytest.mark.e2e


def test_cached_tag_served_stale_while_upstream_is_down_then_a_clear_error(
    real_upstream: RealUpstream, tmp_path: Path
) -> None:
    image = real_upstream.images["oci"]
    # Every request revalidates (TTL 0); stale answers are allowed for 2 seconds.
    env = {"MIRROR_TAG_TTL": "0", "MIRROR_MAX_STALE": "2s"}
    url_path = f"/v2/{image.repo}/manifests/{image.tag}"
    accept = {"Accept": OCI_MANIFEST}
    with MirrorProcess(tmp_path / "m", real_upstream.registry.url, env=env) as mirror:
        first = httpx.get(mirror.url + url_path, headers=accept)
        assert (first.status_code, first.headers["x-cache"]) == (200, "MISS")
        again = httpx.get(mirror.url + url_path, headers=accept)
        assert again.headers["x-cache"] == "REVALIDATED"
        real_upstream.registry.stop()
        try:
            stale = httpx.get(mirror.url + url_path, headers=accept)
            assert (stale.status_code, stale.headers["x-cache"]) == (200, "STALE")
            assert stale.content == image.manifest
            assert (
                mirror.metric("mirror_cache_requests_total", kind="manifest", result="stale") == 1
            )
            time.sleep(2.1)  # past max_stale (a real process has no injectable clock)
            gone = httpx.get(mirror.url + url_path, headers=accept)
            assert gone.status_code == 502
            err = gone.json()["errors"][0]
            assert err["code"] == "UNAVAILABLE"
            assert "unreachable" in err["message"]
            # Content by digest never needs the upstream.
            by_digest = httpx.get(
                f"{mirror.url}/v2/{image.repo}/manifests/{image.digest}", headers=accept
            )
            assert (by_digest.status_code, by_digest.headers["x-cache"]) == (200, "HIT")
        finally:
            real_upstream.registry.start()
