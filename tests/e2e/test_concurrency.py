"""Coalescing and resume end to end: the real registry upstream, the real mirror process."""

from __future__ import annotations

import asyncio
import hashlib
from pathlib import Path

import httpx
import pytest
from conftest import RealUpstream
from harness import DOCKER_MANIFEST, OCI_MANIFEST, fetch_token
from harness.mirror import MirrorProcess

pytestmark = pytest.mark.e2e


def _largest_layer(real_upstream: RealUpstream) -> tuple[str, str, int]:
    image = real_upstream.images["oci"]
    token = fetch_token(real_upstream.tokens, image.repo)
    sizes = {}
    for digest in image.layer_digests:
        r = httpx.head(
            f"{real_upstream.registry.url}/v2/{image.repo}/blobs/{digest}",
            headers={"Authorization": f"Bearer {token}"},
        )
        sizes[digest] = int(r.headers["content-length"])
    digest = max(sizes, key=lambda d: sizes[d])
    return image.repo, digest, sizes[digest]


def _upstream_gets(real_upstream: RealUpstream, suffix: str) -> int:
    return sum(
        1
        for r in real_upstream.registry.requests()
        if r.method == "GET" and r.path.endswith(suffix) and r.status in (200, 206)
    )


async def test_twenty_concurrent_cold_pulls_one_upstream_get(
    real_upstream: RealUpstream, tmp_path: Path
) -> None:
    repo, digest, size = _largest_layer(real_upstream)
    real_upstream.registry.clear_log()
    with MirrorProcess(tmp_path / "m", real_upstream.registry.url) as mirror:
        async with httpx.AsyncClient(base_url=mirror.url, timeout=60) as c:

            async def pull() -> str:
                h = hashlib.sha256()
                async with c.stream("GET", f"/v2/{repo}/blobs/{digest}") as r:
                    assert r.status_code == 200
                    assert r.headers["content-length"] == str(size)
                    async for chunk in r.aiter_raw():
                        h.update(chunk)
                return "sha256:" + h.hexdigest()

            assert await asyncio.gather(*(pull() for _ in range(20))) == [digest] * 20
        assert mirror.metric("mirror_coalesced_requests_total", kind="blob") > 0
    real_upstream.registry.wait_for_request(lambda r: r.path.endswith(digest))
    assert _upstream_gets(real_upstream, f"/blobs/{digest}") == 1


async def test_concurrent_tag_pulls_one_upstream_manifest_get(
    real_upstream: RealUpstream, tmp_path: Path
) -> None:
    image = real_upstream.images["oci"]
    real_upstream.registry.clear_log()
    with MirrorProcess(tmp_path / "m", real_upstream.registry.url) as mirror:
        async with httpx.AsyncClient(base_url=mirror.url, timeout=30) as c:
            rs = await asyncio.gather(
                *(
                    c.get(
                        f"/v2/{image.repo}/manifests/{image.tag}",
                        headers={"Accept": f"{OCI_MANIFEST}, {DOCKER_MANIFEST}"},
                    )
                    for _ in range(20)
                )
            )
    assert {r.headers["docker-content-digest"] for r in rs} == {image.digest}
    assert all(r.content == image.manifest for r in rs)
    real_upstream.registry.wait_for_request(lambda r: r.path.endswith(f"/manifests/{image.tag}"))
    assert _upstream_gets(real_upstream, f"/manifests/{image.tag}") == 1


async def test_docker_style_resume_after_a_cut_connection(
    real_upstream: RealUpstream, tmp_path: Path
) -> None:
    """Docker and containerd resume a cut layer download with `Range: bytes=N-`."""
    repo, digest, size = _largest_layer(real_upstream)
    with MirrorProcess(tmp_path / "m", real_upstream.registry.url) as mirror:
        for attempt in ("cold", "warm"):
            received = b""
            async with (
                httpx.AsyncClient(base_url=mirror.url, timeout=30) as c,
                c.stream("GET", f"/v2/{repo}/blobs/{digest}") as r,
            ):
                async for chunk in r.aiter_raw():
                    received += chunk
                    if len(received) >= size // 3:
                        break  # the connection is cut here
            async with httpx.AsyncClient(base_url=mirror.url, timeout=30) as c:
                rest = await c.get(
                    f"/v2/{repo}/blobs/{digest}", headers={"Range": f"bytes={len(received)}-"}
                )
            assert rest.status_code == 206, attempt
            assert rest.headers["content-range"] == f"bytes {len(received)}-{size - 1}/{size}"
            assert "sha256:" + hashlib.sha256(received + rest.content).hexdigest() == digest
