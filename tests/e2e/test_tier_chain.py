"""Mirror tiers end to end: an edge `mirror serve` chained to a central one in front of
the real Distribution registry (token auth), all real processes."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import ClassVar
from urllib.parse import parse_qs, urlsplit

import httpx
import pytest
from conftest import RealUpstream, SecondUpstream
from harness import TestImage
from harness.daemon import free_port
from harness.images import Layout, push
from harness.mirror import MirrorProcess, skopeo_copy

pytestmark = pytest.mark.e2e


def _upstreams(registry: str, *mirrors: dict[str, str], name: str = "docker.io") -> str:
    return json.dumps([{"name": name, "url": registry, "mirrors": list(mirrors)}])


def _central(tmp_path: Path, real_upstream: RealUpstream, port: int | None = None) -> MirrorProcess:
    upstreams = json.dumps([{"name": "docker.io", "url": real_upstream.registry.url}])
    return MirrorProcess(
        tmp_path / "central",
        None,
        env={"MIRROR_UPSTREAMS": upstreams, "MIRROR_LOG_FORMAT": "json"},
        port=port,
    )


def _edge(tmp_path: Path, name: str, upstreams: str, **env: str) -> MirrorProcess:
    return MirrorProcess(
        tmp_path / name,
        None,
        env={"MIRROR_UPSTREAMS": upstreams, "MIRROR_LOG_FORMAT": "json", **env},
    )


def _pull(mirror: MirrorProcess, image: TestImage, dest: Path) -> None:
    result = skopeo_copy(f"docker://{mirror.host}/{image.reference}", f"dir:{dest}")
    assert result.returncode == 0, f"{result.stderr}\n{mirror.log_tail()}"
    assert (dest / "manifest.json").read_bytes() == image.manifest


def _tiers_in_access_log(mirror: MirrorProcess) -> list[str | None]:
    tiers = []
    for line in mirror.log().splitlines():
        try:
            entry = json.loads(line)
        except ValueError:
            continue
        path = entry.get("path", "")
        if entry.get("logger") == "mirror.access" and path.startswith("/v2/") and path != "/v2/":
            tiers.append(entry.get("tier"))
    return tiers


def _blob_gets(real_upstream: RealUpstream, digests: list[str]) -> dict[str, int]:
    return {
        d: sum(
            1
            for r in real_upstream.registry.requests()
            if r.method == "GET" and r.path.endswith(f"/blobs/{d}") and r.status == 200
        )
        for d in digests
    }


def test_a_chained_pull_goes_edge_to_central_to_the_registry(
    real_upstream: RealUpstream, tmp_path: Path
) -> None:
    image = real_upstream.images["oci"]
    registry = real_upstream.registry
    with _central(tmp_path, real_upstream) as central:
        tier = {"name": "central", "url": central.url}
        upstreams = _upstreams(registry.url, tier)
        registry.clear_log()
        with _edge(tmp_path, "edge1", upstreams) as e1, _edge(tmp_path, "edge2", upstreams) as e2:
            _pull(e1, image, tmp_path / "a")
            _pull(e2, image, tmp_path / "b")
            # The registry saw the central tier only, once per blob.
            assert _blob_gets(real_upstream, image.layer_digests) == {
                d: 1 for d in image.layer_digests
            }
            tiers = _tiers_in_access_log(e1)
            assert tiers and set(tiers) == {"central"}, tiers
            assert e1.metric("mirror_tier_requests_total", upstream="docker.io", tier="central",
                             result="ok") > 0  # fmt: skip
            assert e1.metric("mirror_tier_bytes_total", upstream="docker.io", tier="central") > 0
            assert e1.metric("mirror_tier_state", upstream="docker.io", tier="central") == 0


def test_with_central_down_the_edge_falls_back_skips_it_and_returns_when_it_is_back(
    real_upstream: RealUpstream, tmp_path: Path
) -> None:
    first, second = real_upstream.images["oci"], real_upstream.images["schema2"]
    port = free_port()
    central = _central(tmp_path, real_upstream, port)
    tier = {"name": "central", "url": central.url}
    with _edge(
        tmp_path, "edge", _upstreams(real_upstream.registry.url, tier), MIRROR_TIER_BACKOFF="2"
    ) as edge:
        _pull(edge, first, tmp_path / "a")  # central never started: the registry answers
        assert edge.metric("mirror_tier_state", upstream="docker.io", tier="central") == 1
        # The circuit is open: later requests skip central instead of trying it.
        assert (
            edge.metric("mirror_tier_requests_total", upstream="docker.io", tier="central",
                        result="skipped") > 0
        )  # fmt: skip
        errors = edge.metric(
            "mirror_tier_requests_total", upstream="docker.io", tier="central", result="error"
        )
        assert errors <= 2, errors  # the first failure (and at most one trial) opened it
        assert set(_tiers_in_access_log(edge)) <= {"docker.io", None}
        assert edge.log().count("mirror tier central of docker.io failed") == 1
        with central:
            # Back: after the back-off, one trial request closes the circuit again.
            time.sleep(2.2)
            _pull(edge, second, tmp_path / "b")
            assert edge.metric("mirror_tier_state", upstream="docker.io", tier="central") == 0
            assert "central" in _tiers_in_access_log(edge)
            assert any(
                json.loads(line).get("path", "").startswith(f"/v2/{second.repo}/")
                for line in central.log().splitlines()
                if line.startswith("{") and '"mirror.access"' in line
            )


def test_with_the_registry_down_a_warm_central_serves_everything(
    real_upstream: RealUpstream, tmp_path: Path
) -> None:
    image = real_upstream.images["schema2"]
    with _central(tmp_path, real_upstream) as central:
        tier = {"name": "central", "url": central.url}
        upstreams = _upstreams(real_upstream.registry.url, tier)
        with _edge(tmp_path, "warmer", upstreams) as warmer:
            _pull(warmer, image, tmp_path / "a")
        real_upstream.registry.stop()
        try:
            with _edge(tmp_path, "fresh", upstreams) as fresh:
                # What central lacks fails (its registry is down: a 502 from it, then
                # the registry itself), and central stays in use for what it holds.
                missing = real_upstream.images["oci"]
                failed = skopeo_copy(
                    f"docker://{fresh.host}/{missing.reference}", f"dir:{tmp_path / 'x'}"
                )
                assert failed.returncode != 0
                assert fresh.metric("mirror_tier_state", upstream="docker.io", tier="central") == 0
                _pull(fresh, image, tmp_path / "b")
                assert set(_tiers_in_access_log(fresh)) >= {"central"}
        finally:
            real_upstream.registry.start()


class _RecordingTier(BaseHTTPRequestHandler):
    """A tier that records what it was sent and answers 503."""

    seen: ClassVar[list[tuple[str, dict[str, str]]]] = []

    def _answer(self) -> None:
        self.seen.append((self.path, dict(self.headers.items())))
        self.send_response(503)
        self.send_header("Content-Length", "0")
        self.end_headers()

    do_GET = do_HEAD = _answer

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def recording_tier() -> Iterator[str]:
    _RecordingTier.seen = []
    server = ThreadingHTTPServer(("127.0.0.1", 0), _RecordingTier)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def test_a_credentialed_upstream_never_sends_its_credentials_to_a_tier(
    second_upstream: SecondUpstream, recording_tier: str, tmp_path: Path
) -> None:
    image = second_upstream.own
    user, password = SecondUpstream.CREDS
    upstreams = json.dumps(
        [
            {
                "name": SecondUpstream.NAME,
                "url": second_upstream.registry.url,
                "username": user,
                "password": password,
                "mirrors": [{"name": "tier", "url": recording_tier}],
            }
        ]
    )
    with _edge(tmp_path, "edge", upstreams, MIRROR_DEFAULT_UPSTREAM=SecondUpstream.NAME) as edge:
        _pull(edge, image, tmp_path / "a")  # from the registry, after the tier's 503
    assert _RecordingTier.seen, "the tier was never asked"
    for path, headers in _RecordingTier.seen:
        assert parse_qs(urlsplit(path).query)["ns"] == [SecondUpstream.NAME], path
        assert "Authorization" not in headers and "authorization" not in headers, headers
        assert password not in json.dumps(headers)


def test_an_edge_sees_a_moved_tag_within_its_own_ttl_whatever_the_central_ttl(
    real_upstream: RealUpstream, tmp_path: Path
) -> None:
    """The edge asks central for a tag no older than the edge's TTL (Cache-Control:
    max-age), and counts its TTL from central's Age: the TTLs do not add up."""
    layout = Layout(tmp_path / "layout")
    first = layout.image([[("v", b"first\n")]])
    second = layout.image([[("v", b"second\n")]])
    layout.tag(first, "first")
    layout.tag(second, "second")
    registry = real_upstream.registry
    repo, tag = "moving/app", "latest"
    old = push(layout.root, "first", registry, repo, tag)
    path = f"/v2/{repo}/manifests/{tag}"
    accept = {"Accept": "application/vnd.oci.image.manifest.v1+json"}
    central = _central(tmp_path, real_upstream)
    central.env["MIRROR_TAG_TTL"] = "1h"  # a long TTL at central
    with central:
        tier = {"name": "central", "url": central.url}
        with (
            _edge(tmp_path, "edge", _upstreams(registry.url, tier), MIRROR_TAG_TTL="2") as edge,
            httpx.Client(timeout=30) as c,
        ):
            r = c.get(edge.url + path, headers=accept)
            assert r.headers["docker-content-digest"] == old
            at_central = c.get(central.url + path + "?ns=docker.io", headers=accept)
            assert int(at_central.headers["age"]) <= 1  # central just fetched it
            new = push(layout.root, "second", registry, repo, tag)  # the tag moves
            assert new != old
            time.sleep(2.2)  # the edge's TTL passes; central's (1 h) does not
            r = c.get(edge.url + path, headers=accept)
            assert r.headers["docker-content-digest"] == new
            assert r.headers["x-cache"] in ("MISS", "REVALIDATED")
            # Central revalidated because the edge asked for max-age=2: its own answer
            # to a plain client is now the new digest too.
            plain = c.get(central.url + path + "?ns=docker.io", headers=accept)
            assert plain.headers["docker-content-digest"] == new
