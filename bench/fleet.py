"""Fleet rollout through mirror tiers: K edge mirrors chained to one central mirror, all
pulling one image at once (issue 15's simulation of a DaemonSet rollout).

Real processes on loopback: the real Distribution registry with token auth (the tests'
harness), one central `mirror serve` in front of it, and K edge `mirror serve`
processes with small caches, each configured as a node-local mirror would be: upstream
docker.io = the registry, with `mirrors: [central]` (edge -> central -> registry).
Every run pushes a new image (--layers-mib: several layers of random bytes, so gzip
cannot shrink them) and starts a new central and K new edges with empty caches. Then
every edge pulls the image at the same moment, as K nodes would when a DaemonSet's
pods start:

  up        the central tier stays up all along;
  killed    the central tier is SIGKILLed once half the edges have received their first
            layer bytes: the edges' downloads from it break, continue from the registry
            with Range, and the central's circuit opens (MIRROR_TIER_BACKOFF small), so
            the rest of the rollout goes to the registry. Every pull must still complete.
  stopped   (only with --cases) the same moment, SIGSTOP instead: a hung central, whose
            kernel still accepts connections; the edges wait for their timeouts (about
            80 s with the defaults) before the registry takes over.

The pulls are threads of this process, one client per edge doing what a container
runtime does: GET the manifest by tag (its sha256 checked against the pushed digest),
GET the config blob, then the layers, --parallel at a time (docker: 3), each blob's
length and sha256 checked. No retries: a pull that fails is reported as failed.

Figures per run: registry GETs per blob (its access log: GET .../blobs/<digest>, 200
or 206), registry bytes; wall time from the common start to the last pull done and
each edge's pull time; edge->central bytes (the edges' mirror_tier_bytes_total
{tier="central"}, and the central's mirror_served_bytes_total while it lives);
central->registry bytes (the central's mirror_upstream_bytes_total; after a kill, the
registry's log minus what the edges took from it); edges that fell back (received
blob bytes from the registry); RSS (VmRSS, VmHWM from /proc/PID/status) of each edge
and of the central; CPU-s (utime + stime from /proc/PID/stat, start to last pull) of
the edges (sum), the central, the registry and the clients (this process). GB is
10**9 bytes. Medians over --repeat rounds; each round runs every case, in a random
order, for each --edges count. Then a paper extrapolation to --extrapolate nodes from
the measured per-edge and central costs.

The mirror processes run this checkout's `mirror` package (checked at the start):

    .venv/bin/python bench/fleet.py [--edges 20[,50]] [--repeat 2] [--layers-mib 12,10,6,4]
        [--cases up,killed[,stopped]] [--edge-setting MIRROR_X=V ...] [--keep-logs DIR]
        [--write-docs]   # rewrites the tables of its section in docs/benchmarks.md

Memory: an idle mirror process is about 80 MiB RSS; the run refuses more edges than
fit in 80% of MemAvailable at 120 MiB each.
"""

from __future__ import annotations

import argparse
import hashlib
import http.client
import json
import math
import os
import random
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT / "tests"))
# The mirror processes (`python -m mirror`) import this checkout's package, whatever
# the venv has installed in editable mode.
os.environ["PYTHONPATH"] = os.pathsep.join(
    [str(REPO_ROOT), str(REPO_ROOT / "tests"), *filter(None, [os.environ.get("PYTHONPATH")])]
)

from harness import MANIFEST_ACCEPT, Layout, Registry, TokenServer, push  # noqa: E402
from harness.daemon import free_port  # noqa: E402
from harness.mirror import MirrorProcess  # noqa: E402

GB = 1e9
MiB = 1 << 20
CHUNK = MiB  # the clients' receive buffer
REPO = "bench/fleet"
UPSTREAM = "docker.io"  # the edges' and the central's name for the registry
TIER = "central"
DOCS = REPO_ROOT / "docs" / "benchmarks.md"
BEGIN = "<!-- bench/fleet.py: begin -->"
END = "<!-- bench/fleet.py: end -->"
# What happens to the central tier half-way: nothing, SIGKILL (a crash: connections
# refused), SIGSTOP (a hang: connections accepted by the kernel, never answered).
CASES: dict[str, signal.Signals | None] = {
    "up": None,
    "killed": signal.SIGKILL,
    "stopped": signal.SIGSTOP,
}
EDGE_RSS_BUDGET = 120 * MiB  # per process, for the memory check
NIC_GBIT = 10.0  # the central's network link in the extrapolation
_CLK_TCK = os.sysconf("SC_CLK_TCK")
NCPU = os.cpu_count() or 1
_TROUBLE = re.compile(r"\b(WARNING|ERROR|CRITICAL)\b|Traceback")
# What makes two log lines the same kind: times, digests, addresses, numbers.
_NOISE = (
    (re.compile(r"^\S+ \S+ "), ""),
    (re.compile(r"sha256:[0-9a-f]{64}"), "<digest>"),
    (re.compile(r"\b\d+\.\d+\.\d+\.\d+:\d+"), "<host>"),
    (re.compile(r"\b\d+\b"), "N"),
)


