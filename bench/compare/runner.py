"""The state of one run, and how each measured step is observed from outside the mirror."""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Generic, TypedDict, TypeVar

import loadgen
from front import Record
from harness import Registry, TestImage, TokenServer

from . import GB, MiB
from .images import build_image
from .nginx import NGINX
from .processes import OURS, REF, Subject, http_get
from .sampling import PeakRss, cpu_times, median, proc_cpu, rss_mib, tree_cpu
from .tables import Row, Table

T = TypeVar("T")
U = TypeVar("U")


@dataclass
class Obs(Generic[T]):
    """What one measured step did, seen from outside the mirror."""

    result: T
    upstream: list[Record]
    tokens: int
    rss_mib: float
    cpu: float  # the mirror's CPU seconds (all its processes)
    front_cpu: float
    busy: float  # share of all CPUs' time that was not idle during the step (0..1)
    upstream_cpu: float  # the upstream registry's CPU seconds
    rss_before: float  # the mirror's VmRSS when the step began, MiB
    harness_cpu: float  # this process: the token server's threads, the RSS sampler
    cpu_step: float  # the mirror's CPU seconds until the clients were done
    settle_s: float  # from the clients being done until the blob was in the mirror's cache

    def blob_gets(self, digest: str) -> list[Record]:
        """Upstream GETs of the blob that were answered with (part of) its body."""
        return [
            r
            for r in self.upstream
            if r.method == "GET" and r.path.endswith(digest) and 200 <= r.status < 300
        ]

    def fetched(self, digest: str) -> int:
        """Body bytes of the blob that came from the upstream."""
        return sum(r.body_bytes for r in self.blob_gets(digest))

    def challenges(self) -> int:
        """Upstream answers of 401: how a mirror learns (or renews) the token challenge."""
        return sum(r.status == 401 for r in self.upstream)


def each(by: dict[str, U], fn: Callable[[U], float]) -> tuple[float, float]:
    """fn of each mirror's entry: (reference, ours)."""
    return fn(by[REF]), fn(by[OURS])


def medians(runs: dict[str, list[Obs[T]]], fn: Callable[[Obs[T]], float]) -> tuple[float, float]:
    """The median of fn over each mirror's runs: (reference, ours)."""
    return each(runs, lambda obs: median([fn(o) for o in obs]))


class Cols(TypedDict):
    """One figure per server: the keyword arguments of a Row."""

    ref: float | None
    ours: float | None
    nginx: float | None


def _cols(runs: dict[str, list[Obs[T]]], fn: Callable[[list[Obs[T]]], float]) -> Cols:
    def get(label: str) -> float | None:
        return fn(runs[label]) if runs.get(label) else None

    return Cols(ref=get(REF), ours=get(OURS), nginx=get(NGINX))


def med(runs: dict[str, list[Obs[T]]], fn: Callable[[Obs[T]], float]) -> Cols:
    """The median of fn over each server's runs."""
    return _cols(runs, lambda obs: median([fn(o) for o in obs]))


def peak(runs: dict[str, list[Obs[T]]]) -> Cols:
    """The highest peak RSS of each server's runs."""
    return _cols(runs, lambda obs: max(o.rss_mib for o in obs))


def peak_rss(runs: dict[str, list[Obs[T]]]) -> tuple[float, float]:
    """The highest peak RSS of each mirror's runs: (reference, ours)."""
    return each(runs, lambda obs: max(o.rss_mib for o in obs))


def load_rows(
    runs: dict[str, list[Obs[T]]],
    busy: str = "machine CPU busy, %",
    rss: str = "peak RSS, MiB",
) -> list[Row]:
    """How busy the machine was and how large the mirror grew, over the runs of a step."""
    return [
        Row(busy, *medians(runs, lambda o: o.busy * 100), fmt="{:.0f}"),
        Row(rss, *peak_rss(runs), fmt="{:.0f}"),
    ]


def gbs(run: loadgen.BlobRun) -> float:
    """Aggregate GB/s of the bodies the clients received."""
    return run.total / run.wall / GB


