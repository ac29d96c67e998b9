"""What stale-while-revalidate saves clients, what the rate-limit reserve saves misses,
and what refresh-ahead's pull counting costs a hit.

    .venv/bin/python bench/freshness.py [--tags 200] [--rtt 0.1]

The in-process fake upstream, whose manifest answers take `--rtt` seconds (Docker Hub
from a far region: ~100 ms), behind:

1. latency: a real `mirror serve` process (TTL 5 s). N tags cached, then requested
   once each, sequentially: within the TTL (a HIT, the reference), past it with
   `stale_while_revalidate` 0 (the client waits for the HEAD), and past it within a
   1 h window (UPDATING). p50 and p99, and p50 as a ratio to the HIT's.
2. pulls (an in-process mirror with an injected clock): a Docker-Hub-like quota of
   100 pulls, no reset. Each round the tags expire, a fifth of them move upstream,
   every tag is pulled, and 3 new images are pulled (misses). Rounds run until a miss
   is refused; reported: misses served, and pulls spent on moved tags, with
   `ratelimit_reserve` 0 and 20%.
3. hit cost: CPU seconds of the `mirror serve` process per 1,000 tag hits with
   `refresh_ahead_pulls` 0 (off) and 5 (every hit counted), as a ratio.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT / "tests"))

from fakes.clock import Clock  # noqa: E402
from fakes.quota import Quota  # noqa: E402
from fakes.server import serve  # noqa: E402
from fakes.upstream import FakeUpstream  # noqa: E402
from mirrorproc import cpu_seconds, mirror_process  # noqa: E402

from mirror.app import create_app  # noqa: E402
from mirror.config import Settings  # noqa: E402
from mirror.mediatypes import DOCKER_MANIFEST_V2  # noqa: E402
from mirror.server import uvicorn_config  # noqa: E402

ACCEPT = {"Accept": DOCKER_MANIFEST_V2}


def _manifest(tag: str, version: int) -> dict[str, Any]:
    return {"schemaVersion": 2, "mediaType": DOCKER_MANIFEST_V2, "layers": [], "t": [tag, version]}


@asynccontextmanager
async def _mirror(
    upstream: FakeUpstream, tmp: Path, clock: Clock, **settings: Any
) -> AsyncIterator[tuple[httpx.AsyncClient, Any]]:
    async with serve(upstream) as url:
        config = Settings(
            upstream=url, cache_dir=tmp, access_log=False, log_level="error", **settings
        )
        app = create_app(config, clock=clock)
        # The listener `mirror serve` runs (its protocol class), as the tests use it.
        protocol = uvicorn_config(app, config, app.state.metrics).http
        async with (
            serve(app, http=protocol) as mirror_url,
            httpx.AsyncClient(base_url=mirror_url) as c,
        ):
            yield c, app


async def _latencies(c: httpx.AsyncClient, tags: list[str], expect: str) -> list[float]:
    out = []
    for tag in tags:
        started = time.perf_counter()
        r = await c.get(f"/v2/app/manifests/{tag}", headers=ACCEPT)
        out.append(time.perf_counter() - started)
        assert r.headers["x-cache"] == expect, (r.status_code, r.headers.get("x-cache"), expect)
    return out


async def latency(n: int, rtt: float) -> dict[str, list[float]]:
    results: dict[str, list[float]] = {}
    ttl = 5.0
    for window in ("0", "1h"):
        upstream = FakeUpstream(manifest_delay=rtt)
        tags = [f"t{i}" for i in range(n)]
        for tag in tags:
            upstream.add_manifest(DOCKER_MANIFEST_V2, _manifest(tag, 0), tag=tag)
        with tempfile.TemporaryDirectory() as tmp:
            async with (
                serve(upstream) as url,
                mirror_process(
                    url,
                    Path(tmp),
                    {"MIRROR_TAG_TTL": str(ttl), "MIRROR_STALE_WHILE_REVALIDATE": window},
                ) as (c, _),
            ):
                # Cached all at once: one upstream RTT, well within the TTL.
                filled = await asyncio.gather(
                    *(c.get(f"/v2/app/manifests/{tag}", headers=ACCEPT) for tag in tags)
                )
                assert {r.headers["x-cache"] for r in filled} == {"MISS"}
                cached = time.monotonic()  # every entry is at least this old
                if window == "0":
                    results["hit (within TTL)"] = await _latencies(c, tags, "HIT")
                await asyncio.sleep(max(0.0, cached + ttl + 0.2 - time.monotonic()))
                name = "expired, waits for HEAD" if window == "0" else "expired, 1 h window"
                expect = "REVALIDATED" if window == "0" else "UPDATING"
                results[name] = await _latencies(c, tags, expect)
    return results


async def pulls(reserve: str, tags: int = 30) -> tuple[int, int, int]:
    """(rounds, misses served, pulls spent on moved tags) until a miss is refused."""
    upstream = FakeUpstream()
    upstream.quota = Quota(limit=100, remaining=100, retry_after=None)
    names = [f"t{i}" for i in range(tags)]
    versions = dict.fromkeys(names, 0)
    for tag in names:
        upstream.add_manifest(DOCKER_MANIFEST_V2, _manifest(tag, 0), tag=tag)
    clock = Clock()
    served = rounds = new = 0
    with tempfile.TemporaryDirectory() as tmp:
        async with _mirror(upstream, Path(tmp), clock, tag_ttl=60, ratelimit_reserve=reserve) as (
            c,
            _,
        ):
            for tag in names:
                await c.get(f"/v2/app/manifests/{tag}", headers=ACCEPT)
            spent_before = upstream.quota.gets
            refresh = 0
            while rounds < 1000:
                rounds += 1
                clock.now += 61
                for tag in names[rounds % 5 :: 5]:  # a fifth move upstream
                    versions[tag] += 1
                    upstream.add_manifest(
                        DOCKER_MANIFEST_V2, _manifest(tag, versions[tag]), tag=tag
                    )
                before = upstream.quota.gets
                for tag in names:
                    await c.get(f"/v2/app/manifests/{tag}", headers=ACCEPT)
                refresh += upstream.quota.gets - before
                for _ in range(3):
                    new += 1
                    tag = f"new{new}"
                    upstream.add_manifest(DOCKER_MANIFEST_V2, _manifest(tag, 0), tag=tag)
                    r = await c.get(f"/v2/app/manifests/{tag}", headers=ACCEPT)
                    if r.status_code != 200:
                        return rounds, served, refresh
                    served += 1
            assert upstream.quota.gets >= spent_before
    return rounds, served, refresh


async def hit_cost(n: int, ahead: int) -> float:
    upstream = FakeUpstream()
    upstream.add_manifest(DOCKER_MANIFEST_V2, _manifest("hot", 0), tag="hot")
    with tempfile.TemporaryDirectory() as tmp:
        async with (
            serve(upstream) as url,
            mirror_process(url, Path(tmp), {"MIRROR_REFRESH_AHEAD_PULLS": str(ahead)}) as (c, pid),
        ):
            await c.get("/v2/app/manifests/hot", headers=ACCEPT)
            started = cpu_seconds(pid)
            for _ in range(n):
                r = await c.get("/v2/app/manifests/hot", headers=ACCEPT)
                assert r.headers["x-cache"] == "HIT"
            return (cpu_seconds(pid) - started) / n * 1000


def _ms(values: list[float], q: float) -> float:
    return statistics.quantiles(values, n=100)[int(q) - 1] * 1000 if q < 100 else max(values)


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tags", type=int, default=200)
    parser.add_argument("--rtt", type=float, default=0.1)
    parser.add_argument("--hits", type=int, default=3000)
    args = parser.parse_args()

    print(
        f"## 1. latency of a tag request ({args.tags} tags, upstream RTT {args.rtt * 1000:.0f} ms)"
    )
    results = await latency(args.tags, args.rtt)
    reference = statistics.median(results["hit (within TTL)"])
    print("| case | p50 | p99 | p50 vs hit |")
    print("|---|---|---|---|")
    for name, values in results.items():
        p50 = statistics.median(values)
        print(
            f"| {name} | {p50 * 1000:.1f} ms | {_ms(values, 99):.1f} ms | {p50 / reference:.1f}x |"
        )

    print("\n## 2. pulls until the first refused miss (quota 100, a fifth of 30 tags move a round)")
    print("| ratelimit_reserve | rounds | misses served | pulls on moved tags |")
    print("|---|---|---|---|")
    for reserve in ("0", "20%"):
        rounds, served, refresh = await pulls(reserve)
        print(f"| {reserve} | {rounds} | {served} | {refresh} |")

    print(f"\n## 3. mirror CPU per 1,000 tag hits ({args.hits} hits)")
    # Interleaved twice: the machine is shared, the order must not decide.
    costs: dict[int, list[float]] = {0: [], 5: []}
    for _ in range(2):
        for ahead in (0, 5):
            costs[ahead].append(await hit_cost(args.hits, ahead))
    off, on = min(costs[0]), min(costs[5])
    print("| refresh_ahead_pulls | CPU-s per 1,000 hits | vs off |")
    print("|---|---|---|")
    print(f"| 0 (off) | {off:.3f} | 1.00x |")
    print(f"| 5 | {on:.3f} | {on / off:.2f}x |")


if __name__ == "__main__":
    asyncio.run(main())
