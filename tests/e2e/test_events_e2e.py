"""Events to a real webhook receiver process, from a real mirror process pulling from
the real registry: pulls (miss, then hit) and fills arrive; events made while the
receiver is down arrive once it is back; a tiny queue drops, and counts, the rest."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import httpx
import pytest
from conftest import RealUpstream
from harness.daemon import wait_for
from harness.mirror import MirrorProcess, skopeo_copy
from harness.receiver import WebhookReceiver

from mirror.events import MEDIA_TYPE

pytestmark = pytest.mark.e2e


def blobs_of(manifest: bytes) -> list[str]:
    document = json.loads(manifest)
    return [document["config"]["digest"], *(layer["digest"] for layer in document["layers"])]


def of(events: list[dict[str, Any]], action: str) -> list[dict[str, Any]]:
    return [e for e in events if e["action"] == action]


def pulled(events: list[dict[str, Any]], cache: str) -> set[str]:
    return {e["target"]["digest"] for e in of(events, "pull") if e["mirror"]["cache"] == cache}


def test_events_reach_a_receiver_through_its_outage(
    real_upstream: RealUpstream, tmp_path: Path
) -> None:
    first, second = real_upstream.images["oci"], real_upstream.images["schema2"]
    receiver = WebhookReceiver(tmp_path / "receiver")
    common = {"timeout": "2s", "threshold": 2, "backoff": "200ms"}
    notifications = {
        "endpoints": [
            {"name": "main", "url": f"{receiver.url}/main", **common},
            # Pulls only (they are reported before the response), in a queue of two.
            {
                "name": "tiny",
                "url": f"{receiver.url}/tiny",
                "queue": 2,
                "ignore": {"actions": ["fill", "evict"]},
                **common,
            },
        ]
    }
    env = {"MIRROR_NOTIFICATIONS": json.dumps(notifications)}
    with (
        receiver,
        MirrorProcess(tmp_path / "mirror", real_upstream.registry.url, env=env) as mirror,
    ):

        def queues_empty() -> bool:
            return all(
                mirror.metric("mirror_events_queued", endpoint=name) == 0
                for name in ("main", "tiny")
            )

        # A cold pull, then a warm one.
        source = f"docker://{mirror.host}/{first.repo}:{first.tag}"
        for n in (1, 2):
            result = skopeo_copy(source, f"oci:{tmp_path / f'pull{n}'}:{first.tag}")
            assert result.returncode == 0, result.stderr
        blobs = blobs_of(first.manifest)
        wait_for(
            lambda: (
                {first.digest, *blobs} <= pulled(receiver.events("/main"), "hit")
                and len(of(receiver.events("/main"), "fill")) == 1 + len(blobs)
            ),
            "the pulls' events",
        )
        events = receiver.events("/main")
        assert pulled(events, "miss") == {first.digest, *blobs}
        manifest_pull = next(e for e in of(events, "pull") if e["target"]["digest"] == first.digest)
        assert manifest_pull["target"]["repository"] == first.repo
        assert manifest_pull["target"]["tag"] == first.tag
        assert manifest_pull["target"]["mediaType"] == first.media_type
        assert manifest_pull["request"]["method"] == "GET"
        assert manifest_pull["request"]["useragent"]
        fills = {e["target"]["digest"]: e for e in of(events, "fill")}
        assert set(fills) == {first.digest, *blobs}
        assert fills[first.digest]["target"]["tag"] == first.tag
        headers = receiver.deliveries()[0]["headers"]
        assert headers["content-type"] == [MEDIA_TYPE]
        wait_for(queues_empty, "the queues to empty")

        # The receiver goes away; a cold pull of another image happens meanwhile.
        dropped = mirror.metric("mirror_events_total", endpoint="tiny", result="dropped")
        received = len(receiver.deliveries())
        receiver.stop()
        result = skopeo_copy(
            f"docker://{mirror.host}/{second.repo}:{second.tag}", f"oci:{tmp_path / 'pull3'}:x"
        )
        assert result.returncode == 0, result.stderr
        cached = f"{mirror.url}/v2/{first.repo}/manifests/{first.digest}"
        for _ in range(5):
            r = httpx.get(cached, headers={"Accept": first.media_type})
            assert (r.status_code, r.headers["x-cache"]) == (200, "HIT")
        wait_for(
            lambda: mirror.metric("mirror_event_posts_total", endpoint="main", result="error") > 0,
            "a failed delivery",
        )
        receiver.start()
        wait_for(queues_empty, "the queues to empty after the outage")

        later = receiver.deliveries()[received:]
        main = [e for d in later if d["path"] == "/main" for e in d["body"]["events"]]
        tiny = [e for d in later if d["path"] == "/tiny" for e in d["body"]["events"]]
        # Everything made during the outage, retried until the receiver was back.
        assert pulled(main, "miss") == {second.digest, *blobs_of(second.manifest)}
        assert second.digest in {e["target"]["digest"] for e in of(main, "fill")}
        outage_pulls = of(main, "pull")
        # The tiny queue kept the first two and dropped (and counted) the rest.
        assert [e["id"] for e in tiny] == [e["id"] for e in outage_pulls[:2]]
        now = mirror.metric("mirror_events_total", endpoint="tiny", result="dropped")
        assert now - dropped == len(outage_pulls) - 2
        assert len(outage_pulls) >= 8  # the cold pull's manifest and blobs, and 5 GETs

        # After all that, a pull is still reported at once.
        r = httpx.get(
            f"{mirror.url}/v2/{second.repo}/manifests/{second.digest}",
            headers={"Accept": second.media_type},
        )
        assert (r.status_code, r.headers["x-cache"]) == (200, "HIT")
        wait_for(
            lambda: (
                len(of(receiver.events("/main"), "pull"))
                > len(of(events, "pull")) + len(outage_pulls)
            ),
            "the last pull's event",
        )
