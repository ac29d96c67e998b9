"""Cold misses: the blob is not in the mirror's cache yet, one client or many at once."""

from __future__ import annotations

from collections.abc import Callable

import loadgen

from . import GB
from .processes import OURS, Subject
from .runner import Bench, Obs, gbs, med, peak
from .tables import Row, Table

Blobs = loadgen.BlobRun
Runs = dict[str, list[Obs[Blobs]]]


def _cold_runs(
    bench: Bench,
    clients: int,
    repeat: int,
    what: str,
    seen: Callable[[Subject, int, Obs[Blobs]], None],
    verify: bool,
) -> Runs:
    """Each server `repeat` times, each time on an empty cache, until the blob is in it."""
    runs: Runs = bench.runs()
    for i in range(repeat):
        for s in bench.blob_subjects:
            s.fresh()
            obs = bench.observe_fetch(s, clients, settle=True, verify=verify)
            bench.check_blobs(obs.result, f"{what}, {s.label}")
            seen(s, i, obs)
            runs[s.label].append(obs)
    return runs


def cold_single(bench: Bench) -> None:
    """One client, sha256-checking (as before), then counting bytes only (the goals')."""
    _cold_single(bench, verify=True)
    _cold_single(bench, verify=False)


def cold_many(bench: Bench) -> None:
    _cold_many(bench, verify=True)
    _cold_many(bench, verify=False)


def _kind(verify: bool) -> str:
    return "" if verify else ", clients counting bytes only"


def _cold_single(bench: Bench, verify: bool) -> None:
    bench.log("workload 2: cold miss, 1 client" + _kind(verify))
    size, layer = bench.layer_size, bench.layer

    def seen(s: Subject, i: int, obs: Obs[Blobs]) -> None:
        gets = len(obs.blob_gets(layer))
        if s.label == OURS and gets != 1:
            bench.problem(f"cold 1 client: ours made {gets} upstream GETs")
        bench.log(
            f"  {s.label} #{i + 1}: {size / obs.result.wall / GB:.2f} GB/s, "
            f"{gets} upstream GET(s), RSS {obs.rss_mib:.0f} MiB"
        )

    runs = _cold_runs(bench, 1, bench.args.repeat, "cold 1 client" + _kind(verify), seen, verify)

    def first(o: Obs[Blobs]) -> loadgen.Stream:
        return o.result.streams[0]

    bench.tables.append(
        Table(
            "cold1" if verify else "cold1_bare",
            f"Cold miss, {bench.blob_name()}, 1 client" + _kind(verify),
            [
                Row(
                    "GB/s (median)",
                    **med(runs, lambda o: size / o.result.wall / GB),
                    target="\u2265 1.0\u00d7",
                ),
                Row(
                    "time to response head, s",
                    **med(runs, lambda o: first(o).first_byte - first(o).start),
                    fmt="{:.3f}",
                ),
                Row(
                    "time to all but the last byte, s",
                    **med(runs, lambda o: first(o).all_but_last - first(o).start),
                ),
                Row(
                    "last byte held back, s",
                    **med(runs, lambda o: first(o).end - first(o).all_but_last),
                    ratio=False,
                ),
                Row(
                    "upstream GETs of the blob",
                    **med(runs, lambda o: len(o.blob_gets(layer))),
                    fmt="{:.0f}",
                ),
                Row(
                    "upstream bytes / blob size",
                    **med(runs, lambda o: o.fetched(layer) / size),
                ),
                Row(
                    "blob in the mirror's cache, s after the client finished",
                    **med(runs, lambda o: o.settle_s),
                    ratio=False,
                ),
                Row(
                    "mirror CPU s/GB until the client finished",
                    **med(runs, lambda o: o.cpu_step / (size / GB)),
                ),
                Row(
                    "mirror CPU s/GB, cache fill included",
                    **med(runs, lambda o: o.cpu / (size / GB)),
                    target="" if verify else "ours \u2264 1.0",
                ),
                Row("machine CPU busy, %", **med(runs, lambda o: o.busy * 100), fmt="{:.0f}"),
                Row("peak RSS, MiB", **peak(runs), fmt="{:.0f}"),
            ],
            [
                f"median of {bench.args.repeat} runs, each on a fresh mirror with an empty "
                "cache; ours holds the last byte of a response back until the download has "
                "verified (docs/design.md, 'Blob path'); the reference streams the upstream "
                "response straight through while a second upstream GET fills its cache; "
                "nginx streams it through while writing its cache file, verifying nothing"
            ],
        )
    )
    if verify:
        bench.note_rss("cold miss, 1 client", runs)


