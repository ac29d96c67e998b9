"""Harness capacity: the counting front and the clients are not what limits the results."""

from __future__ import annotations

import loadgen
from front import Front
from harness import OCI_MANIFEST, fetch_token

from . import GB
from .processes import serving
from .runner import Bench, gbs
from .sampling import proc_cpu
from .tables import Row, Table


def harness_capacity(bench: Bench, front: Front) -> None:
    args = bench.args
    bench.log("harness capacity: upstream direct vs through a counting front")
    auth = {"Authorization": "Bearer " + fetch_token(bench.tokens, bench.big.repo)}
    ends = (("direct", bench.registry.port), ("front", front.port))
    rows: list[Row] = []
    for clients in (1, args.warm_clients):
        rates: dict[str, float] = {}
        cpu_per_gb = 0.0
        for label, port in ends:
            fcpu0 = proc_cpu(front.pid)
            run = bench.fetch(port, clients, auth)
            bench.check_blobs(run, f"capacity check {label} x{clients}")
            rates[label] = gbs(run)
            cpu_per_gb = (proc_cpu(front.pid) - fcpu0) / (run.total / GB)
        rows.append(Row(f"blob GB/s, {clients} client(s)", rates["direct"], rates["front"]))
        rows.append(Row(f"front CPU s/GB, {clients} client(s)", None, cpu_per_gb, ratio=False))
    # The front's own headroom: the same with clients that only count the bytes.
    for clients in (1, args.warm_clients):
        bare: dict[str, float] = {}
        for label, port in ends:
            run = bench.fetch(port, clients, auth, verify=False)
            bench.check_blobs(run, f"capacity check {label} x{clients}, no hashing")
            bare[label] = gbs(run)
        rows.append(
            Row(
                f"blob GB/s, {clients} client(s) counting bytes only (no sha256)",
                bare["direct"],
                bare["front"],
            )
        )
    path = f"/v2/{bench.big.repo}/manifests/{bench.big.tag}"
    headers = {"Accept": OCI_MANIFEST, **auth}
    rps: dict[str, float] = {}
    for label, port in ends:
        load = bench.manifest_load(port, path, headers, min(2.0, args.manifest_seconds))
        if load.bad or load.errors:
            bench.problem(f"capacity check manifests {label}: {load.bad} bad, {load.errors}")
        rps[label] = load.requests / load.seconds
    rows.append(
        Row(
            f"manifest GET by tag req/s, {args.manifest_conns} conns",
            rps["direct"],
            rps["front"],
            fmt="{:.0f}",
        )
    )
    ceilings = blob_ceiling(bench)
    for clients, rate in ceilings:
        rows.append(
            Row(
                f"blob client alone (sha256 on), trivial server: GB/s, {clients} client(s)",
                rate,
                None,
                ratio=False,
            )
        )
    rate, cpu_us = client_ceiling(bench)
    rows.append(
        Row(
            f"manifest client alone, trivial server: req/s, {args.manifest_conns} conns",
            rate,
            None,
            fmt="{:.0f}",
            ratio=False,
        )
    )
    rows.append(Row("manifest client CPU µs per request", cpu_us, None, fmt="{:.0f}", ratio=False))
    bench.client_rate = dict(ceilings)
    bench.capacity = Table(
        "capacity",
        "Harness capacity: the upstream direct and through a counting front",
        rows,
        [
            "'via front' is the upstream registry through a counting front; the blob and "
            "manifest clients alone run against a trivial in-memory server in another "
            "process (same machine, same 2 vCPUs), so those rows are the clients' ceilings. "
            "Only the 'counting bytes only' rows skip the sha256 check: they measure the "
            "front's headroom, not a mirror"
        ],
        ("metric", "direct", "via front", "front / direct", "note"),
    )
    print(bench.capacity.markdown())


def blob_ceiling(bench: Bench) -> list[tuple[int, float]]:
    """GB/s of the hashing blob client against a server sending from memory."""
    out: list[tuple[int, float]] = []
    size = bench.layer_size
    with serving(loadgen.blob_server, size, what="blob server") as port:
        digest = loadgen.zeros_digest(size)
        bench.fetch(port, 1, path="/warm-up", digest=digest)  # faults the body's pages in
        for clients in (1, bench.args.warm_clients):
            best = 0.0
            for _ in range(2):  # a ceiling: the better of two runs
                run = bench.fetch(port, clients, path="/blob", digest=digest)
                bench.check_blobs(run, f"blob client ceiling x{clients}")
                best = max(best, gbs(run))
            out.append((clients, best))
    return out


def client_ceiling(bench: Bench) -> tuple[float, float]:
    """req/s and client CPU µs/request of the manifest client against a static server."""
    body = bench.big.manifest
    with serving(loadgen.static_server, body, OCI_MANIFEST, what="static server") as port:
        seconds = min(2.0, bench.args.manifest_seconds)
        run = bench.manifest_load(port, "/static", {"Accept": OCI_MANIFEST}, seconds)
    return run.requests / run.seconds, run.cpu / max(run.total, 1) * 1e6
