"""Cold misses: the blob is not in the mirror's cache yet, one client or many at once."""

from __future__ import annotations

from collections.abc import Callable

import loadgen

from . import GB
from .processes import OURS, REF, Subject
from .runner import Bench, Obs, gbs, load_rows, medians
from .tables import Row, Table

Blobs = loadgen.BlobRun
Runs = dict[str, list[Obs[Blobs]]]


def _cold_runs(
    bench: Bench,
    clients: int,
    repeat: int,
    what: str,
    seen: Callable[[Subject, int, Obs[Blobs]], None],
) -> Runs:
    """Each mirror `repeat` times, each time on an empty cache, until the blob is in it."""
    runs: Runs = {REF: [], OURS: []}
    for i in range(repeat):
        for s in bench.subjects:
            s.fresh()
            obs = bench.observe_fetch(s, clients, settle=True)
            bench.check_blobs(obs.result, f"{what}, {s.label}")
            seen(s, i, obs)
            runs[s.label].append(obs)
    return runs


def cold_single(bench: Bench) -> None:
    bench.log("workload 2: cold miss, 1 client")
    size, layer = bench.layer_size, bench.layer

    def seen(s: Subject, i: int, obs: Obs[Blobs]) -> None:
        gets = len(obs.blob_gets(layer))
        if s.label == OURS and gets != 1:
            bench.problem(f"cold 1 client: ours made {gets} upstream GETs")
        bench.log(
            f"  {s.label} #{i + 1}: {size / obs.result.wall / GB:.2f} GB/s, "
            f"{gets} upstream GET(s), RSS {obs.rss_mib:.0f} MiB"
        )

    runs = _cold_runs(bench, 1, bench.args.repeat, "cold 1 client", seen)

    def first(o: Obs[Blobs]) -> loadgen.Stream:
        return o.result.streams[0]

    bench.tables.append(
        Table(
            "cold1",
            f"Cold miss, {bench.blob_name()}, 1 client",
            [
                Row(
                    "GB/s (median)",
                    *medians(runs, lambda o: size / o.result.wall / GB),
                    target="\u2265 1.0\u00d7",
                ),
                Row(
                    "time to response head, s",
                    *medians(runs, lambda o: first(o).first_byte - first(o).start),
                    fmt="{:.3f}",
                ),
                Row(
                    "time to all but the last byte, s",
                    *medians(runs, lambda o: first(o).all_but_last - first(o).start),
                ),
                Row(
                    "last byte held back, s",
                    *medians(runs, lambda o: first(o).end - first(o).all_but_last),
                    ratio=False,
                ),
                Row(
                    "upstream GETs of the blob",
                    *medians(runs, lambda o: len(o.blob_gets(layer))),
                    fmt="{:.0f}",
                ),
                Row(
                    "upstream bytes / blob size",
                    *medians(runs, lambda o: o.fetched(layer) / size),
                ),
                Row(
                    "blob in the mirror's cache, s after the client finished",
                    *medians(runs, lambda o: o.settle_s),
                    ratio=False,
                ),
                Row(
                    "mirror CPU s/GB until the client finished",
                    *medians(runs, lambda o: o.cpu_step / (size / GB)),
                ),
                Row(
                    "mirror CPU s/GB, cache fill included",
                    *medians(runs, lambda o: o.cpu / (size / GB)),
                ),
                *load_rows(runs),
            ],
            [
                f"median of {bench.args.repeat} runs, each on a fresh mirror with an empty "
                "cache; ours holds the last byte of a response back until the download has "
                "verified (docs/design.md, 'Blob path'); the reference streams the upstream "
                "response straight through while a second upstream GET fills its cache"
            ],
        )
    )
    bench.note_rss("cold miss, 1 client", runs)


def cold_many(bench: Bench) -> None:
    n = bench.args.cold_clients
    bench.log(f"workload 3: cold miss, {n} clients")
    size, layer = bench.layer_size, bench.layer

    def seen(s: Subject, i: int, obs: Obs[Blobs]) -> None:
        gets, fetched = len(obs.blob_gets(layer)), obs.fetched(layer)
        if s.label == OURS and (gets != 1 or fetched != size):
            bench.problem(f"cold x{n}: ours made {gets} upstream GETs of the blob, {fetched} bytes")
        bench.log(
            f"  {s.label} #{i + 1}: {obs.result.wall:.2f} s, {gets} upstream GETs, "
            f"{fetched / size:.2f}\u00d7 blob fetched, machine busy {obs.busy:.0%}"
        )

    runs = _cold_runs(bench, n, bench.args.repeat_cold_many, f"cold x{n}", seen)

    def streams(o: Obs[Blobs]) -> list[loadgen.Stream]:
        return o.result.streams

    bench.tables.append(
        Table(
            "cold16",
            f"Cold miss, {bench.blob_name()}, {n} concurrent clients",
            [
                Row(
                    "wall time until all finish, s",
                    *medians(runs, lambda o: o.result.wall),
                    target="\u2264 0.5\u00d7",
                ),
                Row(
                    "until every client had all but the last byte, s",
                    *medians(
                        runs,
                        lambda o: (
                            max(st.all_but_last for st in streams(o))
                            - min(st.start for st in streams(o))
                        ),
                    ),
                ),
                Row(
                    "fastest client, s",
                    *medians(runs, lambda o: min(st.end - st.start for st in streams(o))),
                ),
                Row("aggregate GB/s to clients", *medians(runs, lambda o: gbs(o.result))),
                Row(
                    "upstream bytes / blob size",
                    *medians(runs, lambda o: o.fetched(layer) / size),
                    target="ours = 1.0",
                ),
                Row(
                    "upstream GETs of the blob",
                    *medians(runs, lambda o: len(o.blob_gets(layer))),
                    fmt="{:.0f}",
                ),
                Row(
                    "upstream 401 answers (token challenges)",
                    *medians(runs, lambda o: o.challenges()),
                    fmt="{:.0f}",
                    ratio=False,
                ),
                Row("mirror CPU s", *medians(runs, lambda o: o.cpu)),
                Row(
                    "client CPU s (sha256 of every byte)",
                    *medians(runs, lambda o: o.result.cpu),
                ),
                Row("front CPU s", *medians(runs, lambda o: o.front_cpu)),
                Row("upstream registry CPU s", *medians(runs, lambda o: o.upstream_cpu)),
                *load_rows(runs),
            ],
            [
                f"median of {bench.args.repeat_cold_many} run(s) per mirror, each on a fresh "
                "empty cache; upstream figures from the counting front; every run of ours "
                "was checked for exactly one upstream GET of exactly the blob's size"
            ],
        )
    )
    bench.note_rss(f"cold miss, {n} clients", runs)
