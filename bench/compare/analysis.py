"""What the numbers of a run mean: the targets met or missed, and what limits each result."""

from __future__ import annotations

from . import GB
from .runner import Bench


def warm_metrics(bench: Bench) -> tuple[str, str]:
    return "GB/s, 1 client", f"GB/s, {bench.args.warm_clients} clients"


def targets(bench: Bench) -> list[tuple[str, str, bool]]:
    out: list[tuple[str, str, bool]] = []

    def ratio(key: str, metric: str) -> float:
        row = bench.row(key, metric)
        return (row.ours or 0) / row.ref if row.ref else float("nan")

    for clients in warm_metrics(bench):
        r = ratio("warm", clients)
        out.append(
            (
                f"warm throughput ({clients.split(', ', 1)[1]}) \u2265 1.5\u00d7 reference",
                f"{r:.2f}\u00d7",
                r >= 1.5,
            )
        )
    r = ratio("cold1", "GB/s (median)")
    out.append(("cold miss, single client \u2265 1.0\u00d7 reference", f"{r:.2f}\u00d7", r >= 1.0))
    fetched = bench.row("cold16", "upstream bytes / blob size").ours or 0
    out.append(
        (
            f"{bench.args.cold_clients}-client cold miss: upstream bytes = 1.0\u00d7 the blob",
            f"{fetched:.3f}\u00d7",
            abs(fetched - 1.0) < 1e-9,
        )
    )
    r = ratio("cold16", "wall time until all finish, s")
    out.append(
        (
            f"{bench.args.cold_clients}-client cold miss: wall time \u2264 0.5\u00d7 reference",
            f"{r:.2f}\u00d7",
            r <= 0.5,
        )
    )
    r = ratio("tag", "requests/s")
    out.append(("manifest by tag: req/s \u2265 2\u00d7 reference", f"{r:.2f}\u00d7", r >= 2.0))
    rss = bench.row("rss64", "peak RSS, MiB").ours or float("inf")
    out.append(
        (
            f"our peak RSS with {bench.args.rss_streams} concurrent "
            f"{bench.blob_name()} streams \u2264 150 MiB",
            f"{rss:.0f} MiB",
            rss <= 150,
        )
    )
    p99 = bench.row("latency", "p99 latency under load, ms").ours or float("inf")
    out.append(("manifest latency under load < 100 ms (p99, ours)", f"{p99:.1f} ms", p99 < 100))
    return out