def _cold_many(bench: Bench, verify: bool) -> None:
    n = bench.args.cold_clients
    bench.log(f"workload 3: cold miss, {n} clients" + _kind(verify))
    size, layer = bench.layer_size, bench.layer

    def seen(s: Subject, i: int, obs: Obs[Blobs]) -> None:
        gets, fetched = len(obs.blob_gets(layer)), obs.fetched(layer)
        if s.label == OURS and (gets != 1 or fetched != size):
            bench.problem(f"cold x{n}: ours made {gets} upstream GETs of the blob, {fetched} bytes")
        bench.log(
            f"  {s.label} #{i + 1}: {obs.result.wall:.2f} s, {gets} upstream GETs, "
            f"{fetched / size:.2f}\u00d7 blob fetched, machine busy {obs.busy:.0%}"
        )

    runs = _cold_runs(
        bench, n, bench.args.repeat_cold_many, f"cold x{n}" + _kind(verify), seen, verify
    )

    def streams(o: Obs[Blobs]) -> list[loadgen.Stream]:
        return o.result.streams

    bench.tables.append(
        Table(
            "cold16" if verify else "cold16_bare",
            f"Cold miss, {bench.blob_name()}, {n} concurrent clients" + _kind(verify),
            [
                Row(
                    "wall time until all finish, s",
                    **med(runs, lambda o: o.result.wall),
                    target="\u2264 0.5\u00d7",
                ),
                Row(
                    "until every client had all but the last byte, s",
                    **med(
                        runs,
                        lambda o: (
                            max(st.all_but_last for st in streams(o))
                            - min(st.start for st in streams(o))
                        ),
                    ),
                ),
                Row(
                    "fastest client, s",
                    **med(runs, lambda o: min(st.end - st.start for st in streams(o))),
                ),
                Row("aggregate GB/s to clients", **med(runs, lambda o: gbs(o.result))),
                Row(
                    "upstream bytes / blob size",
                    **med(runs, lambda o: o.fetched(layer) / size),
                    target="ours = 1.0",
                ),
                Row(
                    "upstream GETs of the blob",
                    **med(runs, lambda o: len(o.blob_gets(layer))),
                    fmt="{:.0f}",
                ),
                Row(
                    "upstream 401 answers (token challenges)",
                    **med(runs, lambda o: o.challenges()),
                    fmt="{:.0f}",
                    ratio=False,
                ),
                Row("mirror CPU s", **med(runs, lambda o: o.cpu)),
                Row(
                    "client CPU s (sha256 of every byte)"
                    if verify
                    else "client CPU s (counting bytes only)",
                    **med(runs, lambda o: o.result.cpu),
                ),
                Row("front CPU s", **med(runs, lambda o: o.front_cpu)),
                Row("upstream registry CPU s", **med(runs, lambda o: o.upstream_cpu)),
                Row("machine CPU busy, %", **med(runs, lambda o: o.busy * 100), fmt="{:.0f}"),
                Row("peak RSS, MiB", **peak(runs), fmt="{:.0f}"),
            ],
            [
                f"median of {bench.args.repeat_cold_many} run(s) per mirror, each on a fresh "
                "empty cache; upstream figures from the counting front; every run of ours "
                "was checked for exactly one upstream GET of exactly the blob's size. nginx's "
                "`proxy_cache_lock` sends one request upstream and holds the others until "
                "the cache entry is complete (it checks every 500 ms), then serves them from it"
            ],
        )
    )
    if verify:
        bench.note_rss(f"cold miss, {n} clients", runs)
