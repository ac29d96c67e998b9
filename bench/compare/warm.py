"""Warm hits: the blob is in the mirror's cache; throughput, and peak RSS with many streams."""

from __future__ import annotations

import os
from collections.abc import Callable

import loadgen

from . import GB
from .nginx import NGINX, Nginx
from .processes import OURS, REF, Ours
from .runner import Bench, Cols, Obs, gbs, med, peak
from .sampling import median
from .tables import Row, Table

Blobs = loadgen.BlobRun


def warm(bench: Bench) -> None:
    """Warm hits with sha256-checking clients (as before), then with clients that only
    count bytes (like curl): the issue's goals are stated with the latter."""
    _warm(bench, verify=True)
    _warm(bench, verify=False)


def _warm(bench: Bench, verify: bool) -> None:
    kind = "sha256-checking clients" if verify else "clients counting bytes only"
    bench.log(f"workload 1: warm hit, {kind}")
    key = "warm" if verify else "warm_bare"
    title = f"Warm hit, {bench.blob_name()}" + ("" if verify else ", clients counting bytes only")
    table = Table(key, title, [])
    for clients in (1, bench.args.warm_clients):
        runs: dict[str, list[Obs[Blobs]]] = bench.runs()
        for s in bench.blob_subjects:
            s.settle(bench.layer, bench.layer_size)
            for _ in range(bench.args.repeat):
                obs = bench.observe_fetch(s, clients, verify=verify)
                bench.check_blobs(obs.result, f"warm x{clients} ({kind}), {s.label}")
                if obs.blob_gets(bench.layer):
                    bench.problem(f"warm x{clients}: {s.label} fetched the blob upstream")
                runs[s.label].append(obs)
            rates = [gbs(o.result) for o in runs[s.label]]
            bench.log(f"  {s.label} x{clients}: {median(rates):.2f} GB/s")

        n = f"{clients} client{'s' if clients > 1 else ''}"
        table.rows += [
            Row(
                f"GB/s, {n}",
                **med(runs, lambda o: gbs(o.result)),
                target="" if verify else "\u2265 1.5\u00d7",
            ),
            Row(
                f"mirror CPU s/GB, {n}",
                **med(runs, lambda o: o.cpu / (o.result.total / GB)),
                target="" if verify else "\u2264 1.3\u00d7 nginx",
            ),
            Row(
                f"client CPU s/GB, {n}",
                **med(runs, lambda o: o.result.cpu / (o.result.total / GB)),
            ),
            Row(f"machine CPU busy %, {n}", **med(runs, lambda o: o.busy * 100), fmt="{:.0f}"),
            Row(
                f"peak RSS MiB, {n}",
                **peak(runs),
                fmt="{:.0f}",
            ),
        ]
        if verify:
            bench.note_rss(f"warm hit, {n}", runs)
    if verify:
        table.notes.append(
            f"median of {bench.args.repeat} runs; no upstream blob requests (checked). The "
            "clients hash every byte with sha256 (about 1.5 GB/s per core with SHA-NI) on the "
            "same 2 vCPUs: the capacity table shows what they reach against a server that "
            "sends from memory, which caps every column"
        )
    else:
        if bench.nginx is not None:
            table.rows += _nginx_auto(bench)
        table.notes.append(
            f"median of {bench.args.repeat} runs; the clients count the bytes and check "
            "the length, nothing else, like `curl -o /dev/null`; 'mirror CPU' is all the "
            "server's processes (nginx: master and its one worker)"
        )
    bench.tables.append(table)


def _nginx_auto(bench: Bench) -> list[Row]:
    """nginx with `worker_processes auto` (one per vCPU), 8 clients counting bytes."""
    assert bench.nginx is not None
    n = bench.args.warm_clients
    alt = Nginx(
        bench.work,
        bench.nginx.front,
        bench.tokens,
        bench.nginx_repos(),
        workers="auto",
        label="nginx-auto",
    )
    try:
        alt.fresh()
        bench.fetch(alt.port, 1, verify=False)
        alt.settle(bench.layer, bench.layer_size)
        runs = []
        for _ in range(bench.args.repeat):
            obs = bench.observe_fetch(alt, n, verify=False)
            bench.check_blobs(obs.result, f"warm x{n} via {alt.label}")
            runs.append(obs)
    finally:
        alt.stop()
    rate = median([gbs(o.result) for o in runs])
    cpu = median([o.cpu / (o.result.total / GB) for o in runs])
    bench.log(f"  nginx, worker_processes auto, x{n}: {rate:.2f} GB/s, {cpu:.2f} CPU-s/GB")
    what = f"nginx with worker_processes auto ({os.cpu_count()})"
    return [
        Row(f"{what}: GB/s, {n} clients", None, None, nginx=rate, ratio=False),
        Row(f"{what}: CPU s/GB, {n} clients", None, None, nginx=cpu, ratio=False),
    ]


