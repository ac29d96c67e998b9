"""Manifest latency while clients read cached blobs that are not in the page cache.

Ours only: whether its event loop waits for the disk. The blobs are distinct, so one
readahead does not serve them all; the page cache is dropped (root only) after they are
cached and before they are read.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import loadgen
from harness import OCI_MANIFEST

from . import GB, MiB
from .images import build_image
from .processes import OURS
from .runner import Bench, gbs
from .sampling import pct, tree_io_read
from .tables import Row, Table

KEY = "disk"


def drop_page_cache() -> str:
    """Drop the page cache; "" when done, else why it could not be."""
    if os.geteuid() != 0:
        return "not root: cannot drop the page cache"
    os.sync()
    try:
        Path("/proc/sys/vm/drop_caches").write_text("3")
    except OSError as err:
        return f"cannot drop the page cache: {err.strerror}"
    return ""


def cold_disk_latency(bench: Bench) -> None:
    args = bench.args
    n, mib = args.warm_clients, args.disk_blob_mib
    bench.log(f"workload 8: manifest latency while {n} clients read uncached {mib} MiB blobs")
    ours = next(s for s in bench.subjects if s.label == OURS)
    bench.log(f"  building and pushing {n} distinct {mib} MiB blobs")
    image, _ = build_image(bench.work, bench.registry, "bench/disk", [mib * MiB] * n)
    digests = image.layer_digests[1:]  # [0] is the config
    targets = [(f"/v2/{image.repo}/blobs/{d}", d) for d in digests]
    size = int(json.loads(image.manifest)["layers"][0]["size"])  # all the same size
    ours.fresh()
    fill = bench.fetch(ours.port, n, targets=targets, size=size)  # all at once, checked
    bench.check_blobs(fill, "cache fill of the uncached-read blobs via ours")
    for d in digests:
        ours.settle(d, size)
    path = f"/v2/{bench.big.repo}/manifests/{bench.big.digest}"
    headers = {"Accept": OCI_MANIFEST}
    bench.check_manifest(ours, path, headers, "manifest by digest")  # cached from here on
    why = drop_page_cache()
    if why:
        bench.log(f"  {why}: the blobs may still be in the page cache")
        bench.goal_notes[KEY] = f"n/a ({why})"
    stop = bench.work / "stop-disk-probe"
    stop.unlink(missing_ok=True)
    probe_args = ("127.0.0.1", ours.port, path, headers, bench.big.digest, str(stop))
    running = bench.pool.submit(loadgen.probe, *probe_args, args.probe_interval, args.timeout + 60)
    time.sleep(0.3)  # the probe is running before the reads start
    read0 = tree_io_read(ours.root_pid)
    try:
        obs = bench.observe(
            ours,
            lambda: bench.fetch(ours.port, n, verify=False, targets=targets, size=size),
        )
    finally:
        stop.touch()
    from_disk = tree_io_read(ours.root_pid) - read0
    probe = running.result(60)
    run = obs.result
    bench.check_blobs(run, "uncached blob reads via ours")
    if probe.bad or probe.errors:
        bench.problem(
            f"manifest by digest during uncached reads: {probe.bad} bad "
            f"({probe.statuses}), errors {probe.errors}"
        )
    begin = min(st.start for st in run.streams)
    end = max(st.end for st in run.streams)
    kept = [lat for lat, t in zip(probe.latencies, probe.starts, strict=True) if begin <= t <= end]
    p99 = pct(kept, 99) * 1000
    bench.goal_values[KEY] = p99
    bench.log(
        f"  ours: p50 {pct(kept, 50) * 1000:.1f} ms, p99 {p99:.1f} ms over {len(kept)} "
        f"requests; reads {run.wall:.2f} s, {from_disk / (n * size):.2f}x the blobs from disk"
    )

    def ours_only(metric: str, value: float, fmt: str = "{:.2f}") -> Row:
        return Row(metric, None, value, fmt=fmt, ratio=False)

    bench.tables.append(
        Table(
            KEY,
            f"Manifest latency while {n} clients read {n} distinct cached {mib} MiB blobs "
            "not in the page cache (ours)",
            [
                ours_only("p50 latency, ms", pct(kept, 50) * 1000),
                Row("p99 latency, ms", None, p99, ratio=False, target="< 50 ms"),
                ours_only("max latency, ms", max(kept, default=float("nan")) * 1000),
                ours_only("requests measured", len(kept), "{:.0f}"),
                ours_only("aggregate GB/s of the blob reads", gbs(run)),
                ours_only("bytes the mirror read from disk / bytes sent", from_disk / run.total),
                ours_only("mirror CPU s/GB", obs.cpu / (run.total / GB)),
                ours_only("machine CPU busy, %", obs.busy * 100, "{:.0f}"),
            ],
            [
                "the page cache was "
                + (why or "dropped (`sync; echo 3 > /proc/sys/vm/drop_caches`)")
                + " after the blobs were cached and before they were read; the clients "
                "count bytes only; the probe is the manifest-by-digest latency table's "
                "(one keep-alive connection, sequential GETs); 'read from disk' is read_bytes "
                "of /proc/PID/io, what the mirror's reads made the block layer fetch"
            ],
            ("metric", "Distribution proxy (not run)", "ours", "ours / ref", "target"),
        )
    )