# -- meters -------------------------------------------------------------------------------------


def cpu(pid: int) -> float:
    """CPU-seconds of a process, utime + stime (fields 14 and 15 of /proc/PID/stat,
    counted after the ")" that closes the command name)."""
    stat = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(stat[11]) + int(stat[12])) / _CLK_TCK


def memory(pid: int) -> tuple[int, int]:
    """(VmRSS, VmHWM) of a process, in bytes."""
    found: dict[str, int] = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            found[key] = int(value.split()[0]) * 1024
    return found["VmRSS"], found["VmHWM"]


def busy() -> tuple[float, float]:
    """CPU-seconds the whole machine has been busy (all cores, /proc/stat): in tasks
    (and stolen by the hypervisor), and in interrupts (which no task is charged for)."""
    fields = Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]
    user, nice, system, _, _, irq, softirq, steal = (int(x) for x in fields[:8])
    return (user + nice + system + steal) / _CLK_TCK, (irq + softirq) / _CLK_TCK


def kernel_threads() -> dict[int, float]:
    """CPU-seconds of each kernel thread (ppid 2: softirq work of loopback traffic,
    writeback of the caches' files), which work for this benchmark too. By pid: kworkers
    come and go, so a difference of two sums could even be negative."""
    found: dict[int, float] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (FileNotFoundError, ProcessLookupError):
            continue
        if fields[1] == "2":
            found[int(stat.parent.name)] = (int(fields[11]) + int(fields[12])) / _CLK_TCK
    return found


def mem_available() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no MemAvailable in /proc/meminfo")


def metric_sum(samples: dict[tuple[str, tuple[tuple[str, str], ...]], float], name: str,
               **labels: str) -> float:  # fmt: skip
    """A metric summed over the labels not given."""
    return sum(
        value
        for (sample, sample_labels), value in samples.items()
        if sample == name and all((k, v) in sample_labels for k, v in labels.items())
    )


# -- the image ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Image:
    tag: str
    digest: str  # of the manifest
    blobs: tuple[tuple[str, int], ...]  # (digest, size): the config, then the layers

    @property
    def size(self) -> int:
        """Blob bytes a node pulls (the manifest is a few hundred bytes more)."""
        return sum(size for _, size in self.blobs)


def build_image(work: Path, registry: Registry, layers_mib: Sequence[float], tag: str) -> Image:
    """Push an image of random-byte layers; each run gets new bytes, so nothing is warm."""
    layout = Layout(work / f"layout-{tag}")
    layers = [[(f"opt/layer{i}.bin", os.urandom(int(m * MiB)))] for i, m in enumerate(layers_mib)]
    descriptor = layout.image(layers)
    layout.tag(descriptor, tag)
    digest = push(layout.root, tag, registry, REPO, tag)
    if digest != descriptor["digest"]:
        raise RuntimeError(f"pushed {digest}, the layout has {descriptor['digest']}")
    manifest = json.loads(layout.read(digest))
    shutil.rmtree(layout.root)
    blobs = [manifest["config"], *manifest["layers"]]
    return Image(tag, digest, tuple((b["digest"], int(b["size"])) for b in blobs))


# -- the clients --------------------------------------------------------------------------------


class PullError(Exception):
    pass


@dataclass
class Pull:
    """One node's pull through its edge: times from the common start, in seconds."""

    edge: int
    manifest: float = 0.0  # manifest received and checked
    first: float = 0.0  # first layer byte
    done: float = 0.0
    nbytes: int = 0  # blob bytes received and verified
    error: str | None = None


