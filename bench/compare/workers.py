"""Ours with `workers: 2` against `workers: 1`: aggregate warm throughput, 8 clients,
and manifests by tag (where one event loop, not the clients, is the limit).

Runs only when `mirror serve` has the setting (its --help names `--workers`); the goal
table says "n/a (no workers setting)" otherwise.
"""

from __future__ import annotations

import os
import subprocess
import sys
from functools import partial

import loadgen
from harness import OCI_MANIFEST

from . import GB
from .processes import OURS, Ours
from .runner import Bench, Obs, gbs
from .sampling import median
from .tables import Row, Table

KEY = "workers"
TAGS = "workers_tags"  # the goal value of manifests by tag, workers 2 / 1
NO_SETTING = "n/a (no workers setting)"


def has_workers_setting(env: dict[str, str]) -> bool:
    """Whether the `mirror serve` under test (the tree, or --mirror-rev's) has --workers."""
    try:
        out = subprocess.run(
            [sys.executable, "-m", "mirror", "serve", "--help"],
            capture_output=True,
            text=True,
            timeout=60,
            env={**os.environ, **env},
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return False
    return "--workers" in out


def workers_scaling(bench: Bench) -> None:
    n = bench.args.warm_clients
    ours = next(s for s in bench.subjects if isinstance(s, Ours) and s.label == OURS)
    if not has_workers_setting(ours.extra_env):
        bench.log(f"workload 9: workers 2 vs 1: {NO_SETTING}")
        bench.goal_notes[KEY] = NO_SETTING
        return
    bench.log(f"workload 9: ours with workers 1 and 2, {n} warm clients counting bytes")
    rates: dict[int, float] = {}
    cpus: dict[int, float] = {}
    busy: dict[int, float] = {}
    cores: dict[int, float] = {}  # the mirror's processes, in cores, during the blob runs
    tags: dict[int, float] = {}  # manifest by tag, requests/s
    path = f"/v2/{bench.big.repo}/manifests/{bench.big.tag}"
    headers = {"Accept": OCI_MANIFEST}
    for workers in (1, 2):
        alt = Ours(
            bench.work,
            ours.front,
            env={**ours.extra_env, "MIRROR_WORKERS": str(workers)},
            label=f"ours-workers{workers}",
        )
        runs: list[Obs[loadgen.BlobRun]] = []
        try:
            alt.fresh()
            bench.check_blobs(bench.fetch(alt.port, 1), f"cache fill via {alt.label}")
            alt.settle(bench.layer, bench.layer_size)
            for _ in range(bench.args.repeat):
                obs = bench.observe_fetch(alt, n, verify=False)
                bench.check_blobs(obs.result, f"warm x{n} via {alt.label}")
                runs.append(obs)
            # Where the mirror itself is the limit (one event loop per process, light
            # clients), a second worker shows: manifests by tag, from the tag cache.
            bench.check_manifest(alt, path, headers, f"manifest by tag via {alt.label}")
            load = partial(
                bench.manifest_load, alt.port, path, headers, bench.args.manifest_seconds
            )
            tag_run = bench.observe(alt, load).result
            if tag_run.bad or tag_run.errors:
                bench.problem(f"manifest by tag via {alt.label}: {tag_run.bad} bad answers")
            tags[workers] = tag_run.requests / tag_run.seconds
        finally:
            alt.stop()
        for line, count in alt.findings.items():
            bench.problem(f"{alt.label} log: {count} x {line}")
        rates[workers] = median([gbs(o.result) for o in runs])
        cpus[workers] = median([o.cpu / (o.result.total / GB) for o in runs])
        busy[workers] = median([o.busy * 100 for o in runs])
        cores[workers] = median([o.cpu_step / o.result.wall for o in runs])
        bench.log(f"  workers {workers}: {rates[workers]:.2f} GB/s, {cpus[workers]:.2f} CPU-s/GB")
    bench.goal_values[KEY] = rates[2] / rates[1]
    bench.goal_values[TAGS] = tags[2] / tags[1]
    bench.tables.append(
        Table(
            KEY,
            f"Ours with several workers: warm hit, {bench.blob_name()}, {n} clients "
            "counting bytes only",
            [
                Row(f"aggregate GB/s, {n} clients", rates[1], rates[2], target="> 1.0\u00d7"),
                Row("CPU s/GB, all processes", cpus[1], cpus[2]),
                Row("the mirror's processes, cores busy (blob runs)", cores[1], cores[2]),
                Row("machine CPU busy %, blob runs", busy[1], busy[2], fmt="{:.0f}"),
                Row(
                    f"manifest by tag, requests/s ({bench.args.manifest_conns} connections)",
                    tags[1],
                    tags[2],
                    fmt="{:.0f}",
                ),
            ],
            [
                f"median of {bench.args.repeat} runs each; `MIRROR_WORKERS` in the "
                "environment; each on its own fresh cache directory, filled by one GET first"
            ],
            ("metric", "workers: 1", "workers: 2", "2 / 1", "target"),
        )
    )