def many_streams(bench: Bench) -> None:
    n = bench.args.rss_streams
    bench.log(f"workload 6: peak RSS with {n} concurrent warm streams")
    res: dict[str, Obs[Blobs]] = {}
    for s in bench.blob_subjects:
        if s.label != OURS and not bench.args.rss_both:
            continue
        s.settle(bench.layer, bench.layer_size)
        obs = bench.observe_fetch(s, n)
        bench.check_blobs(obs.result, f"{n} warm streams via {s.label}")
        res[s.label] = obs
        bench.log(f"  {s.label}: peak RSS {obs.rss_mib:.0f} MiB, {gbs(obs.result):.2f} GB/s")

    variant = _malloc_variant(bench) if bench.args.malloc_variant else None

    def both(fn: Callable[[Obs[Blobs]], float]) -> Cols:
        def get(label: str) -> float | None:
            return fn(res[label]) if label in res else None

        return Cols(ref=get(REF), ours=get(OURS), nginx=get(NGINX))

    rows = [
        Row(
            "peak RSS, MiB",
            **both(lambda o: o.rss_mib),
            fmt="{:.0f}",
            target="ours \u2264 150 MiB",
        ),
        Row("RSS when the streams started, MiB", **both(lambda o: o.rss_before), fmt="{:.0f}"),
        Row("growth per stream, MiB", **both(lambda o: (o.rss_mib - o.rss_before) / n)),
        Row("aggregate GB/s", **both(lambda o: gbs(o.result))),
        Row("wall time, s", **both(lambda o: o.result.wall)),
    ]
    notes = [
        "all streams start together on fresh connections; sha256-checking clients; VmHWM "
        "of the mirror process (nginx: of its one worker)"
    ]
    if variant is not None:
        rows += [
            Row(
                "ours with MALLOC_MMAP_THRESHOLD_=131072: peak RSS, MiB",
                None,
                variant.rss_mib,
                fmt="{:.0f}",
                ratio=False,
            ),
            Row(
                "ours with MALLOC_MMAP_THRESHOLD_=131072: aggregate GB/s",
                None,
                gbs(variant.result),
                ratio=False,
            ),
        ]
        notes.append(
            "MALLOC_MMAP_THRESHOLD_ in the environment makes `mirror serve` skip its "
            "malloc pinning (mirror/tuning.py): 1 MiB buffers are then mmapped and "
            "unmapped per chunk instead of coming from a heap that keeps up to 256 MiB"
        )
    bench.tables.append(
        Table("rss64", f"{n} concurrent warm {bench.blob_name()} streams", rows, notes)
    )
    rss = both(lambda o: o.rss_mib)
    bench.rss_rows[f"warm hit, {n} streams"] = (rss["ref"], rss["ours"])
    if variant is not None:
        bench.rss_rows[f"warm hit, {n} streams, ours with MALLOC_MMAP_THRESHOLD_=131072"] = (
            None,
            variant.rss_mib,
        )


def _malloc_variant(bench: Bench) -> Obs[Blobs]:
    """The many-streams step on ours with glibc's mmap threshold back at its 128 KiB default.

    Shows how much of the peak is heap kept by `mirror serve`'s malloc pinning.
    """
    n = bench.args.rss_streams
    ours = next(s for s in bench.subjects if isinstance(s, Ours) and s.label == OURS)
    alt = Ours(
        bench.work,
        ours.front,
        # Same code as `ours` (--mirror-rev), with only the allocator changed.
        env={**ours.extra_env, "MALLOC_MMAP_THRESHOLD_": "131072"},
        label="ours-mmap128k",
    )
    try:
        alt.fresh()
        bench.fetch(alt.port, 1)
        alt.settle(bench.layer, bench.layer_size)
        variant = bench.observe_fetch(alt, n)
        bench.check_blobs(variant.result, f"{n} warm streams via {alt.label}")
    finally:
        alt.stop()
    for line, count in alt.findings.items():
        bench.problem(f"{alt.label} log: {count} x {line}")
    bench.log(
        f"  ours, MALLOC_MMAP_THRESHOLD_=131072: peak RSS {variant.rss_mib:.0f} MiB, "
        f"{gbs(variant.result):.2f} GB/s"
    )
    return variant
