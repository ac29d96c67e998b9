"""End to end: `/v2/_catalog` of the real `mirror serve` in front of the real Distribution
registry lists what skopeo pulled through it, page by page."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest
from conftest import RealUpstream
from harness.mirror import MirrorProcess, skopeo_copy, skopeo_list_tags

pytestmark = pytest.mark.e2e


def test_catalog_lists_pulled_repositories_page_by_page(
    real_upstream: RealUpstream, tmp_path: Path
) -> None:
    images = real_upstream.images
    pulled = [images["schema2"], images["oci"]]  # of the four the registry holds
    with MirrorProcess(tmp_path / "m", real_upstream.registry.url) as mirror:
        with httpx.Client(base_url=mirror.url) as c:
            assert c.get("/v2/_catalog").json() == {"repositories": []}  # nothing cached
        for image in pulled:
            src = f"docker://{mirror.host}/{image.repo}:{image.tag}"
            result = skopeo_copy(src, f"dir:{tmp_path / image.repo.replace('/', '-')}")
            assert result.returncode == 0, result.stderr

        with httpx.Client(base_url=mirror.url) as c:
            names: list[str] = []
            url: str | None = "/v2/_catalog?n=1"
            pages = 0
            while url is not None:
                r = c.get(url)
                assert r.status_code == 200, r.text
                page = r.json()["repositories"]
                assert len(page) == 1
                names += page
                pages += 1
                link = r.headers.get("link")
                url = link.partition(">")[0].lstrip("<") if link else None
            assert pages == 2
            assert names == sorted(image.repo for image in pulled)

        # Tag listing still goes to the registry, as before.
        oci = images["oci"]
        assert oci.tag in skopeo_list_tags(f"docker://{mirror.host}/{oci.repo}")

    # The catalog is the mirror's own: the registry was never asked for its catalog.
    assert not [r for r in real_upstream.registry.requests() if "_catalog" in r.path]
