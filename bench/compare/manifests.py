"""Manifests: by tag under closed-loop load, and by digest while cold downloads run."""

from __future__ import annotations

import time
from collections.abc import Callable
from functools import partial

import loadgen
from harness import OCI_MANIFEST

from .runner import Bench, Obs, each
from .sampling import pct
from .tables import Row, Table


def manifests_by_tag(bench: Bench) -> None:
    args = bench.args
    bench.log("workload 4: manifest by tag, warm")
    path = f"/v2/{bench.big.repo}/manifests/{bench.big.tag}"
    headers = {"Accept": OCI_MANIFEST}
    out: dict[str, Obs[loadgen.LoadRun]] = {}
    for s in bench.subjects:
        bench.check_manifest(s, path, headers, "manifest by tag")
        load = partial(bench.manifest_load, s.port, path, headers, args.manifest_seconds)
        obs = bench.observe(s, load)
        run = obs.result
        if run.bad or run.errors:
            bench.problem(
                f"manifest by tag via {s.label}: {run.bad} bad answers "
                f"({run.statuses}), errors {run.errors}"
            )
        out[s.label] = obs
        bench.log(
            f"  {s.label}: {run.requests / run.seconds:.0f} req/s, "
            f"p99 {pct(run.latencies, 99) * 1000:.1f} ms, "
            f"{len(obs.upstream)} upstream requests, {obs.tokens} tokens"
        )

    def per_request(fn: Callable[[Obs[loadgen.LoadRun]], float]) -> tuple[float, float]:
        return each(out, lambda o: fn(o) / max(o.result.total, 1))

    def latency(q: float) -> tuple[float, float]:
        return each(out, lambda o: pct(o.result.latencies, q) * 1000)

    bench.tables.append(
        Table(
            "tag",
            "Manifest by tag, warm (within the tag TTL)",
            [
                Row(
                    "requests/s",
                    *each(out, lambda o: o.result.requests / o.result.seconds),
                    fmt="{:.0f}",
                    target="\u2265 2\u00d7",
                ),
                Row("p50 latency, ms", *latency(50)),
                Row("p99 latency, ms", *latency(99)),
                Row(
                    "upstream requests per request",
                    *per_request(lambda o: len(o.upstream)),
                    ratio=False,
                ),
                Row("token fetches per request", *per_request(lambda o: o.tokens), ratio=False),
                Row("mirror CPU ms per request", *per_request(lambda o: o.cpu * 1000)),
                Row(
                    "upstream registry CPU ms per request",
                    *per_request(lambda o: o.upstream_cpu * 1000),
                    ratio=False,
                ),
                Row(
                    "token server CPU ms per request",
                    *per_request(lambda o: o.harness_cpu * 1000),
                    ratio=False,
                ),
                Row("machine CPU busy, %", *each(out, lambda o: o.busy * 100), fmt="{:.0f}"),
                Row("peak RSS, MiB", *each(out, lambda o: o.rss_mib), fmt="{:.0f}"),
            ],
            [
                "token server CPU is this script's own process (the harness's token "
                "server runs in it as threads, signing an RS256 JWT per token)",
                f"{args.manifest_conns} keep-alive connections, closed loop, "
                f"{args.manifest_seconds:g} s after 0.5 s of warm-up, "
                f"`Accept: {OCI_MANIFEST}`; every body's digest checked; the client's own "
                "ceiling is in the capacity table",
            ],
        )
    )
    bench.rss_rows["manifest by tag"] = each(out, lambda o: o.rss_mib)


def latency_under_load(bench: Bench) -> None:
    args = bench.args
    n = args.cold_clients
    bench.log(f"workload 7: manifest-by-digest latency during {n} cold downloads")
    path = f"/v2/{bench.big.repo}/manifests/{bench.big.digest}"
    headers = {"Accept": OCI_MANIFEST}
    stop = bench.work / "stop-probe"
    idle: dict[str, loadgen.LoadRun] = {}
    busy: dict[str, loadgen.LoadRun] = {}
    downloads: dict[str, Obs[loadgen.BlobRun]] = {}
    for s in bench.subjects:
        s.fresh()
        bench.check_manifest(s, path, headers, "manifest by digest")  # cached from here on
        stop.unlink(missing_ok=True)
        probe_args = (
            "127.0.0.1",
            s.port,
            path,
            headers,
            bench.big.digest,
            str(stop),
            args.probe_interval,
        )
        idle[s.label] = bench.pool.submit(loadgen.probe, *probe_args, 1.0).result(60)
        running = bench.pool.submit(loadgen.probe, *probe_args, args.timeout + 60)
        time.sleep(0.3)  # the probe is running before the downloads start
        try:
            obs = bench.observe_fetch(s, n, settle=True)
        finally:
            stop.touch()
        probe = running.result(60)
        bench.check_blobs(obs.result, f"latency under load, downloads via {s.label}")
        for what, run in (("idle", idle[s.label]), ("under load", probe)):
            if run.bad or run.errors:
                bench.problem(
                    f"manifest by digest {what} via {s.label}: {run.bad} bad "
                    f"({run.statuses}), errors {run.errors}"
                )
        # Only requests that started while the downloads were running count.
        begin = min(st.start for st in obs.result.streams)
        end = max(st.end for st in obs.result.streams)
        kept = [
            lat for lat, t in zip(probe.latencies, probe.starts, strict=True) if begin <= t <= end
        ]
        probe.latencies = kept
        busy[s.label], downloads[s.label] = probe, obs
        bench.log(
            f"  {s.label}: p50 {pct(kept, 50) * 1000:.1f} ms, "
            f"p99 {pct(kept, 99) * 1000:.1f} ms over {len(kept)} requests; "
            f"downloads {obs.result.wall:.2f} s"
        )

    def ms(runs: dict[str, loadgen.LoadRun], q: float) -> tuple[float, float]:
        return each(runs, lambda r: pct(r.latencies, q) * 1000)

    bench.tables.append(
        Table(
            "latency",
            f"Manifest by digest, latency while {n} cold {bench.blob_name()} downloads run",
            [
                Row("p50 latency under load, ms", *ms(busy, 50)),
                Row("p99 latency under load, ms", *ms(busy, 99), target="ours < 100 ms"),
                Row(
                    "max latency under load, ms",
                    *each(busy, lambda r: max(r.latencies, default=float("nan")) * 1000),
                ),
                Row(
                    "requests measured under load",
                    *each(busy, lambda r: len(r.latencies)),
                    fmt="{:.0f}",
                    ratio=False,
                ),
                Row("p50 latency idle, ms", *ms(idle, 50)),
                Row("p99 latency idle, ms", *ms(idle, 99)),
                Row("downloads: wall time, s", *each(downloads, lambda o: o.result.wall)),
                Row(
                    "machine CPU busy during downloads, %",
                    *each(downloads, lambda o: o.busy * 100),
                    fmt="{:.0f}",
                ),
                Row("peak RSS, MiB", *each(downloads, lambda o: o.rss_mib), fmt="{:.0f}"),
            ],
            [
                f"sequential GETs on one keep-alive connection, one every "
                f"{args.probe_interval * 1000:g} ms at most, from their own process; "
                "'idle' is the same probe for 1 s before the downloads start"
            ],
        )
    )
    bench.rss_rows[f"manifest probe during {n} cold downloads"] = each(
        downloads, lambda o: o.rss_mib
    )
