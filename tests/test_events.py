"""Events to webhooks (mirror.events): the envelope, batching, filters, delivery through
failures, bounded queues, and pulls that never wait for an endpoint."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
from conftest import MirrorFactory, get_when_cached, until
from fakes.server import serve
from fakes.upstream import FakeUpstream, Fault
from fakes.webhook import Receiver, stalled
from harness.daemon import free_port

from mirror.config import NotificationSettings
from mirror.events import MEDIA_TYPE, Events, references
from mirror.loading import SettingsError, load_settings
from mirror.mediatypes import OCI_MANIFEST
from mirror.metrics import Metrics

DIGEST = "sha256:" + "ab" * 32


def endpoint(url: str, **overrides: Any) -> dict[str, Any]:
    return {"name": "hook", "url": url, "backoff": "20ms", "threshold": 1, **overrides}


def sample(metrics: Metrics, name: str, **labels: str) -> float:
    value = metrics.registry.get_sample_value(name, labels)
    return 0.0 if value is None else value


@asynccontextmanager
async def running(
    receiver: Receiver | None = None, *, url: str | None = None, **config: Any
) -> AsyncIterator[tuple[Events, Metrics]]:
    """Events with one endpoint: the receiver (served here), or `url`."""
    metrics = Metrics()

    @asynccontextmanager
    async def target() -> AsyncIterator[str]:
        if receiver is None:
            assert url is not None
            yield url
        else:
            async with serve(receiver, lifespan="off") as base:
                yield f"{base}/events"

    async with target() as where:
        settings = NotificationSettings.model_validate(
            {"endpoints": [endpoint(where, **config.pop("endpoint", {}))], **config}
        )
        events = Events(settings, metrics, listen="0.0.0.0:5000", flush_timeout=0.5)
        events.start()
        try:
            yield events, metrics
        finally:
            await events.aclose()


def pull(events: Events, n: int = 0, **overrides: Any) -> None:
    fields: dict[str, Any] = {
        "upstream": "docker.io",
        "repository": "library/alpine",
        "digest": DIGEST,
        "media_type": OCI_MANIFEST,
        "size": 100 + n,
        "cache": "hit",
        "tag": "3.19",
        **overrides,
    }
    events.pull("manifest", **fields)


async def test_the_envelope_is_distributions_with_our_headers() -> None:
    receiver = Receiver()
    hook = {"headers": {"Authorization": ["Bearer s3cret"], "X-Two": ["a", "b"]}}
    async with running(receiver, endpoint=hook) as (events, metrics):
        pull(events)
        await until(lambda: bool(receiver.deliveries), "a delivery")
    delivery = receiver.deliveries[0]
    assert delivery.path == "/events"
    assert delivery.headers["content-type"] == [MEDIA_TYPE]
    assert delivery.headers["authorization"] == ["Bearer s3cret"]
    assert delivery.headers["x-two"] == ["a", "b"]
    [event] = delivery.events
    assert set(event) == {
        "id",
        "timestamp",
        "action",
        "target",
        "request",
        "actor",
        "source",
        "mirror",
    }
    assert event["action"] == "pull"
    assert event["timestamp"].endswith("Z")
    assert event["target"] == {
        "mediaType": OCI_MANIFEST,
        "digest": DIGEST,
        "size": 100,
        "length": 100,
        "repository": "library/alpine",
        "tag": "3.19",
    }
    assert event["mirror"] == {"upstream": "docker.io", "kind": "manifest", "cache": "hit"}
    assert event["source"]["addr"].endswith(":5000") and event["source"]["instanceID"]
    assert (event["request"], event["actor"]) == ({}, {})  # not from a request
    assert sample(metrics, "mirror_events_total", endpoint="hook", result="delivered") == 1


async def test_events_queued_while_a_post_is_in_flight_go_in_one_envelope() -> None:
    gate = asyncio.Event()
    receiver = Receiver(gate=gate)
    async with running(receiver) as (events, metrics):
        pull(events, 0)
        await until(lambda: receiver.attempts == 1, "the first POST")
        for n in range(1, 6):
            pull(events, n)
        assert sample(metrics, "mirror_events_queued", endpoint="hook") == 6
        gate.set()
        await until(lambda: len(receiver.events) == 6, "all events")
        assert sample(metrics, "mirror_events_queued", endpoint="hook") == 0
    assert [len(d.events) for d in receiver.deliveries] == [1, 5]
    assert [e["target"]["size"] for e in receiver.events] == [100, 101, 102, 103, 104, 105]
    assert len({e["id"] for e in receiver.events}) == 6


async def test_ignored_actions_and_media_types_are_not_sent() -> None:
    receiver = Receiver()
    hook = {"ignoredmediatypes": ["application/x-old"], "ignore": {"actions": ["evict"]}}
    async with running(receiver, endpoint=hook) as (events, _):
        pull(events, media_type="application/x-old")
        events.evicted("blob", [(DIGEST, 5)], "ttl")
        events.fill(
            "blob",
            upstream="docker.io",
            repository="library/alpine",
            digest=DIGEST,
            media_type=None,
            size=5,
        )
        await until(lambda: bool(receiver.events), "the fill")
        await asyncio.sleep(0.1)  # what was ignored would have come by now
    assert [e["action"] for e in receiver.events] == ["fill"]
    assert receiver.events[0]["target"]["mediaType"] == "application/octet-stream"


async def test_a_receiver_that_fails_then_recovers_gets_the_events() -> None:
    receiver = Receiver(statuses=[500, 503, 404])
    async with running(receiver, endpoint={"threshold": 2}) as (events, metrics):
        for n in range(3):
            pull(events, n)
        await until(lambda: len(receiver.events) == 3, "the retried events")
    assert receiver.attempts >= 4
    assert sample(metrics, "mirror_event_posts_total", endpoint="hook", result="error") == 3
    assert sample(metrics, "mirror_events_total", endpoint="hook", result="delivered") == 3
    assert sample(metrics, "mirror_events_total", endpoint="hook", result="dropped") == 0


async def test_a_full_queue_drops_the_newest_and_counts_them() -> None:
    dead = f"http://127.0.0.1:{free_port()}/events"  # nothing listens there
    async with running(url=dead, endpoint={"queue": 2, "backoff": "1h"}) as (events, metrics):
        for n in range(5):
            pull(events, n)
        assert sample(metrics, "mirror_events_total", endpoint="hook", result="dropped") == 3
        assert sample(metrics, "mirror_events_queued", endpoint="hook") == 2
        await until(
            lambda: (
                sample(metrics, "mirror_event_posts_total", endpoint="hook", result="error") > 0
            ),
            "a failed POST",
        )
        started = time.monotonic()
    # The stop waited at most its flush timeout (not the hour of back-off), and the
    # two events still queued count as dropped.
    assert time.monotonic() - started < 2
    assert sample(metrics, "mirror_events_total", endpoint="hook", result="dropped") == 5
    assert sample(metrics, "mirror_events_queued", endpoint="hook") == 0


async def test_events_from_another_thread_are_delivered() -> None:
    receiver = Receiver()
    async with running(receiver) as (events, _):
        # As an eviction round does, from its worker thread.
        thread = threading.Thread(
            target=events.evicted, args=("blob", [(DIGEST, 7), ("sha256:" + "cd" * 32, 9)], "size")
        )
        thread.start()
        thread.join()
        await until(lambda: len(receiver.events) == 2, "the evictions")
    assert [(e["action"], e["target"]["size"]) for e in receiver.events] == [
        ("evict", 7),
        ("evict", 9),
    ]
    assert receiver.events[0]["mirror"] == {"kind": "blob", "reason": "size"}


async def test_include_references_lists_a_manifests_descriptors() -> None:
    receiver = Receiver()
    body = (
        b'{"schemaVersion":2,"config":{"mediaType":"c","digest":"sha256:1","size":3},'
        b'"layers":[{"mediaType":"l","digest":"sha256:2","size":4}]}'
    )
    async with running(receiver, events={"includereferences": True}) as (events, _):
        events.pull(
            "manifest",
            upstream="docker.io",
            repository="r",
            digest=DIGEST,
            media_type=OCI_MANIFEST,
            size=len(body),
            cache="miss",
            manifest=body,
        )
        await until(lambda: bool(receiver.events), "the pull")
    assert receiver.events[0]["target"]["references"] == [
        {"mediaType": "c", "digest": "sha256:1", "size": 3},
        {"mediaType": "l", "digest": "sha256:2", "size": 4},
    ]
    assert references(b"not json") == []


async def test_no_endpoints_means_nothing_happens() -> None:
    events = Events()
    events.start()
    assert not events.enabled
    pull(events)  # returns at once, sends nothing
    await events.aclose()


# -- through the mirror ------------------------------------------------------------------


def hook_settings(url: str, **overrides: Any) -> dict[str, Any]:
    return {"endpoints": [endpoint(url, **overrides)]}


async def test_pulls_through_the_mirror_report_miss_then_hit_and_fills(
    fake: tuple[FakeUpstream, str], mirror: MirrorFactory
) -> None:
    upstream, url = fake
    layer = upstream.add_blob(b"layer bytes" * 100)
    manifest = {
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "config": {"mediaType": "application/json", "digest": layer, "size": 1100},
        "layers": [],
    }
    digest = upstream.add_manifest(OCI_MANIFEST, manifest, tag="1.0")
    receiver = Receiver()
    async with (
        serve(receiver, lifespan="off") as hook,
        mirror(url, notifications=hook_settings(f"{hook}/events")) as m,
        httpx.AsyncClient(base_url=m.url, headers={"User-Agent": "test-agent/1"}) as client,
    ):
        accept = {"Accept": OCI_MANIFEST}
        for _ in range(2):
            r = await client.get("/v2/team/app/manifests/1.0", headers=accept)
            assert r.status_code == 200
        assert (await client.get(f"/v2/team/app/blobs/{layer}")).headers["x-cache"] == "MISS"
        await get_when_cached(client, f"/v2/team/app/blobs/{layer}")
        assert (await client.head(f"/v2/team/app/blobs/{layer}")).status_code == 200
        await until(lambda: sum(e["action"] == "fill" for e in receiver.events) == 2, "both fills")
        await until(lambda: len(receiver.events) >= 6, "the events")
    pulls = [e for e in receiver.events if e["action"] == "pull"]
    fills = [e for e in receiver.events if e["action"] == "fill"]
    assert [(e["target"]["digest"], e["mirror"]["cache"]) for e in pulls[:3]] == [
        (digest, "miss"),
        (digest, "hit"),
        (layer, "miss"),
    ]
    assert {e["mirror"]["cache"] for e in pulls[3:]} == {"hit"}  # never a HEAD's event
    first = pulls[0]
    assert first["target"]["repository"] == "team/app"
    assert first["target"]["tag"] == "1.0"
    assert first["target"]["url"] == f"{m.url}/v2/team/app/manifests/{digest}"
    assert first["request"]["useragent"] == "test-agent/1"
    assert first["request"]["method"] == "GET"
    assert first["request"]["addr"].startswith("127.0.0.1:")
    assert first["request"]["id"]
    assert sorted(e["target"]["digest"] for e in fills) == sorted([digest, layer])
    blob_fill = next(e for e in fills if e["target"]["digest"] == layer)
    assert blob_fill["target"]["size"] == 1100
    # The download ran for the request that missed: its fill names that request.
    assert blob_fill["request"]["id"] == pulls[2]["request"]["id"]


async def test_mismatches_and_upstream_failures_are_reported(
    fake: tuple[FakeUpstream, str], mirror: MirrorFactory
) -> None:
    upstream, url = fake
    bad = upstream.add_blob(b"the right bytes" * 10)
    upstream.faults[bad] = Fault(wrong_bytes=True)
    gone = upstream.add_blob(b"unreachable" * 10)
    upstream.faults[gone] = Fault(status=503)
    receiver = Receiver()
    async with (
        serve(receiver, lifespan="off") as hook,
        mirror(url, notifications=hook_settings(f"{hook}/events")) as m,
        httpx.AsyncClient(base_url=m.url) as client,
    ):
        with pytest.raises(httpx.HTTPError):
            await client.get(f"/v2/team/app/blobs/{bad}")
        assert (await client.get(f"/v2/team/app/blobs/{gone}")).status_code >= 500
        await until(
            lambda: {"mismatch", "upstream_failure"} <= {e["action"] for e in receiver.events},
            "both events",
        )
    mismatch = next(e for e in receiver.events if e["action"] == "mismatch")
    assert mismatch["target"] == {
        "mediaType": "application/octet-stream",
        "digest": bad,
        "repository": "team/app",
    }
    assert mismatch["mirror"]["actual"] != bad
    failure = next(e for e in receiver.events if e["action"] == "upstream_failure")
    assert failure["target"] == {"repository": "team/app", "digest": gone}
    assert failure["mirror"]["upstream_status"] == 503


async def test_a_stalled_receiver_never_slows_a_pull(
    fake: tuple[FakeUpstream, str], mirror: MirrorFactory
) -> None:
    upstream, url = fake
    digest = upstream.add_manifest(OCI_MANIFEST, {"schemaVersion": 2, "layers": []}, tag="1")
    async with stalled() as hook:
        settings = hook_settings(hook, timeout="30s", threshold=10)
        async with mirror(url, notifications=settings) as m:
            async with httpx.AsyncClient(base_url=m.url) as client:
                await client.get(f"/v2/a/manifests/{digest}", headers={"Accept": OCI_MANIFEST})
                for _ in range(20):
                    started = time.monotonic()
                    r = await client.get(
                        f"/v2/a/manifests/{digest}", headers={"Accept": OCI_MANIFEST}
                    )
                    assert r.status_code == 200
                    assert time.monotonic() - started < 0.5
            # 21 pulls and the manifest's fill, all waiting.
            assert m.metric("mirror_events_queued", endpoint="hook") == 22
            stopping = time.monotonic()
        # The stop gave the stalled endpoint its bounded flush, not its 30 s timeout.
        assert time.monotonic() - stopping < 10
    assert m.metric("mirror_events_total", endpoint="hook", result="dropped") == 22
    assert m.metric("mirror_events_total", endpoint="hook", result="delivered") == 0


# -- settings -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("notifications", "told"),
    [
        pytest.param(
            '{"endpoints": [{"name": "a", "url": "http://h/x", "timout": "1s"}]}',
            "unknown setting notifications.endpoints[0].timout (MIRROR_NOTIFICATIONS) "
            "(did you mean timeout?)",
            id="typo",
        ),
        pytest.param(
            '{"endpoints": [{"name": "a", "url": "http://h/x", "ignore": {"actions": ["pul"]}}]}',
            "setting notifications.endpoints[0].ignore.actions (MIRROR_NOTIFICATIONS): "
            "unknown action 'pul' (known: pull, fill, evict, mismatch, upstream_failure, delete)",
            id="unknown action",
        ),
        pytest.param(
            '{"endpoints": [{"name": "a", "url": "http://h/x", "timeout": "soon"}]}',
            "setting notifications.endpoints[0].timeout (MIRROR_NOTIFICATIONS): "
            "invalid duration 'soon'",
            id="bad duration",
        ),
        pytest.param(
            '{"endpoints": [{"name": "a", "url": "http://u:TOPSECRET@h/x"}]}',
            "setting notifications.endpoints[0].url (MIRROR_NOTIFICATIONS): an endpoint url "
            "is http(s)://host[:port]/path, without credentials",
            id="credentials in the URL",
        ),
        pytest.param(
            '{"endpoints": [{"name": "a", "url": "http://h/x"}, {"name": "a", "url": "http://h/y"}]}',
            "names must be unique",
            id="duplicate names",
        ),
        pytest.param(
            '{"endpoints": [{"name": "a", "url": "http://h/x", "queue": 0,'
            ' "headers": {"Authorization": "Bearer TOPSECRET"}}]}',
            "setting notifications.endpoints[0].queue (MIRROR_NOTIFICATIONS): ",
            id="bad queue, secret header",
        ),
    ],
)
def test_settings_mistakes_are_one_clear_line(
    notifications: str,
    told: str,
    monkeypatch: pytest.MonkeyPatch,
    no_mirror_env: None,
    tmp_path: Path,
) -> None:
    monkeypatch.setenv("MIRROR_NOTIFICATIONS", notifications)
    with pytest.raises(SettingsError) as caught:
        load_settings(cache_dir=tmp_path)
    message = str(caught.value)
    assert told in message
    assert "\n" not in message
    assert "TOPSECRET" not in message


def test_settings_take_distributions_names(no_mirror_env: None, tmp_path: Path) -> None:
    config = tmp_path / "mirror.yaml"
    config.write_text(
        "notifications:\n"
        "  events:\n"
        "    includereferences: true\n"
        "  endpoints:\n"
        "    - name: alistener\n"
        "      url: https://listener.example/event\n"
        "      headers:\n"
        "        Authorization: [Bearer TOPSECRET]\n"
        "      timeout: 500ms\n"
        "      threshold: 5\n"
        "      backoff: 1s\n"
        "      ignoredmediatypes: [application/octet-stream]\n"
        "      ignore:\n"
        "        mediatypes: [application/x-a]\n"
        "        actions: [pull]\n"
        "      queue: 10\n"
        "    - name: spare\n"
        "      url: http://127.0.0.1:1/\n"
        "      disabled: true\n"
    )
    settings = load_settings(config, cache_dir=tmp_path / "c").notifications
    hook = settings.endpoints[0]
    assert (hook.timeout, hook.threshold, hook.backoff, hook.queue) == (0.5, 5, 1.0, 10)
    assert hook.ignores("pull", None) and hook.ignores("fill", "application/x-a")
    assert hook.ignores("fill", "application/octet-stream") and not hook.ignores("fill", None)
    assert settings.events.includereferences and settings.endpoints[1].disabled
    assert "TOPSECRET" not in repr(settings)
    assert Events(settings).enabled  # the disabled endpoint aside, one is on