def analysis(bench: Bench) -> list[str]:
    """What limits each result, in numbers from this run."""
    n_warm, n_cold, n_rss = bench.args.warm_clients, bench.args.cold_clients, bench.args.rss_streams
    out: list[str] = []

    def v(key: str, metric: str) -> tuple[float, float]:
        row = bench.row(key, metric)
        return row.ref or float("nan"), row.ours or float("nan")

    w1, wn = v("warm", warm_metrics(bench)[0]), v("warm", warm_metrics(bench)[1])
    c1, cn = bench.client_rate.get(1, float("nan")), bench.client_rate.get(n_warm, float("nan"))
    cpu1 = v("warm", "mirror CPU s/GB, 1 client")
    cpun = v("warm", f"mirror CPU s/GB, {n_warm} clients")
    out.append(
        "**Warm hits are capped by the clients.** The sha256-checking client alone reaches "
        f"{c1:.2f} GB/s with 1 stream and {cn:.2f} GB/s with {n_warm} against a server that "
        f"sends from memory. With 1 client the reference reached {w1[0] / c1:.0%} of that and "
        f"ours {w1[1] / c1:.0%}; with {n_warm}, {wn[0] / cn:.0%} and {wn[1] / cn:.0%}. What "
        f"differs is the mirrors' own cost: ours used {cpu1[1]:.2f} / {cpun[1]:.2f} CPU-s per "
        f"GB, the reference {cpu1[0]:.2f} / {cpun[0]:.2f}. A 1.5\u00d7 throughput gap cannot "
        "show on 2 vCPUs while the clients' hashing needs most of them. Ours sends a hit with "
        "sendfile(2) in 8 MiB windows (mirror/zerocopy.py): in py-spy profiles (taken while "
        "writing this benchmark) the event loop's warm-hit time is that syscall, the "
        "kernel's one copy per byte into the socket; no byte passes through Python."
    )
    head, held = (
        v("cold1", "time to all but the last byte, s"),
        v("cold1", "last byte held back, s"),
    )
    rate1 = v("cold1", "GB/s (median)")
    cpu_cold = v("cold1", "mirror CPU s/GB until the client finished")
    cpu_fill = v("cold1", "mirror CPU s/GB, cache fill included")
    settle1 = v("cold1", "blob in the mirror's cache, s after the client finished")
    busy1 = v("cold1", "machine CPU busy, %")
    text = (
        f"**Cold miss, 1 client ({rate1[1] / rate1[0]:.2f}\u00d7).** The reference delivered "
        f"all but the last byte after {head[0]:.2f} s, ours after {head[1]:.2f} s; ours then "
        f"held its last byte back {held[1]:.2f} s, until the download verified."
    )
    if held[1] > 0.25 * head[1]:
        text += (
            " That wait, mostly the fsync of the new file before the commit (this disk wrote "
            f"and fsynced a test file at {bench.disk_gbs:.2f} GB/s), is most of the gap."
        )
    text += (
        " The reference streams the upstream response straight through to its client and "
        "fills its cache with a second upstream GET on the side: its client is not held up "
        "by hashing or writing, and the blob reached its cache "
        f"{settle1[0]:.2f} s after the client was done (ours: {settle1[1]:.2f} s). Ours "
        "fetches once, hashes and writes the bytes in a worker thread and serves the client "
        "from the file being written, so all of that work is on the client's path: "
        f"{cpu_cold[1]:.2f} CPU-s per GB until the client finished against the reference's "
        f"{cpu_cold[0]:.2f} ({cpu_fill[1]:.2f} and {cpu_fill[0]:.2f} with the cache fill). "
        f"With the client's own sha256 on the same 2 vCPUs, the CPUs were {busy1[1]:.0f}% "
        f"(ours) and {busy1[0]:.0f}% (reference) busy."
    )
    out.append(text)
    wall = v("cold16", "wall time until all finish, s")
    fast = v("cold16", "fastest client, s")
    ccpu = v("cold16", "client CPU s (sha256 of every byte)")
    mcpu = v("cold16", "mirror CPU s")
    fcpu, ucpu = v("cold16", "front CPU s"), v("cold16", "upstream registry CPU s")
    busy = v("cold16", "machine CPU busy, %")
    out.append(
        f"**{n_cold} cold clients"
        + (": the machine runs out of CPU" if min(busy) >= 90 else "")
        + f" ({wall[1] / wall[0]:.2f}\u00d7).** The CPUs were {busy[0]:.0f}% "
        f"(reference) and {busy[1]:.0f}% (ours) busy. The clients' hashing alone took "
        f"{ccpu[0]:.1f} / {ccpu[1]:.1f} CPU-s, the same work for both mirrors; the reference "
        f"side also spent {mcpu[0]:.1f} s in the proxy, {fcpu[0]:.1f} s in the front and "
        f"{ucpu[0]:.1f} s in the upstream registry ({n_cold + 1} upstream GETs), ours "
        f"{mcpu[1]:.1f} s, {fcpu[1]:.1f} s and {ucpu[1]:.1f} s. The shared client cost keeps "
        f"the wall-time ratio at {wall[1] / wall[0]:.2f}\u00d7. Our {n_cold} clients finished "
        f"within {wall[1] - fast[1]:.2f} s of each other: they kept pace with the one "
        f"upstream download, which got {bench.layer_size / wall[1] / GB:.2f} GB/s out of "
        "the CPU left over."
    )
    rps = v("tag", "requests/s")
    ups = v("tag", "upstream requests per request")
    toks = v("tag", "token fetches per request")
    mcpu_tag = v("tag", "mirror CPU ms per request")
    tcpu = v("tag", "token server CPU ms per request")
    out.append(
        f"**Manifest by tag.** The reference makes {ups[0]:.2f} upstream requests (a HEAD of "
        f"the tag) and {toks[0]:.2f} token fetches per client request, even within its cache "
        f"TTL, and spends {mcpu_tag[0]:.2f} ms of its own CPU per request; the token server "
        f"adds {tcpu[0]:.2f} ms. Ours answers from its tag cache with no upstream traffic, at "
        f"{mcpu_tag[1]:.2f} ms of CPU per request: {rps[1]:.0f} req/s is about one core, the "
        "limit of its single event loop (py-spy: FastAPI/Starlette middleware layers, the "
        "diskcache lookup, the access log)."
    )
    if bench.has_table("rss64"):
        peak, start = v("rss64", "peak RSS, MiB"), v("rss64", "RSS when the streams started, MiB")
        per = v("rss64", "growth per stream, MiB")
        text = (
            f"**Peak RSS with {n_rss} streams.** Ours started at {start[1]:.0f} MiB (Python, "
            f"FastAPI, httpx, aiohttp, diskcache) and grew by {per[1]:.1f} MiB per stream to "
            f"{peak[1]:.0f} MiB: a response sends the cached file with sendfile(2), so a "
            "stream holds no buffer of its own, only its descriptors and its task."
        )
        alt = [r for r in bench.table("rss64").rows if r.metric.startswith("ours with MALLOC")]
        if len(alt) == 2 and alt[0].ours is not None and alt[1].ours is not None:
            gbs = bench.row("rss64", "aggregate GB/s").ours or float("nan")
            text += (
                " Without `mirror serve`'s malloc pinning (glibc's 128 KiB mmap threshold) the "
                f"peak was {alt[0].ours:.0f} MiB, at {alt[1].ours:.2f} GB/s instead of "
                f"{gbs:.2f} GB/s: the allocator settings are not what sets the slope."
            )
        if peak[0] == peak[0]:
            text += f" The reference (Go) peaked at {peak[0]:.0f} MiB."
        out.append(text)
    if bench.has_table("warm_bare") and bench.has_table("cold1_bare"):
        out.append(_nginx(bench))
    if bench.has_table("disk"):
        out.append(_disk(bench))
    lbusy = v("latency", "machine CPU busy during downloads, %")
    lat = v("latency", "p99 latency under load, ms")
    p50 = v("latency", "p50 latency under load, ms")
    idle = v("latency", "p50 latency idle, ms")
    out.append(
        f"**Latency under load.** Idle, a manifest by digest takes {idle[1]:.1f} ms from ours "
        f"({idle[0]:.1f} ms from the reference); during the {n_cold} cold downloads p50 "
        f"{p50[1]:.0f} ms and p99 {lat[1]:.0f} ms (reference {p50[0]:.0f} / {lat[0]:.0f} ms). "
        f"The CPUs were {lbusy[1]:.0f}% busy (reference run: {lbusy[0]:.0f}%), and our "
        "single event loop takes each download's 1 MiB blocks off its socket, hands them to "
        f"the writer thread and sends each of the {n_cold} clients its new bytes with "
        "sendfile(2), so a small request waits a few turns of the loop."
    )
    return out


