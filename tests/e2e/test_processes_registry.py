"""Two `mirror serve` processes on one cache directory, the real Distribution registry
upstream and skopeo clients pulling through both at once."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from conftest import RealUpstream
from harness.mirror import MirrorProcess, skopeo_copy

pytestmark = pytest.mark.e2e


def test_skopeo_through_two_processes_fetches_each_blob_once(
    real_upstream: RealUpstream, tmp_path: Path
) -> None:
    image = real_upstream.images["oci"]
    cache = tmp_path / "cache"
    real_upstream.registry.clear_log()
    with (
        MirrorProcess(tmp_path / "a", real_upstream.registry.url, cache_dir=cache) as a,
        MirrorProcess(tmp_path / "b", real_upstream.registry.url, cache_dir=cache) as b,
        ThreadPoolExecutor(4) as pool,
    ):
        pulls = [
            pool.submit(
                skopeo_copy,
                f"docker://{m.host}/{image.repo}@{image.digest}",
                f"oci:{tmp_path / f'out{i}'}:x",
            )
            for i, m in enumerate((a, b, a, b))
        ]
        for pull in pulls:
            result = pull.result()
            assert result.returncode == 0, result.stderr
        for i in range(4):
            got = {p.name for p in (tmp_path / f"out{i}" / "blobs" / "sha256").iterdir()}
            assert {d.removeprefix("sha256:") for d in image.layer_digests} <= got
    blob_gets = [
        r.path
        for r in real_upstream.registry.requests()
        if r.method == "GET" and "/blobs/" in r.path and r.status == 200
    ]
    # Each blob once, whichever process its clients reached.
    assert sorted(blob_gets) == sorted(set(blob_gets))
    assert {p.rsplit("/", 1)[1] for p in blob_gets} >= set(image.layer_digests)
