"""Fairness end to end: the real `mirror serve` in front of the real registry, a greedy
client on 127.0.0.2 over its manifest limit, and skopeo (from 127.0.0.1) pulling an
image through the same mirror at the same time."""

from __future__ import annotations

import threading
from pathlib import Path

import httpx
import pytest
from conftest import RealUpstream
from harness import DOCKER_LIST, DOCKER_MANIFEST, OCI_INDEX, OCI_MANIFEST
from harness.mirror import MirrorProcess, skopeo_copy

pytestmark = pytest.mark.e2e

ACCEPT = {"Accept": ", ".join((OCI_MANIFEST, OCI_INDEX, DOCKER_MANIFEST, DOCKER_LIST))}
GREEDY = "127.0.0.2"  # Linux routes all of 127.0.0.0/8 to lo


def _client(mirror: MirrorProcess, address: str) -> httpx.Client:
    transport = httpx.HTTPTransport(local_address=address)
    return httpx.Client(base_url=mirror.url, transport=transport, headers=ACCEPT, timeout=30)


def _assert_too_many(r: httpx.Response) -> None:
    assert r.status_code == 429, r.text
    assert r.json()["errors"][0]["code"] == "TOOMANYREQUESTS"
    # Two a minute: a token every 30 s.
    assert 1 <= int(r.headers["retry-after"]) <= 30


def test_a_greedy_client_is_refused_while_another_pulls_an_image(
    real_upstream: RealUpstream, tmp_path: Path
) -> None:
    images = real_upstream.images
    registry = real_upstream.registry
    env = {
        "MIRROR_CLIENT_MANIFEST_REQUESTS_PER_MINUTE": "2",
        "MIRROR_CLIENT_MAX_COLD_FETCHES": "8",
    }
    with (
        MirrorProcess(tmp_path / "m", registry.url, env=env) as mirror,
        _client(mirror, GREEDY) as greedy,
    ):
        registry.clear_log()
        # Two misses spend the greedy client's two tokens...
        for image in (images["schema2"], images["index"]):
            r = greedy.get(f"/v2/{image.repo}/manifests/{image.tag}")
            assert (r.status_code, r.headers["x-cache"]) == (200, "MISS")
        # ...then every request that would go upstream is refused.
        _assert_too_many(greedy.get("/v2/library/small/manifests/greedy-0"))
        _assert_too_many(greedy.get("/v2/library/small/tags/list"))

        # skopeo pulls a whole image meanwhile, while the greedy client keeps asking.
        refused: list[int] = []
        done = threading.Event()

        def hammer() -> None:
            n = 1
            while not done.is_set():
                refused.append(greedy.get(f"/v2/multi/list/manifests/greedy-{n}").status_code)
                n += 1
                done.wait(0.05)  # pacing: a steady stream of requests, not a flood

        worker = threading.Thread(target=hammer)
        worker.start()
        try:
            oci = images["oci"]
            result = skopeo_copy(
                f"docker://{mirror.host}/{oci.repo}:{oci.tag}", f"oci:{tmp_path / 'pulled'}:x"
            )
        finally:
            done.set()
            worker.join()
        assert result.returncode == 0, result.stderr
        assert refused and set(refused) == {429}

        # The greedy client's cache hits go on: tags within their TTL, and the
        # content skopeo's pull just cached.
        for path in (
            f"/v2/{images['schema2'].repo}/manifests/{images['schema2'].tag}",
            f"/v2/{oci.repo}/manifests/{oci.digest}",
            f"/v2/{oci.repo}/blobs/{oci.layer_digests[0]}",
        ):
            hit = greedy.get(path)
            assert (hit.status_code, hit.headers["x-cache"]) == (200, "HIT"), path
        throttled = mirror.metric("mirror_client_throttled_total", kind="manifest")
        assert throttled == 2 + len(refused)

        # A request that goes upstream after all the refused ones: once it is in the
        # registry's log, anything the refused ones caused would be there too.
        marker = httpx.get(f"{mirror.url}/v2/library/small/manifests/marker", headers=ACCEPT)
        assert marker.status_code == 404
    registry.wait_for_request(lambda e: e.path.endswith("/manifests/marker"))
    logged = [e.path for e in registry.requests()]
    assert not [p for p in logged if "greedy-" in p or p.endswith("/tags/list")]
    assert [p for p in logged if f"/{oci.repo}/manifests/" in p]  # skopeo's pull went upstream