@contextmanager
def _get(port: int, path: str, accept: str | None = None) -> Iterator[http.client.HTTPResponse]:
    """A 200 response, on a connection of its own (as runtimes mostly open one per
    request). The timeout is per read: a hung central holds an edge's answer for its
    read_timeout plus fetch_timeout (80 s by default) before the registry takes over."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=300)
    try:
        headers = {"Connection": "close", **({"Accept": accept} if accept else {})}
        conn.request("GET", path, headers=headers)
        resp = conn.getresponse()
        if resp.status != 200:
            raise PullError(f"GET {path[:80]}: {resp.status} {resp.read(200)!r}")
        yield resp
    finally:
        conn.close()


def _fetch_blob(port: int, digest: str, size: int, on_bytes: Callable[[], None]) -> int:
    buf = memoryview(bytearray(CHUNK))
    sha = hashlib.sha256()
    got = 0
    with _get(port, f"/v2/{REPO}/blobs/{digest}") as resp:
        try:
            while n := resp.readinto(buf):
                if not got:
                    on_bytes()
                sha.update(buf[:n])
                got += n
        except (OSError, http.client.HTTPException) as exc:
            raise PullError(f"blob {digest[:19]} broke: {exc!r}") from exc
    if got != size or f"sha256:{sha.hexdigest()}" != digest:
        raise PullError(f"blob {digest[:19]}: {got} of {size} bytes, or the wrong digest")
    return got


def pull(
    edge: int,
    port: int,
    image: Image,
    t0: float,
    parallel: int,
    on_layer_bytes: Callable[[int], None],
) -> Pull:
    """What a container runtime does through a mirror: the manifest by tag, the config,
    then the layers `parallel` at a time; every digest checked."""
    result = Pull(edge)
    lock = threading.Lock()

    def layer_bytes() -> None:
        with lock:
            if result.first:
                return
            result.first = time.perf_counter() - t0
        on_layer_bytes(edge)

    try:
        with _get(port, f"/v2/{REPO}/manifests/{image.tag}", MANIFEST_ACCEPT) as resp:
            body = resp.read()
        if f"sha256:{hashlib.sha256(body).hexdigest()}" != image.digest:
            raise PullError("the manifest's digest is not the pushed one")
        manifest = json.loads(body)
        result.manifest = time.perf_counter() - t0
        config = manifest["config"]
        result.nbytes += _fetch_blob(port, config["digest"], config["size"], lambda: None)
        with ThreadPoolExecutor(parallel) as pool:
            sizes = pool.map(
                lambda layer: _fetch_blob(port, layer["digest"], layer["size"], layer_bytes),
                manifest["layers"],
            )
            result.nbytes += sum(sizes)
    except (PullError, OSError, http.client.HTTPException, ValueError, KeyError) as exc:
        result.error = f"{type(exc).__name__}: {exc}"
    result.done = time.perf_counter() - t0
    return result


# -- one rollout --------------------------------------------------------------------------------


@dataclass
class Sample:
    case: str
    edges: int
    round: int
    image_bytes: int
    pulls: list[Pull]
    kill_at: float | None  # seconds after the start
    values: dict[str, float] = field(default_factory=dict)

    @property
    def wall(self) -> float:
        return max(p.done for p in self.pulls)

    def durations(self) -> list[float]:
        return sorted(p.done for p in self.pulls if p.error is None)


def ports(n: int) -> list[int]:
    """`n` different free ports: free_port() may give one twice, and a mirror whose port
    another one took would exit while its readiness check reached the other."""
    found: set[int] = set()
    while len(found) < n:
        found.add(free_port())
    return sorted(found)


def start_all(procs: Sequence[MirrorProcess]) -> None:
    """Start the processes at once (their imports take about 1 CPU-s each)."""
    with ThreadPoolExecutor(len(procs)) as pool:
        for future in [pool.submit(p.start, 300) for p in procs]:
            future.result()
    time.sleep(0.5)
    dead = [p.workdir.name for p in procs if not p.running]
    if dead:
        raise RuntimeError(f"mirror processes exited after their start: {dead}")


def stop_all(procs: Sequence[MirrorProcess], trouble: Counter[str]) -> None:
    with ThreadPoolExecutor(len(procs)) as pool:
        list(pool.map(lambda p: p.stop(), procs))
    for proc in procs:
        for line in proc.log().splitlines():
            if _TROUBLE.search(line):
                for pattern, replacement in _NOISE:
                    line = pattern.sub(replacement, line)
                trouble[line.strip()] += 1


class Fleet:
    def __init__(self, work: Path, registry: Registry, tokens: TokenServer,
                 args: argparse.Namespace) -> None:  # fmt: skip
        self.work = work
        self.registry = registry
        self.tokens = tokens
        self.args = args
        self.samples: list[Sample] = []
        self.trouble: dict[str, Counter[str]] = {case: Counter() for case in args.cases}

    def rollout(self, case: str, k: int, rnd: int) -> Sample:
        args = self.args
        tag = f"r{rnd}-{case}-{k}"
        image = build_image(self.work, self.registry, args.layers_mib, tag)
        run = self.work / tag
        central_port, *edge_ports = ports(k + 1)
        central = MirrorProcess(
            run / "central",
            None,
            env={"MIRROR_UPSTREAMS": json.dumps([{"name": UPSTREAM, "url": self.registry.url}])},
            port=central_port,
        )
        upstreams = json.dumps(
            [
                {
                    "name": UPSTREAM,
                    "url": self.registry.url,
                    "mirrors": [{"name": TIER, "url": central.url}],
                }
            ]
        )
        edge_env = {
            "MIRROR_UPSTREAMS": upstreams,
            "MIRROR_MAX_SIZE": args.edge_cache,
            "MIRROR_TIER_BACKOFF": str(args.backoff),
            **dict(setting.split("=", 1) for setting in args.edge_setting),
        }
        edges = [
            MirrorProcess(run / f"edge{i}", None, env=edge_env, port=port)
            for i, port in enumerate(edge_ports)
        ]
        everyone = [central, *edges]
        try:
            start_all(everyone)
            return self._timed(case, k, rnd, image, central, edges)
        finally:
            stop_all(everyone, self.trouble[case])
            if args.keep_logs is not None:
                for proc in everyone:
                    dest = args.keep_logs / tag / f"{proc.workdir.name}.log"
                    dest.parent.mkdir(parents=True, exist_ok=True)
                    shutil.copyfile(proc.log_path, dest)
            shutil.rmtree(run, ignore_errors=True)

    def _timed(self, case: str, k: int, rnd: int, image: Image, central: MirrorProcess,
               edges: list[MirrorProcess]) -> Sample:  # fmt: skip
        args = self.args
        assert central.pid is not None and self.registry.pid is not None
        central_pid, registry_pid = central.pid, self.registry.pid
        edge_pids = [e.pid for e in edges if e.pid is not None]
        time.sleep(1.0)  # the start-up's last work (imports, the first eviction round) ends
        self.registry.clear_log()
        self.tokens.clear()
        idle = [memory(pid)[0] for pid in edge_pids]
        central_idle = memory(central_pid)[0]
        edges_cpu0 = sum(cpu(pid) for pid in edge_pids)
        central_cpu0, registry_cpu0 = cpu(central_pid), cpu(registry_pid)
        clients_cpu0, busy0, kthreads0 = time.process_time(), busy(), kernel_threads()

        # The kill: once half the edges have received layer bytes.
        sig = CASES[case]
        threshold = math.ceil(k / 2)
        receiving: set[int] = set()
        cond = threading.Condition()
        stop_killer = threading.Event()
        kill: dict[str, float] = {}

        def on_layer_bytes(edge: int) -> None:
            with cond:
                receiving.add(edge)
                cond.notify_all()

        gate = threading.Barrier(k + 1)
        start: list[float] = []

        def node(i: int) -> Pull:
            gate.wait()
            return pull(i, edges[i].port, image, start[0], args.parallel, on_layer_bytes)

        def killer() -> None:
            assert sig is not None
            with cond:
                while len(receiving) < threshold and not stop_killer.is_set():
                    cond.wait(0.01)
                if stop_killer.is_set():
                    return
                kill["at"] = time.perf_counter() - start[0]
                kill["receiving"] = len(receiving)
            # What the central used until its death, then the death itself.
            kill["central_cpu"] = cpu(central_pid) - central_cpu0
            kill["central_rss"], kill["central_hwm"] = memory(central_pid)
            if sig == signal.SIGKILL:
                central.terminate(sig, timeout=10)
            else:
                os.kill(central_pid, sig)

        with ThreadPoolExecutor(k + 1) as pool:
            futures = [pool.submit(node, i) for i in range(k)]
            kill_thread = pool.submit(killer) if sig is not None else None
            time.sleep(0.1)  # every client at the gate
            start.append(time.perf_counter())
            gate.wait()
            pulls = [f.result() for f in futures]
            stop_killer.set()
            with cond:
                cond.notify_all()
            if kill_thread is not None:
                kill_thread.result()
            if sig == signal.SIGSTOP:
                os.kill(central_pid, signal.SIGCONT)
        # Meters first: scraping the metrics costs the processes CPU.
        values: dict[str, float] = {
            "edges_cpu": sum(cpu(pid) for pid in edge_pids) - edges_cpu0,
            "registry_cpu": cpu(registry_pid) - registry_cpu0,
            "clients_cpu": time.process_time() - clients_cpu0,
        }
        busy1, kthreads1 = busy(), kernel_threads()
        after = [memory(pid) for pid in edge_pids]
        values["edge_idle_rss_med"] = statistics.median(idle)
        values["edge_rss_med"] = statistics.median(r for r, _ in after)
        values["edge_rss_max"] = max(r for r, _ in after)
        values["edge_hwm_med"] = statistics.median(h for _, h in after)
        values["edge_hwm_max"] = max(h for _, h in after)
        values["central_idle_rss"] = central_idle
        if "at" in kill:
            values["central_cpu"] = kill["central_cpu"]
            values["central_rss"], values["central_hwm"] = kill["central_rss"], kill["central_hwm"]
            values["kill_receiving"] = kill["receiving"]
            values["kill_done"] = sum(1 for p in pulls if p.done <= kill["at"])
        elif sig is not None:
            raise RuntimeError("the rollout ended before the kill's trigger")
        else:
            values["central_cpu"] = cpu(central_pid) - central_cpu0
            values["central_rss"], values["central_hwm"] = memory(central_pid)
        # What the machine did besides (another job skews every figure on 2 cores): its
        # busy time less this benchmark's processes and the kernel's work, as a share
        # of its cores; and the kernel's share (loopback softirq, writeback).
        wall = max(p.done for p in pulls)
        # Threads born since count whole; those that ended since are lost (a few ticks).
        kthreads = sum(t - kthreads0.get(pid, 0.0) for pid, t in kthreads1.items())
        kernel = kthreads + (busy1[1] - busy0[1])
        ours = values["edges_cpu"] + values["central_cpu"] + values["registry_cpu"]
        ours += values["clients_cpu"] + kthreads
        values["other_load"] = max(0.0, busy1[0] - busy0[0] - ours) / (wall * NCPU)
        values["kernel_load"] = kernel / (wall * NCPU)

        time.sleep(0.5)  # Distribution writes its access-log line after the response
        self._registry_figures(image, values)
        self._mirror_figures(image, central, edges, values)
        sample = Sample(case, k, rnd, image.size, pulls, kill.get("at"), values)
        self.samples.append(sample)
        self.log(sample)
        return sample

    def _registry_figures(self, image: Image, values: dict[str, float]) -> None:
        requests = self.registry.requests()
        gets = Counter(
            r.path.rsplit("/", 1)[1]
            for r in requests
            if r.method == "GET" and "/blobs/" in r.path and r.status in (200, 206)
        )
        per_blob = [gets.get(digest, 0) for digest, _ in image.blobs]
        values["registry_gets_total"] = sum(per_blob)
        values["registry_gets_per_blob_max"] = max(per_blob)
        values["registry_gets_per_blob_min"] = min(per_blob)
        values["registry_gets_per_blob_mean"] = sum(per_blob) / len(per_blob)
        values["registry_ranges"] = sum(
            1 for r in requests if r.method == "GET" and "/blobs/" in r.path and r.status == 206
        )
        values["registry_blob_bytes"] = sum(
            r.size or 0 for r in requests if r.method == "GET" and "/blobs/" in r.path
        )
        values["registry_manifest_requests"] = sum(1 for r in requests if "/manifests/" in r.path)
        values["registry_requests"] = len(requests)
        values["token_fetches"] = len(self.tokens.requests)

    def _mirror_figures(self, image: Image, central: MirrorProcess, edges: list[MirrorProcess],
                        values: dict[str, float]) -> None:  # fmt: skip
        with ThreadPoolExecutor(8) as pool:
            scraped = list(pool.map(lambda e: e.metrics(), edges))
        from_central = [metric_sum(m, "mirror_tier_bytes_total", tier=TIER) for m in scraped]
        from_registry = [metric_sum(m, "mirror_tier_bytes_total", tier=UPSTREAM) for m in scraped]
        values["edge_from_central_bytes"] = sum(from_central)
        values["edge_from_registry_bytes"] = sum(from_registry)
        values["edges_fell_back"] = sum(1 for b in from_registry if b > 0)
        values["edges_registry_answers"] = sum(
            1
            for m in scraped
            if metric_sum(m, "mirror_tier_requests_total", tier=UPSTREAM, result="ok") > 0
        )
        values["edges_circuit_open"] = sum(
            1 for m in scraped if metric_sum(m, "mirror_tier_state", tier=TIER) > 0
        )
        values["edge_tier_errors"] = sum(
            metric_sum(m, "mirror_tier_requests_total", tier=TIER, result="error") for m in scraped
        )
        values["edge_served_bytes"] = sum(
            metric_sum(m, "mirror_served_bytes_total") for m in scraped
        )
        if central.running:
            m = central.metrics()
            values["central_served_bytes"] = metric_sum(m, "mirror_served_bytes_total")
            values["central_upstream_bytes"] = metric_sum(m, "mirror_upstream_bytes_total")
        else:
            # Dead: what the registry sent, less what the edges took from it themselves.
            values["central_upstream_bytes"] = (
                values["registry_blob_bytes"] - values["edge_from_registry_bytes"]
            )

    def log(self, s: Sample) -> None:
        v = s.values
        failed = sum(1 for p in s.pulls if p.error)
        d = s.durations()
        kill = f" killed at {s.kill_at:.2f} s" if s.kill_at is not None else ""
        print(
            f"r{s.round} {s.case:6} K={s.edges:<3} wall {s.wall:6.2f} s  pull med "
            f"{statistics.median(d) if d else 0:.2f} max {max(d) if d else 0:.2f}  failed "
            f"{failed}  registry GETs/blob {v['registry_gets_per_blob_mean']:.1f} "
            f"(max {v['registry_gets_per_blob_max']:.0f})  fell back {v['edges_fell_back']:.0f}"
            f"  edges {v['edges_cpu']:.1f} CPU-s, central {v['central_cpu']:.2f}{kill}",
            flush=True,
        )
        for p in s.pulls:
            if p.error:
                print(f"   edge {p.edge}: {p.error}", flush=True)


# -- the report ---------------------------------------------------------------------------------


def med(values: Sequence[float]) -> float:
    return statistics.median(values)


def spread(values: Sequence[float], fmt: str = ".2f") -> str:
    if not values:
        return "\u2013"
    if f"{min(values):{fmt}}" == f"{max(values):{fmt}}":
        return f"{values[0]:{fmt}}"
    return f"{med(values):{fmt}} ({min(values):{fmt}}-{max(values):{fmt}})"


def quantile(values: Sequence[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, math.ceil(q * len(ordered)) - 1))]


def report(fleet: Fleet) -> str:
    args = fleet.args
    samples = fleet.samples
    columns = [(k, case) for k in args.edges for case in args.cases]

    def group(k: int, case: str) -> list[Sample]:
        return [s for s in samples if s.edges == k and s.case == case]

    image = samples[0].image_bytes
    out: list[str] = []
    layers = " + ".join(f"{m:g}" for m in args.layers_mib)
    out.append(
        f"Image: {len(args.layers_mib)} layers of random bytes ({layers} MiB) and a config, "
        f"{image / MiB:.1f} MiB of blobs ({image / 1e6:.1f} MB); each client pulls "
        f"{args.parallel} layers at a time. Medians of {args.repeat} rounds (min-max in "
        "brackets); a new image, central and edges for every run."
    )
    out.append("")
    head = " | ".join(f"{k} edges, central {case}" for k, case in columns)
    out.append(f"| metric | {head} |")
    out.append("|---|" + "---:|" * len(columns))

    def row(label: str, get: Callable[[Sample], float | None], fmt: str = ".2f") -> None:
        cells = []
        for k, case in columns:
            got = [v for s in group(k, case) if (v := get(s)) is not None]
            cells.append(spread(got, fmt))
        out.append(f"| {label} | " + " | ".join(cells) + " |")

    def v(key: str, scale: float = 1.0) -> Callable[[Sample], float | None]:
        return lambda s: s.values[key] / scale if key in s.values else None

    row("pulls completed (of the edges)", lambda s: sum(1 for p in s.pulls if p.error is None),
        ".0f")  # fmt: skip
    row("wall time, first request to last pull done, s", lambda s: s.wall)
    row("pull time per edge, fastest, s", lambda s: min(s.durations(), default=None))
    row("pull time per edge, median, s", lambda s: med(s.durations()) if s.durations() else None)
    row("pull time per edge, p90, s", lambda s: quantile(s.durations(), 0.9))
    row("pull time per edge, slowest, s", lambda s: max(s.durations(), default=None))
    row("central killed at, s", lambda s: s.kill_at)
    row("edges receiving layer bytes at the kill", v("kill_receiving"), ".0f")
    row("pulls done at the kill", v("kill_done"), ".0f")
    row("registry GETs per blob, mean over the blobs", v("registry_gets_per_blob_mean"))
    row("registry GETs per blob, most for one blob", v("registry_gets_per_blob_max"), ".0f")
    row("of which continuations with Range (206)", v("registry_ranges"), ".0f")
    row("registry blob bytes / image size", v("registry_blob_bytes", image))
    row("registry manifest requests (GET, HEAD, 401s)", v("registry_manifest_requests"), ".0f")
    row("token fetches", v("token_fetches"), ".0f")
    row("edge \u2192 central bytes / image size (edges' tier bytes)",
        v("edge_from_central_bytes", image))  # fmt: skip
    row("central served bytes / image size (its own count)", v("central_served_bytes", image))
    row("central \u2192 registry bytes / image size", v("central_upstream_bytes", image))
    row("edges that fell back (blob bytes from the registry)", v("edges_fell_back"), ".0f")
    row("edge \u2192 registry bytes / image size (all edges)", v("edge_from_registry_bytes", image))
    row("edges whose central circuit is open at the end", v("edges_circuit_open"), ".0f")
    row("edge CPU-s, sum over the edges", v("edges_cpu"))
    row("edge CPU-s per edge", lambda s: s.values["edges_cpu"] / s.edges, ".3f")
    row("edge CPU-s per GB pulled", lambda s: s.values["edges_cpu"] / (s.edges * image / GB))
    row("central CPU-s (until killed)", v("central_cpu"))
    row("central CPU-s per GB served to the edges",
        lambda s: s.values["central_cpu"] / (s.values["edge_from_central_bytes"] / GB))  # fmt: skip
    row("registry CPU-s", v("registry_cpu"))
    row("this process's CPU-s (clients: HTTP, sha256; token server)", v("clients_cpu"))
    row("edge RSS idle, median, MiB", v("edge_idle_rss_med", MiB), ".0f")
    row("edge RSS after the pull, median, MiB", v("edge_rss_med", MiB), ".0f")
    row("edge RSS after the pull, largest, MiB", v("edge_rss_max", MiB), ".0f")
    row("edge peak RSS (VmHWM), median, MiB", v("edge_hwm_med", MiB), ".0f")
    row("edge peak RSS (VmHWM), largest, MiB", v("edge_hwm_max", MiB), ".0f")
    row("central RSS idle, MiB", v("central_idle_rss", MiB), ".0f")
    row("central RSS after (before the kill), MiB", v("central_rss", MiB), ".0f")
    row("central peak RSS (VmHWM), MiB", v("central_hwm", MiB), ".0f")
    row("kernel (softirq, writeback), share of the 2 cores", v("kernel_load"), ".0%")
    row("other load on the machine, share of its cores", v("other_load"), ".0%")
    out.append("")
    if "up" in args.cases:
        out.extend(extrapolation(fleet, image))
    for case in args.cases:
        lines = fleet.trouble[case].most_common(8)
        out.append("")
        if not lines:
            out.append(f"Mirror logs, central {case}: no warnings or errors.")
            continue
        out.append(f"Mirror log warnings and errors, central {case} (all runs, count \u00d7 kind):")
        out.append("")
        for line, count in lines:
            out.append(f"- {count} \u00d7 `{line[:160]}`")
    return "\n".join(out)


def extrapolation(fleet: Fleet, image: int) -> list[str]:
    """The measured per-edge and central costs, scaled to N nodes on paper."""
    n = fleet.args.extrapolate
    k = max(fleet.args.edges)
    up = [s for s in fleet.samples if s.case == "up" and s.edges == k]
    central_per_gb = med([s.values["central_cpu"] / (s.values["edge_from_central_bytes"] / GB)
                          for s in up])  # fmt: skip
    edge_per_gb = med([s.values["edges_cpu"] / (s.edges * image / GB) for s in up])
    edge_hwm = med([s.values["edge_hwm_med"] for s in up])
    central_hwm = med([s.values["central_hwm"] for s in up])
    measured_rate = med([s.values["edge_from_central_bytes"] / s.wall for s in up])
    nic = NIC_GBIT * 1e9 / 8  # bytes/s
    out = [
        f"**On paper: {n} nodes**, from the {k}-edge runs with the central up: central "
        f"{central_per_gb:.2f} CPU-s per GB served, each edge {edge_per_gb:.2f} CPU-s per GB "
        f"pulled (its whole cold path: tier download, verify, write, serve), edge peak RSS "
        f"{edge_hwm / MiB:.0f} MiB, central {central_hwm / MiB:.0f} MiB; the central served "
        f"{measured_rate / GB:.2f} GB/s here (loopback, 2 cores shared with every edge and "
        f"client). Central egress at {NIC_GBIT:g} Gb/s = {nic / GB:.2f} GB/s.",
        "",
        "| image | registry bytes | central egress | rollout time bound by the central's "
        f"{NIC_GBIT:g} Gb/s | central CPU-s | central cores to fill {NIC_GBIT:g} Gb/s "
        "| CPU-s per node |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for label, size in (
        (f"this one, {image / 1e6:.0f} MB", float(image)),
        ("1 GB", 1e9),
        ("3 GB (Kraken's figure)", 3e9),
    ):
        egress = n * size
        out.append(
            f"| {label} | {size / GB:.3g} GB (1\u00d7) | {egress / GB:,.1f} GB "
            f"| {egress / nic:,.1f} s | {egress / GB * central_per_gb:,.0f} "
            f"| {nic / GB * central_per_gb:.1f} | {size / GB * edge_per_gb:.2f} |"
        )
    return out


def write_docs(text: str) -> None:
    docs = DOCS.read_text()
    if BEGIN not in docs or END not in docs:
        raise SystemExit(f"{DOCS} has no {BEGIN} ... {END} block")
    head, rest = docs.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    DOCS.write_text(f"{head}{BEGIN}\n{text}\n{END}{tail}")
    print(f"wrote the tables into {DOCS}")


# -- the run ------------------------------------------------------------------------------------


def check_import() -> None:
    """The mirror processes must run this checkout's package."""
    found = subprocess.run(
        [sys.executable, "-c", "import mirror; print(mirror.__file__)"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    if not Path(found).resolve().is_relative_to(REPO_ROOT):
        raise SystemExit(f"the mirror processes would import {found}, not {REPO_ROOT}")
    commit = subprocess.run(
        ["git", "-C", str(REPO_ROOT), "rev-parse", "--short", "HEAD"],
        capture_output=True,
        text=True,
    ).stdout.strip()
    print(f"mirror from {Path(found).parent} (commit {commit or '?'})", flush=True)


def check_memory(edges: Sequence[int]) -> None:
    available = mem_available()
    fits = int(0.8 * available / EDGE_RSS_BUDGET) - 1  # the central too
    if max(edges) > fits:
        raise SystemExit(
            f"{max(edges)} edges need about {(max(edges) + 1) * EDGE_RSS_BUDGET / 2**30:.1f} GiB; "
            f"{available / 2**30:.1f} GiB is available: at most --edges {fits} here"
        )
    print(
        f"memory: {available / 2**30:.1f} GiB available, room for {fits} edges at "
        f"{EDGE_RSS_BUDGET / MiB:.0f} MiB",
        flush=True,
    )


@contextmanager
def registry(work: Path) -> Iterator[tuple[Registry, TokenServer]]:
    with TokenServer(work) as tokens, Registry(work / "registry", tokens) as reg:
        yield reg, tokens


def _sizes(text: str) -> list[float]:
    return [float(x) for x in text.split(",") if x]


def _cases(text: str) -> list[str]:
    cases = [x for x in text.split(",") if x]
    if not cases or not set(cases) <= set(CASES):
        raise argparse.ArgumentTypeError(f"cases from {', '.join(CASES)}")
    return cases


def _counts(text: str) -> list[int]:
    counts = [int(x) for x in text.split(",") if x]
    if not counts or not all(1 <= c <= 50 for c in counts):
        raise argparse.ArgumentTypeError("edge counts from 1 to 50, e.g. 20 or 20,50")
    return counts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--edges", type=_counts, default=[20], help="edge counts, e.g. 20,50")
    parser.add_argument("--repeat", type=int, default=2, help="rounds")
    parser.add_argument("--cases", type=_cases, default=["up", "killed"], help="up,killed,stopped")
    parser.add_argument("--layers-mib", type=_sizes, default=[12, 10, 6, 4], help="layer sizes")
    parser.add_argument("--parallel", type=int, default=3, help="layers a client pulls at once")
    parser.add_argument("--edge-cache", default="256MiB", help="each edge's max_size")
    parser.add_argument("--backoff", type=float, default=1.0, help="the edges' tier_backoff, s")
    parser.add_argument("--extrapolate", type=int, default=500, help="nodes, on paper")
    parser.add_argument("--seed", type=int, default=None, help="for the order of the cases")
    parser.add_argument(
        "--edge-setting",
        action="append",
        default=[],
        metavar="MIRROR_X=VALUE",
        help="one more setting of the edges (repeatable), e.g. MIRROR_READ_TIMEOUT=5",
    )
    parser.add_argument("--keep-logs", type=Path, help="copy the mirrors' logs here")
    parser.add_argument("--json", type=Path, help="write every sample here")
    parser.add_argument("--write-docs", action="store_true", help=f"update {DOCS.name}")
    args = parser.parse_args()
    for tool in ("docker-registry", "skopeo"):
        if shutil.which(tool) is None:
            sys.exit(f"{tool} is not on PATH (bash scripts/system-deps.sh)")
    random.seed(args.seed)
    check_import()
    check_memory(args.edges)
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="bench-fleet-") as tmp:
        work = Path(tmp)
        with registry(work) as (reg, tokens):
            fleet = Fleet(work, reg, tokens, args)
            for rnd in range(1, args.repeat + 1):
                runs = [(k, case) for k in args.edges for case in args.cases]
                random.shuffle(runs)
                for k, case in runs:
                    fleet.rollout(case, k, rnd)
    text = report(fleet)
    print()
    print(text)
    print(f"\ntotal {time.monotonic() - started:.0f} s")
    if args.json:
        args.json.write_text(json.dumps([asdict(s) for s in fleet.samples], indent=1))
    failed = sum(1 for s in fleet.samples for p in s.pulls if p.error)
    if args.write_docs:
        write_docs(text)
    if failed:
        sys.exit(f"{failed} pull(s) failed")


if __name__ == "__main__":
    main()