class Bench:
    def __init__(
        self,
        args: argparse.Namespace,
        work: Path,
        tokens: TokenServer,
        registry: Registry,
        pool: ProcessPoolExecutor,
    ) -> None:
        self.args = args
        self.work = work
        self.tokens = tokens
        self.registry = registry
        self.pool = pool
        self.problems: list[str] = []
        self.tables: list[Table] = []
        self.started = time.monotonic()
        self.big: TestImage
        self.layer = ""
        self.layer_size = 0
        self.multi: TestImage
        self.multi_size = 0
        self.subjects: list[Subject] = []
        self.nginx: Subject | None = None
        self.disk: TestImage | None = None
        self.goal_notes: dict[str, str] = {}
        self.goal_values: dict[str, float] = {}
        self.capacity: Table | None = None
        self.rss_rows: dict[str, tuple[float | None, float | None]] = {}
        self.disk_gbs = float("nan")
        self.ours_env: dict[str, str] = {}
        self.mirror_version = ""
        self.client_rate: dict[int, float] = {}

    def log(self, message: str) -> None:
        print(f"[{time.monotonic() - self.started:6.1f}s] {message}", flush=True)

    def problem(self, message: str) -> None:
        self.problems.append(message)
        print(f"!!! PROBLEM: {message}", flush=True)

    def blob_name(self) -> str:
        mib = self.args.size_mib
        return f"{mib // 1024} GiB blob" if mib % 1024 == 0 else f"{mib} MiB blob"

    def table(self, key: str) -> Table:
        return next(t for t in self.tables if t.key == key)

    def row(self, key: str, metric: str) -> Row:
        return self.table(key).row(metric)

    def has_table(self, key: str) -> bool:
        return any(t.key == key for t in self.tables)

    @property
    def blob_subjects(self) -> list[Subject]:
        """The servers the blob workloads run on: the mirrors, and nginx when it runs."""
        return [*self.subjects, *([self.nginx] if self.nginx is not None else [])]

    def runs(self) -> dict[str, list[Any]]:
        return {s.label: [] for s in self.blob_subjects}

    def nginx_repos(self) -> list[str]:
        """The repositories nginx's one long-lived upstream token grants pulls of."""
        return [self.big.repo, self.multi.repo]

    def blob_path(self) -> str:
        return f"/v2/{self.big.repo}/blobs/{self.layer}"

    def build(self) -> None:
        self.log(f"building and pushing the {self.args.size_mib} MiB image")
        self.big, _ = build_image(self.work, self.registry, "bench/big", [self.args.size_mib * MiB])
        self.layer = self.big.layer_digests[1]  # [0] is the config
        manifest = json.loads(self.big.manifest)
        self.layer_size = int(manifest["layers"][0]["size"])
        sizes = [self.args.pull_layer_mib * MiB] * self.args.pull_layers
        self.log(f"building and pushing the {len(sizes)}-layer image for skopeo")
        self.multi, self.multi_size = build_image(self.work, self.registry, "bench/multi", sizes)
        self.log(
            f"blob {self.layer[:19]}… is {self.layer_size} bytes; "
            f"multi-layer image {self.multi_size / MiB:.1f} MiB"
        )

    # -- load from the worker processes

    def fetch(
        self,
        port: int,
        clients: int,
        headers: dict[str, str] | None = None,
        *,
        path: str | None = None,
        digest: str | None = None,
        verify: bool = True,
        targets: list[tuple[str, str]] | None = None,
        size: int | None = None,
    ) -> loadgen.BlobRun:
        future = self.pool.submit(
            loadgen.fetch_blobs,
            "127.0.0.1",
            port,
            path or self.blob_path(),
            digest or self.layer,
            size or self.layer_size,
            clients,
            headers=headers,
            timeout=self.args.timeout,
            verify=verify,
            targets=targets,
        )
        return future.result(self.args.timeout + 90)

    def manifest_load(
        self, port: int, path: str, headers: dict[str, str], seconds: float
    ) -> loadgen.LoadRun:
        """`--manifest-conns` closed-loop clients for `seconds`, every body's digest checked."""
        future = self.pool.submit(
            loadgen.manifest_load,
            "127.0.0.1",
            port,
            path,
            headers,
            self.big.digest,
            self.args.manifest_conns,
            seconds,
        )
        return future.result(seconds + 120)

    def check_blobs(self, run: loadgen.BlobRun, what: str) -> None:
        for failure in run.failures:
            self.problem(f"{what}: {failure}")

    def check_manifest(self, s: Subject, path: str, headers: dict[str, str], what: str) -> None:
        """One GET of the big image's manifest, which must answer with its exact bytes."""
        status, body = http_get(s.url + path, headers)
        if status != 200 or "sha256:" + hashlib.sha256(body).hexdigest() != self.big.digest:
            self.problem(f"{what} via {s.label}: {status}, wrong bytes?")

    # -- observing a step

    def observe(self, subject: Subject, step: Callable[[], T], settle: bool = False) -> Obs[T]:
        os.sync()  # no writeback left over from the previous step
        subject.front.reset()
        self.tokens.clear()
        registry_pid = self.registry._proc.pid if self.registry._proc else 0
        cpu0, fcpu0 = tree_cpu(subject.root_pid), proc_cpu(subject.front.pid)
        ucpu0, hcpu0 = proc_cpu(registry_pid), proc_cpu(os.getpid())
        rss_before = rss_mib(subject.pid)
        busy0, total0 = cpu_times()
        with PeakRss(subject.pid) as rss:
            result = step()
            busy1, total1 = cpu_times()
            cpu_step = tree_cpu(subject.root_pid) - cpu0
            stepped = time.monotonic()
            if settle:
                subject.settle(self.layer, self.layer_size)
            settled = time.monotonic() - stepped
        cpu, fcpu = tree_cpu(subject.root_pid) - cpu0, proc_cpu(subject.front.pid) - fcpu0
        ucpu, hcpu = proc_cpu(registry_pid) - ucpu0, proc_cpu(os.getpid()) - hcpu0
        busy = (busy1 - busy0) / max(total1 - total0, 1)
        time.sleep(0.2)  # the front records a request once its body is through
        return Obs(
            result,
            subject.front.stats(),
            len(self.tokens.requests),
            rss.mib,
            cpu,
            fcpu,
            busy,
            ucpu,
            rss_before,
            hcpu,
            cpu_step,
            settled,
        )

    def observe_fetch(
        self, s: Subject, clients: int, settle: bool = False, verify: bool = True
    ) -> Obs[loadgen.BlobRun]:
        return self.observe(s, lambda: self.fetch(s.port, clients, verify=verify), settle)

    def note_rss(self, key: str, runs: dict[str, list[Obs[Any]]]) -> None:
        self.rss_rows[key] = peak_rss(runs)
