"""Metric values a dashboard relies on, read from each app's private registry."""

from __future__ import annotations

import asyncio
import math
import os
from pathlib import Path

import httpx
import pytest
from conftest import MirrorFactory, get_when_cached, until
from fakes.upstream import FakeUpstream, Fault

from mirror.metrics import Metrics

OCI = "application/vnd.oci.image.manifest.v1+json"


async def test_upstream_token_bytes_and_in_flight_downloads(mirror: MirrorFactory) -> None:
    from fakes.server import serve

    upstream = FakeUpstream(token="t")
    async with serve(upstream) as url:
        upstream.realm = f"{url}/token"
        name = url.removeprefix("http://")
        data = os.urandom(2 << 20)
        digest = upstream.add_blob(data)
        upstream.faults[digest] = Fault(chunk=256 * 1024, delay=0.05)
        async with mirror(url) as m, httpx.AsyncClient(base_url=m.url, timeout=30) as c:
            assert m.metric("mirror_downloads_in_flight") == 0
            pull = asyncio.create_task(c.get(f"/v2/a/blobs/{digest}"))
            await until(lambda: m.metric("mirror_downloads_in_flight") == 1, "the download")
            assert (await pull).content == data
            await get_when_cached(c, f"/v2/a/blobs/{digest}")
            assert m.metric("mirror_downloads_in_flight") == 0
            assert m.metric("mirror_upstream_bytes_total", upstream=name) == len(data)
            assert m.metric("mirror_upstream_token_fetches_total", upstream=name, result="ok") == 1
            assert (
                m.metric("mirror_upstream_requests_total", upstream=name, kind="blob", status="200")
                == 1
            )
            # The first, token-less request met a challenge.
            assert (
                m.metric("mirror_upstream_requests_total", upstream=name, kind="blob", status="401")
                == 1
            )


async def test_cache_size_entries_and_limit_are_read_at_scrape_time(
    fake: tuple[FakeUpstream, str], mirror: MirrorFactory
) -> None:
    upstream, url = fake
    data = os.urandom(300_000)
    digest = upstream.add_blob(data)
    upstream.add_manifest(OCI, {"schemaVersion": 2, "mediaType": OCI}, tag="1")
    # A cap below the blob: it stays cached until the next eviction round.
    async with mirror(url, max_size="100kB") as m, httpx.AsyncClient(base_url=m.url) as c:
        assert m.metric("mirror_cache_size_bytes") == 0
        assert m.metric("mirror_cache_limit_bytes") == 100_000
        await get_when_cached(c, f"/v2/a/blobs/{digest}")
        assert (await c.get("/v2/a/manifests/1")).status_code == 200
        assert m.metric("mirror_cache_size_bytes") == len(data)
        assert m.metric("mirror_cache_entries", kind="blob") == 1
        assert m.metric("mirror_cache_entries", kind="manifest") == 1
        assert m.metric("mirror_cache_entries", kind="tag") == 1
        assert m.metric("mirror_cache_filesystem_size_bytes") > 0
        assert (
            0
            < m.metric("mirror_cache_filesystem_avail_bytes")
            <= m.metric("mirror_cache_filesystem_size_bytes")
        )
        # An eviction round frees it, and the gauges follow.
        await m.app.state.components.evictor.run_once()
        assert m.metric("mirror_cache_size_bytes") == 0
        assert m.metric("mirror_cache_entries", kind="blob") == 0


async def test_rate_limit_gauges_are_unknown_until_the_upstream_says(
    fake: tuple[FakeUpstream, str], mirror: MirrorFactory
) -> None:
    upstream, url = fake
    name = url.removeprefix("http://")
    upstream.add_manifest(OCI, {"schemaVersion": 2, "mediaType": OCI}, tag="1")
    async with mirror(url) as m, httpx.AsyncClient(base_url=m.url) as c:
        # NaN, not 0: zero would read as "exhausted" and page someone.
        assert math.isnan(
            m.registry.get_sample_value("mirror_upstream_ratelimit_remaining", {"upstream": name})
            or 0.0
        )
        upstream.rate_limit = ("100;w=21600", "99;w=21600")
        await c.get("/v2/a/manifests/1")
        assert m.metric("mirror_upstream_ratelimit_remaining", upstream=name) == 99


async def test_no_limit_is_nan(fake: tuple[FakeUpstream, str], mirror: MirrorFactory) -> None:
    _, url = fake
    async with mirror(url, max_size="none") as m:
        value = m.registry.get_sample_value("mirror_cache_limit_bytes", {})
        assert value is not None and math.isnan(value)


def test_no_created_series_are_exported() -> None:
    from mirror.metrics import Metrics

    assert b"_created" not in Metrics().render()


def test_multiprocess_metrics_refuse_values_kept_in_memory(tmp_path: Path) -> None:
    # prometheus_client chose its in-memory values at import (no PROMETHEUS_MULTIPROC_DIR
    # in the tests' environment): /metrics would show one worker's share, so refuse.
    with pytest.raises(RuntimeError, match="PROMETHEUS_MULTIPROC_DIR"):
        Metrics(multiprocess_dir=tmp_path)
