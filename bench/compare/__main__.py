"""`python -m bench.compare`: the flags, the order of the steps, the report, the exit status."""

from __future__ import annotations

import argparse
import contextlib
import shutil
import sys
import tempfile
import time
from pathlib import Path

from front import Front
from harness import Registry, TokenServer

from . import REPO_ROOT
from . import __doc__ as overview
from .capacity import harness_capacity
from .cold import cold_many, cold_single
from .disk import cold_disk_latency
from .manifests import latency_under_load, manifests_by_tag
from .nginx import Nginx, nginx_binary
from .plots import plots
from .processes import OURS, Ours, Reference, export_mirror, worker_pool
from .report import DOC, IMG_DIR, print_report, section, write_doc
from .runner import Bench
from .sampling import disk_write_rate
from .skopeo import skopeo
from .warm import many_streams, warm
from .workers import workers_scaling


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench.compare",
        description=overview.splitlines()[0] if overview else None,
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="smoke run: 128 MiB blob, 1 repeat, short load phases; prints only",
    )
    parser.add_argument("--size-mib", type=int, help="big layer size [1024; quick: 128]")
    parser.add_argument("--repeat", type=int, help="runs per measurement [3; quick: 1]")
    parser.add_argument("--warm-clients", type=int, default=8)
    parser.add_argument("--cold-clients", type=int, default=16)
    parser.add_argument("--rss-streams", type=int, default=64)
    parser.add_argument(
        "--rss-both",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="also run the many-streams RSS step on the reference [full: yes; quick: no]",
    )
    parser.add_argument(
        "--malloc-variant",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="also measure ours with glibc's default mmap threshold in the many-streams step",
    )
    parser.add_argument(
        "--disk-blob-mib",
        type=int,
        help="size of each distinct blob read uncached in the latency step [= --size-mib]",
    )
    parser.add_argument("--manifest-conns", type=int, default=64)
    parser.add_argument("--manifest-seconds", type=float, help="load phase [5; quick: 2]")
    parser.add_argument(
        "--probe-interval", type=float, default=0.01, help="seconds between latency probes at most"
    )
    parser.add_argument("--pull-layers", type=int, help="skopeo image layers [8; quick: 4]")
    parser.add_argument("--pull-layer-mib", type=int, help="skopeo layer size [32; quick: 8]")
    parser.add_argument(
        "--repeat-cold-many", type=int, help="runs of the many-client cold miss [2; quick: 1]"
    )
    parser.add_argument(
        "--mirror-rev",
        metavar="REV",
        help="run our mirror from `git archive REV mirror/` instead of the working tree",
    )
    parser.add_argument("--timeout", type=float, default=300, help="per blob transfer, s")
    parser.add_argument(
        "--write-docs",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="update docs/benchmarks.md and docs/img/ [full: yes; quick: no]",
    )
    args = parser.parse_args(argv)
    defaults = {
        "size_mib": (1024, 128),
        "repeat": (3, 1),
        "repeat_cold_many": (2, 1),
        "manifest_seconds": (5.0, 2.0),
        "pull_layers": (8, 4),
        "pull_layer_mib": (32, 8),
        "rss_both": (True, False),
        "write_docs": (True, False),
    }
    for key, (full, quick) in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, quick if args.quick else full)
    if args.disk_blob_mib is None:
        args.disk_blob_mib = args.size_mib
    return args


def run(bench: Bench) -> None:
    if bench.args.mirror_rev:
        bench.ours_env, name = export_mirror(bench.args.mirror_rev, bench.work)
        bench.mirror_version = f"{name}, run from `git archive`"
        bench.log(f"our mirror runs from {name}, not the working tree")
    bench.disk_gbs = disk_write_rate(bench.work)
    bench.log(f"disk: {bench.disk_gbs:.2f} GB/s writing 256 MiB and fsyncing it")
    bench.build()
    fronts = [Front("127.0.0.1", bench.registry.port).start() for _ in range(3)]
    try:
        bench.subjects = [
            Reference(bench.work, fronts[0]),
            Ours(bench.work, fronts[1], env=bench.ours_env),
        ]
        bench.nginx = Nginx(bench.work, fronts[2], bench.tokens, bench.nginx_repos())
        harness_capacity(bench, fronts[1])
        # In this order: warm and many_streams serve the blob a cold step before them cached.
        for workload in (
            cold_single,
            warm,
            manifests_by_tag,
            cold_many,
            latency_under_load,
            many_streams,
            skopeo,
            cold_disk_latency,
            workers_scaling,
        ):
            workload(bench)
    finally:
        for s in bench.blob_subjects:
            with contextlib.suppress(Exception):
                s.stop()
        for f in fronts:
            f.stop()
    for s in bench.subjects:
        for line, count in s.findings.items():
            if s.label == OURS:
                bench.problem(f"our mirror's log: {count} x {line}")


def main() -> None:
    args = parse_args()
    for tool in ("skopeo", "docker-registry"):
        if shutil.which(tool) is None:
            sys.exit(f"{tool} is not on PATH (bash scripts/system-deps.sh)")
    if nginx_binary() is None:
        sys.exit("nginx is not installed (bash scripts/system-deps.sh)")
    started = time.monotonic()
    with (
        tempfile.TemporaryDirectory(prefix="compare-") as tmp,
        TokenServer(Path(tmp)) as tokens,
        Registry(Path(tmp) / "upstream", tokens) as registry,
        worker_pool() as pool,
    ):
        bench = Bench(args, Path(tmp), tokens, registry, pool)
        run(bench)
    seconds = time.monotonic() - started

    print_report(bench, seconds)
    if args.write_docs:
        images = plots(bench, IMG_DIR)
        write_doc(section(bench, images, seconds))
        print(f"\nwrote {DOC.relative_to(REPO_ROOT)} and {', '.join(str(p) for p in images)}")
    if bench.problems:
        print("\n" + "!" * 80)
        print(f"{len(bench.problems)} PROBLEM(S) IN THIS RUN:")
        for p in bench.problems:
            print(f"  - {p}")
        print("!" * 80)
        sys.exit(1)
    print("\nno problems: every digest matched, every answer was 200, logs are clean")


if __name__ == "__main__":
    main()
