"""Disk full, end to end: the cache on a small tmpfs (mounted by the test, as root).

The real registry and skopeo pull an image whose layer is larger than the whole cache
file system; then a ballast file fills it to the last byte. Every pull must still
succeed with verified digests, the failures must be counted, cached content keeps
serving, and once space comes back the same process caches again.
"""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from conftest import RealUpstream
from harness import Layout, push, require_root, require_tool, sha256_digest
from harness.images import seeded_bytes
from harness.mirror import MirrorProcess, skopeo_copy

pytestmark = pytest.mark.e2e

TMPFS_SIZE = 6 << 20
LAYER_SIZE = 16 << 20  # incompressible, so the gzip'd layer is as big: > the tmpfs


@pytest.fixture
def small_fs(tmp_path: Path) -> Iterator[Path]:
    require_root("mount a size-limited tmpfs")
    require_tool("mount")
    mountpoint = tmp_path / "tmpfs"
    mountpoint.mkdir()
    subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={TMPFS_SIZE},mode=0755", "tmpfs", str(mountpoint)],
        check=True,
    )
    try:
        yield mountpoint
    finally:
        subprocess.run(["umount", "-l", str(mountpoint)], check=False)


def _pull(mirror: MirrorProcess, ref: str, dest: Path) -> set[str]:
    """Pull through the mirror into a `dir:` (bytes kept as served); the blob digests."""
    result = skopeo_copy(f"docker://{mirror.host}/{ref}", f"dir:{dest}")
    assert result.returncode == 0, result.stderr
    return {f"sha256:{p.name}" for p in dest.iterdir() if len(p.name) == 64}


def test_full_cache_file_system_still_serves_every_pull(
    real_upstream: RealUpstream, small_fs: Path, tmp_path: Path
) -> None:
    layout = Layout(tmp_path / "layout")
    big = layout.image([[("opt/big.bin", seeded_bytes("disk-full", LAYER_SIZE))]])
    layout.tag(big, "big")
    big_digest = push(layout.root, "big", real_upstream.registry, "big/app", "1")
    small = real_upstream.images["schema2"]
    oci = real_upstream.images["oci"]

    with MirrorProcess(tmp_path / "m", real_upstream.registry.url, cache_dir=small_fs) as mirror:
        # 1. The layer cannot fit: skopeo still gets every byte, digest-checked.
        pulled = _pull(mirror, "big/app:1", tmp_path / "big")
        assert len(pulled) == 2  # config and the 16 MiB layer; skopeo checked both digests
        manifest = (tmp_path / "big" / "manifest.json").read_bytes()
        assert sha256_digest(manifest) == big_digest
        assert mirror.metric("mirror_cache_write_failures_total", kind="blob") >= 1
        assert "No space left on device" in mirror.log()
        # The partial layer was let go, so the cache keeps working for what fits.
        _pull(mirror, small.reference, tmp_path / "small")
        layer = small.layer_digests[-1]
        for _ in range(100):
            r = httpx.head(f"{mirror.url}/v2/{small.repo}/blobs/{layer}")
            if r.headers.get("x-cache") == "HIT":
                break
        assert r.headers.get("x-cache") == "HIT"

        # 2. The file system fills up completely (another tenant, a log, ...): not even
        #    the first chunk of a layer fits, and SQLite may fail too.
        ballast = small_fs / "ballast"
        with ballast.open("wb") as f, pytest.raises(OSError, match="No space left"):
            while True:
                f.write(b"\0" * (1 << 20))
                f.flush()
        # Still ready: taking it out of service would send every node upstream.
        ready = httpx.get(f"{mirror.url}/readyz")
        assert ready.status_code == 200
        assert ready.json()["checks"]["cache"].startswith("full")
        failures = mirror.metric("mirror_cache_write_failures_total", kind="blob")
        assert set(oci.layer_digests) <= _pull(mirror, oci.reference, tmp_path / "oci")
        assert mirror.metric("mirror_cache_write_failures_total", kind="blob") > failures

        # 3. What was cached before still serves with the upstream gone.
        real_upstream.registry.stop()
        try:
            again = _pull(mirror, f"{small.repo}@{small.digest}", tmp_path / "again")
            assert set(small.layer_digests) <= again
        finally:
            real_upstream.registry.start()

        # 4. Space comes back: the same mirror process caches again, no restart.
        ballast.unlink()
        _pull(mirror, oci.reference, tmp_path / "oci2")
        layer = oci.layer_digests[-1]
        for _ in range(100):
            r = httpx.head(f"{mirror.url}/v2/{oci.repo}/blobs/{layer}")
            if r.headers.get("x-cache") == "HIT":
                break
        assert r.headers.get("x-cache") == "HIT"