def _nginx(bench: Bench) -> str:
    """nginx against ours, with clients that count bytes only."""
    nw, nc = bench.args.warm_clients, bench.args.cold_clients
    warm, cold1 = bench.table("warm_bare"), bench.table("cold1_bare")

    def get(row: str, table: str = "warm_bare") -> tuple[float, float]:
        r = bench.table(table).row(row)
        return r.nginx or float("nan"), r.ours or float("nan")

    cpu1, cpun = get("mirror CPU s/GB, 1 client"), get(f"mirror CPU s/GB, {nw} clients")
    rate1, raten = get("GB/s, 1 client"), get(f"GB/s, {nw} clients")
    fill = get("mirror CPU s/GB, cache fill included", cold1.key)
    text = (
        "**nginx, the floor for hits.** With clients that only count bytes, nginx (one "
        f"worker, `sendfile`) used {cpu1[0]:.2f} CPU-s per GB with 1 client and "
        f"{cpun[0]:.2f} with {nw} ({rate1[0]:.2f} / {raten[0]:.2f} GB/s); ours "
        f"{cpu1[1]:.2f} and {cpun[1]:.2f} ({rate1[1]:.2f} / {raten[1]:.2f} GB/s)."
    )
    auto = [r for r in warm.rows if r.metric.startswith("nginx with worker_processes auto")]
    if len(auto) == 2 and auto[0].nginx is not None and auto[1].nginx is not None:
        text += (
            f" With `worker_processes auto` nginx reached {auto[0].nginx:.2f} GB/s at "
            f"{auto[1].nginx:.2f} CPU-s/GB with {nw} clients."
        )
    if bench.has_table("cold16_bare"):
        gets = bench.row("cold16_bare", "upstream GETs of the blob").nginx or float("nan")
        text += (
            f" On a cold miss nginx streams the upstream body through while writing its "
            f"cache file and verifies nothing: {fill[0]:.2f} CPU-s/GB against our "
            f"{fill[1]:.2f} with the sha256 and the fsync; with {nc} clients its "
            f"`proxy_cache_lock` made {gets:.0f} upstream GET(s) and held the other "
            "clients until the entry was complete."
        )
    return text


def _disk(bench: Bench) -> str:
    """Reads that miss the page cache, and what they do to a small request's latency."""
    t = bench.table("disk")

    def ours(metric: str) -> float:
        return t.row(metric).ours or float("nan")

    rate = ours("aggregate GB/s of the blob reads")
    disk = ours("bytes the mirror read from disk / bytes sent")
    p50, p99, n = ours("p50 latency, ms"), ours("p99 latency, ms"), ours("requests measured")
    return (
        f"**Reads that miss the page cache.** While {bench.args.warm_clients} clients read "
        f"distinct cached blobs from the disk ({rate:.2f} GB/s; the mirror made the disk "
        f"read {disk:.2f}\u00d7 the bytes it sent), a manifest by digest took p50 {p50:.0f} "
        f"ms and p99 {p99:.0f} ms over {n:.0f} requests. Before each 8 MiB window is sent, "
        "two non-blocking probes (preadv2 with RWF_NOWAIT) ask whether it is in the page "
        "cache; a window that is not is read by a worker thread first, and the blob's "
        "descriptor has readahead off, so the loop's sendfile never starts disk I/O "
        "(mirror/filespan.py)."
    )
