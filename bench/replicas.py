"""Replicas on S3 + Redis: upstream bytes of a cold burst, warm throughput from L1 and
from the bucket, and the followers' time to first byte.

Real processes on loopback: `mirror serve` replicas (`store: s3`) on one Ceph RADOS
Gateway (tests/harness/rgw.py: one mon, one OSD, one RGW) and one Redis, in front of
the real Distribution registry with token auth, holding one image whose layer is
--size-mib MiB of random bytes. Every cold run gets new mirror processes with empty
cache directories, a new bucket and a new Redis prefix. Per round (--repeat rounds,
the cases of a round in a random order):

  cold      --clients concurrent GETs of the layer, all released at once: on 3
            replicas (round-robin), on 1 replica with the same store, and on 1 replica
            with the default disk store (the reference). The upstream is not throttled
            (loopback, about 1 GB/s), the case where a late request is most likely to
            miss the download in flight. Upstream bytes: mirror_upstream_bytes_total
            summed over the replicas; upstream GETs (and bytes) from the registry's log.
  warm      --warm-clients and 1 concurrent client(s) on a replica that holds the blob
            in L1, on a fresh replica (empty cache_dir) behind the same bucket and
            Redis (it reads the bucket, and copies the blob into L1 in the background),
            the same with L1 off (l1_max_size 0B: the bucket's cost alone), on the
            disk-store mirror (the reference), and straight from RGW with a presigned
            URL (what the bucket gives on this machine, with no mirror).
  followers --clients concurrent GETs on 3 fresh replicas whose upstream goes through
            a relay throttled to --rate-mb MB/s (a WAN upstream), so the download
            lasts seconds: the time to first byte of the leader's own clients against
            the clients of the two replicas that follow it; and of one more client, on
            a 4th replica, sent once the download is half-way.

The clients are threads of this process that do not hash: a plain HTTP/1.1 GET on a
socket, `recv_into` a 1 MiB buffer, checked for status 200 and the full length (the
mirror itself verifies the digest and cuts a response that does not match). Time to
first byte is to the first byte of the body. CPU is utime + stime from /proc/PID/stat
(10 ms ticks): "mirror" sums every replica process of the case; RGW is radosgw +
ceph-osd (+ ceph-mon, negligible). Each timed case also measures what the machine did
besides (its busy time in /proc/stat minus the benchmark's processes and the kernel's),
since another job on a 2-core machine skews every figure. GB is 10**9 bytes. Medians
over the rounds.

Run as root (the Ceph daemons run as `ceph`); the mirror processes run this checkout's
`mirror` package (checked at the start), whatever the venv has installed:

    .venv/bin/python bench/replicas.py [--size-mib 256] [--clients 16] [--repeat 3]
        [--write-docs]   # rewrites the tables of its section in docs/benchmarks.md
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import secrets
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from datetime import timedelta
from pathlib import Path
from urllib.parse import urlsplit

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT / "tests"))
# The mirror processes (`python -m mirror`) import this checkout's package, whatever
# the venv has installed in editable mode.
os.environ["PYTHONPATH"] = os.pathsep.join(
    [str(REPO_ROOT), str(REPO_ROOT / "tests"), *filter(None, [os.environ.get("PYTHONPATH")])]
)

import obstore  # noqa: E402
from harness import Layout, Registry, TokenServer, push  # noqa: E402
from harness.daemon import free_port  # noqa: E402
from harness.mirror import MirrorProcess  # noqa: E402
from harness.redisserver import RedisServer  # noqa: E402
from harness.rgw import RadosGateway  # noqa: E402
from harness.throttle import ThrottledRelay  # noqa: E402
from obstore.store import S3Store  # noqa: E402

GB = 1e9
MiB = 1 << 20
CHUNK = MiB  # the clients' receive buffer
SETTLE = 1.5  # seconds of quiet before each timed case (RGW's gc runs every 5 s)
DOCS = REPO_ROOT / "docs" / "benchmarks.md"
BEGIN = "<!-- bench/replicas.py: begin -->"
END = "<!-- bench/replicas.py: end -->"
WARM = ("disk", "L1", "S3", "RGW")
_CLK_TCK = os.sysconf("SC_CLK_TCK")
NCPU = os.cpu_count() or 1
_TROUBLE = re.compile(r"\b(WARNING|ERROR|CRITICAL)\b|Traceback|\"level\": ?\"(warning|error)\"")


# -- meters -------------------------------------------------------------------------------------


def cpu(pids: Sequence[int]) -> float:
    total = 0
    for pid in pids:
        # Fields after the ")" that closes the command name: utime and stime are 14 and 15.
        stat = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        total += int(stat[11]) + int(stat[12])
    return total / _CLK_TCK


def busy() -> tuple[float, float]:
    """CPU-seconds the whole machine has been busy (all cores, /proc/stat): in tasks
    (and stolen by the hypervisor), and in interrupts (which no task is charged for)."""
    fields = Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]
    user, nice, system, _, _, irq, softirq, steal = (int(x) for x in fields[:8])
    return (user + nice + system + steal) / _CLK_TCK, (irq + softirq) / _CLK_TCK


def kernel_threads() -> dict[int, float]:
    """CPU-seconds of each kernel thread (ppid 2: kworkers doing the writeback of the
    caches' files, ksoftirqd doing loopback network work): the benchmark's own, too."""
    found: dict[int, float] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (FileNotFoundError, ProcessLookupError):
            continue
        if fields[1] == "2":
            found[int(stat.parent.name)] = (int(fields[11]) + int(fields[12])) / _CLK_TCK
    return found


@dataclass
class Fetch:
    """One client's GET(s): times from the common start, in seconds."""

    replica: int
    sent: float  # request sent
    head: float  # response head received
    first: float  # first byte of the body
    done: float
    nbytes: int
    cache: str  # the X-Cache header of the first response

    @property
    def ttfb(self) -> float:
        return self.first - self.sent


def _get(
    host: str, port: int, target: str, view: memoryview, t0: float
) -> tuple[float, float, int, str]:
    request = f"GET {target} HTTP/1.1\r\nHost: {host}:{port}\r\nConnection: close\r\n\r\n"
    with socket.create_connection((host, port), timeout=300) as sock:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.sendall(request.encode("latin-1"))
        data = b""
        while (end := data.find(b"\r\n\r\n")) < 0:
            piece = sock.recv(65536)
            if not piece:
                raise RuntimeError(f"{host}:{port} closed before the response head")
            data += piece
        head = time.perf_counter() - t0
        status_line, *lines = data[:end].decode("latin-1").split("\r\n")
        headers = {k.strip().lower(): v.strip() for k, v in (x.split(":", 1) for x in lines)}
        if status_line.split()[1] != "200":
            raise RuntimeError(f"{host}:{port}{target[:60]}: {status_line}")
        if "content-length" not in headers:
            raise RuntimeError(f"{host}:{port}: no content-length ({headers})")
        length = int(headers["content-length"])
        got = len(data) - end - 4
        first = head if got else 0.0
        while got < length:
            n = sock.recv_into(view, min(len(view), length - got))
            if n == 0:
                raise RuntimeError(f"{host}:{port}: body cut at {got} of {length} bytes")
            if not first:
                first = time.perf_counter() - t0
            got += n
    return head, first, got, headers.get("x-cache", "-")


def burst(
    targets: Sequence[tuple[int, str]],
    reads: int = 1,
    late: Sequence[tuple[int, str]] = (),
    trigger: Callable[[], bool] | None = None,
) -> tuple[list[Fetch], float]:
    """GET every (replica, URL) at once, each `reads` times in a row, and the `late` ones
    once `trigger()` is true; the fetches (targets first) and the wall time from the
    common start to the last byte."""
    gate = threading.Barrier(len(targets) + len(late) + 1)
    start: list[float] = []

    def client(replica: int, url: str, wait: Callable[[], bool] | None) -> Fetch:
        parts = urlsplit(url)
        assert parts.hostname is not None and parts.port is not None
        target = parts.path + (f"?{parts.query}" if parts.query else "")
        view = memoryview(bytearray(CHUNK))
        gate.wait()
        t0 = start[0]
        while wait is not None and not wait():
            time.sleep(0.01)
        sent = time.perf_counter() - t0
        head, first, total, cache = _get(parts.hostname, parts.port, target, view, t0)
        for _ in range(reads - 1):
            total += _get(parts.hostname, parts.port, target, view, t0)[2]
        return Fetch(replica, sent, head, first, time.perf_counter() - t0, total, cache)

    jobs = [(r, url, None) for r, url in targets] + [(r, url, trigger) for r, url in late]
    with ThreadPoolExecutor(len(jobs)) as pool:
        futures = [pool.submit(client, *job) for job in jobs]
        time.sleep(0.05)  # every thread at the gate
        start.append(time.perf_counter())
        gate.wait()
        fetches = [f.result() for f in futures]
    return fetches, max(f.done for f in fetches)


# -- the processes ------------------------------------------------------------------------------


@dataclass
class Services:
    work: Path
    registry: Registry
    rgw: RadosGateway
    redis: RedisServer
    repo: str
    layer: str
    size: int

    @property
    def rgw_pids(self) -> list[int]:
        return [d.pid for d in self.rgw._daemons if d.pid is not None]

    @property
    def other_pids(self) -> list[int]:
        """The registry and Redis (the clients and the relay are this process)."""
        return [p for p in (self.registry.pid, self.redis.pid) if p is not None]

    def upstream_gets(self) -> tuple[int, int]:
        """Blob GETs of the layer in the registry's log since clear_log(), and their bytes."""
        time.sleep(0.3)  # Distribution writes its access log line after the response
        gets = [
            r
            for r in self.registry.requests()
            if r.method == "GET" and r.path.endswith(f"/blobs/{self.layer}") and r.status < 300
        ]
        return len(gets), sum(r.size or 0 for r in gets)

    def s3(self, bucket: str) -> S3Store:
        creds = self.rgw.credentials
        return S3Store(
            bucket,
            endpoint=self.rgw.endpoint,
            access_key_id=creds.access_key,
            secret_access_key=creds.secret_key,
            region="us-east-1",
            virtual_hosted_style_request=False,
            client_options={"allow_http": True},
        )


class Cluster:
    """Mirror processes on one store: `disk` (each its own), or `s3` (a new bucket and
    Redis prefix, shared by every replica of this cluster)."""

    def __init__(self, svc: Services, label: str, store: str, upstream: str, n: int) -> None:
        self.svc = svc
        self.store = store
        self.upstream = upstream
        self.dir = svc.work / f"{label}-{uuid.uuid4().hex[:6]}"
        self.bucket = f"b{uuid.uuid4().hex[:12]}"
        self.secret = secrets.token_hex(16)
        self.procs: list[MirrorProcess] = []
        if store == "s3":
            svc.rgw.create_bucket(self.bucket)
        try:
            for _ in range(n):
                self.add()
        except BaseException:
            self.stop()
            raise

    def add(self, **extra: str) -> MirrorProcess:
        """One more replica, with an empty cache_dir (a new pod)."""
        port = free_port()
        env: dict[str, str] = {}
        if self.store == "s3":
            creds = self.svc.rgw.credentials
            env = {
                "MIRROR_STORE": "s3",
                "MIRROR_S3_BUCKET": self.bucket,
                "MIRROR_S3_ENDPOINT": self.svc.rgw.endpoint,
                "MIRROR_S3_PATH_STYLE": "true",
                "MIRROR_S3_ACCESS_KEY_ID": creds.access_key,
                "MIRROR_S3_SECRET_ACCESS_KEY": creds.secret_key,
                "MIRROR_REDIS_URL": self.svc.redis.url,
                "MIRROR_REDIS_PREFIX": f"{self.bucket}:",
                "MIRROR_PEER_URL": f"http://127.0.0.1:{port}",
                "MIRROR_PEER_SECRET": self.secret,
            }
        proc = MirrorProcess(
            self.dir / f"r{len(self.procs)}", self.upstream, env={**env, **extra}, port=port
        )
        self.procs.append(proc)
        proc.start()
        return proc

    @property
    def pids(self) -> list[int]:
        return [p.pid for p in self.procs if p.pid is not None]

    def metric(self, name: str, **labels: str) -> float:
        """A metric summed over the running replicas and over the labels not given."""
        total = 0.0
        for proc in self.procs:
            if not proc.running:
                continue
            for (sample, sample_labels), value in proc.metrics().items():
                if sample == name and all((k, v) in sample_labels for k, v in labels.items()):
                    total += value
        return total

    def leader(self) -> int | None:
        for i, proc in enumerate(self.procs):
            if proc.running and proc.metric("mirror_download_leases_total", event="acquired"):
                return i
        return None

    def in_l1(self, proc: MirrorProcess) -> bool:
        hexdigest = self.svc.layer.removeprefix("sha256:")
        return (proc.cache_dir / "blobs" / "sha256" / hexdigest[:2] / hexdigest).exists()

    def settle(self, timeout: float = 120) -> float:
        """Wait until no replica has a download in flight (commits and uploads done) and
        every running replica holds the blob in its cache; the seconds it took."""
        started = time.monotonic()
        running = [p for p in self.procs if p.running]
        # The files first (no request to the replicas, whose CPU is being measured): a
        # leader renames its L1 copy into place after the upload completed.
        while not all(self.in_l1(p) for p in running) or any(
            p.metric("mirror_downloads_in_flight") for p in running
        ):
            if time.monotonic() - started > timeout:
                raise RuntimeError(f"{self.dir.name}: not settled after {timeout} s")
            time.sleep(0.02)
        return time.monotonic() - started

    def url(self, i: int) -> str:
        return f"{self.procs[i].url}/v2/{self.svc.repo}/blobs/{self.svc.layer}"

    def stop(self, trouble: Counter[str] | None = None) -> None:
        for proc in self.procs:
            proc.stop()
            if trouble is not None:
                for line in proc.log().splitlines():
                    if _TROUBLE.search(line):
                        trouble[re.sub(r"^\S+ \S+ |\"(time|ts)\": ?\"[^\"]*\", ?", "", line)] += 1
        shutil.rmtree(self.dir, ignore_errors=True)


# -- the cases ----------------------------------------------------------------------------------


@dataclass
class Sample:
    case: str
    round: int
    nbytes: int
    seconds: float
    mirror_cpu: float  # until the last client byte
    rgw_cpu: float
    values: dict[str, float] = field(default_factory=dict)
    ttfb: list[float] = field(default_factory=list)

    @property
    def gbps(self) -> float:
        return self.nbytes / GB / self.seconds

    @property
    def mirror_per_gb(self) -> float:
        return self.mirror_cpu / (self.nbytes / GB)

    @property
    def rgw_per_gb(self) -> float:
        return self.rgw_cpu / (self.nbytes / GB)


class Bench:
    def __init__(self, svc: Services, args: argparse.Namespace) -> None:
        self.svc = svc
        self.args = args
        self.samples: list[Sample] = []
        self.trouble: Counter[str] = Counter()

    def log(self, sample: Sample) -> None:
        self.samples.append(sample)
        extra = " ".join(f"{k} {v:.3g}" for k, v in sample.values.items())
        print(
            f"r{sample.round} {sample.case:24} {sample.gbps:6.3f} GB/s {sample.seconds:6.2f} s "
            f"mirror {sample.mirror_per_gb:5.2f} CPU-s/GB  RGW {sample.rgw_per_gb:5.2f}  {extra}",
            flush=True,
        )

    def timed(
        self,
        case: str,
        rnd: int,
        cluster: Cluster,
        targets: Sequence[tuple[int, str]],
        reads: int = 1,
        settle: Callable[[], float] | None = None,
        late: Sequence[tuple[int, str]] = (),
        trigger: Callable[[], bool] | None = None,
    ) -> tuple[Sample, list[Fetch]]:
        svc = self.svc
        time.sleep(SETTLE)
        svc.registry.clear_log()
        pids, rgw, known = cluster.pids, svc.rgw_pids, svc.other_pids
        threads0 = kernel_threads()
        m0, r0, k0, busy0 = cpu(pids), cpu(rgw), cpu(known) + time.process_time(), busy()
        fetches, seconds = burst(targets, reads, late, trigger)
        m1, r1, k1, busy1 = cpu(pids), cpu(rgw), cpu(known) + time.process_time(), busy()
        threads1 = kernel_threads()
        kernel = sum(t - threads0[pid] for pid, t in threads1.items() if pid in threads0)
        kernel += busy1[1] - busy0[1]
        nbytes = sum(f.nbytes for f in fetches)
        if nbytes != (len(targets) * reads + len(late)) * svc.size:
            raise RuntimeError(f"{case}: {nbytes} bytes received")
        sample = Sample(case, rnd, nbytes, seconds, m1 - m0, r1 - r0)
        # What the machine did besides this benchmark (another job would skew every
        # figure): its busy time minus the benchmark's processes and the kernel's
        # threads, as a share of its cores; and the kernel threads' share.
        foreign = (busy1[0] - busy0[0]) - (m1 - m0) - (r1 - r0) - (k1 - k0) - kernel
        sample.values["foreign_load"] = max(0.0, foreign) / (seconds * NCPU)
        sample.values["kernel_load"] = kernel / (seconds * NCPU)
        sample.ttfb = [f.ttfb for f in fetches]
        if settle is not None:
            sample.values["settled_s"] = settle()
            sample.values["mirror_cpu_settled"] = cpu(pids) - m0
            sample.values["rgw_cpu_settled"] = cpu(rgw) - r0
        return sample, fetches

    # -- cold ---------------------------------------------------------------------------------

    def cold(self, case: str, rnd: int, store: str, n: int) -> Cluster:
        """A cold burst on a new cluster; the cluster is returned warm."""
        svc = self.svc
        cluster = Cluster(svc, case.replace(" ", "-"), store, svc.registry.url, n)
        try:
            targets = [(i % n, cluster.url(i % n)) for i in range(self.args.clients)]
            sample, _ = self.timed(case, rnd, cluster, targets, settle=cluster.settle)
            gets, get_bytes = svc.upstream_gets()
            sample.values |= {
                "upstream_gets": gets,
                "registry_bytes_x": get_bytes / svc.size,
                "upstream_bytes_x": cluster.metric("mirror_upstream_bytes_total") / svc.size,
                "peer_received_x": cluster.metric("mirror_peer_bytes_total", direction="received")
                / svc.size,
                "leases": cluster.metric("mirror_download_leases_total", event="acquired"),
                "ttfb_med": statistics.median(sample.ttfb),
            }
            self.log(sample)
        except BaseException:
            cluster.stop(self.trouble)
            raise
        return cluster

    # -- warm ---------------------------------------------------------------------------------

    def warm_l1(self, case: str, rnd: int, cluster: Cluster, clients: int) -> None:
        # Replica 0 holds the blob in L1, as every replica of a settled cluster does.
        reads = self.args.warm_reads if clients == 1 else 1
        targets = [(0, cluster.url(0))] * clients
        sample, fetches = self.timed(case, rnd, cluster, targets, reads)
        self._check_warm(case, sample, fetches, "HIT")

    def warm_s3(self, case: str, rnd: int, cluster: Cluster, clients: int, fill: bool) -> None:
        """A new replica with an empty L1 behind the same bucket and Redis: a whole-blob
        read from the bucket is a local download (one bucket GET, verified, kept in L1);
        `fill` False: with l1_max_size 0 (the copy is evicted at the next round)."""
        fresh = cluster.add() if fill else cluster.add(MIRROR_L1_MAX_SIZE="0")
        i = len(cluster.procs) - 1
        try:
            if cluster.in_l1(fresh):
                raise RuntimeError("the fresh replica has the blob already")
            before = fresh.metric("mirror_s3_requests_total", operation="get", result="ok")
            sample, fetches = self.timed(
                case,
                rnd,
                cluster,
                [(i, cluster.url(i))] * clients,
                settle=cluster.settle if fill else None,
            )
            gets = fresh.metric("mirror_s3_requests_total", operation="get", result="ok") - before
            sample.values["bucket_gets"] = gets
            self._check_warm(case, sample, fetches, "HIT")
        finally:
            fresh.stop()
            shutil.rmtree(fresh.workdir, ignore_errors=True)

    def warm_direct(self, case: str, rnd: int, cluster: Cluster, clients: int) -> None:
        """The bucket with no mirror: a presigned GET straight to RGW."""
        key = f"blobs/sha256/{self.svc.layer.removeprefix('sha256:')}"
        url = obstore.sign(cluster.svc.s3(cluster.bucket), "GET", key, timedelta(hours=1))
        reads = self.args.warm_reads if clients == 1 else 1
        sample, fetches = self.timed(case, rnd, cluster, [(-1, url)] * clients, reads)
        self._check_warm(case, sample, fetches, "-")

    def _check_warm(self, case: str, sample: Sample, fetches: list[Fetch], cache: str) -> None:
        gets, _ = self.svc.upstream_gets()
        if gets:
            raise RuntimeError(f"{case}: {gets} upstream GETs on a warm read")
        caches = Counter(f.cache for f in fetches)
        if set(caches) != {cache}:
            raise RuntimeError(f"{case}: X-Cache {dict(caches)}")
        sample.values["ttfb_med"] = statistics.median(sample.ttfb)
        self.log(sample)

    # -- followers' time to first byte ----------------------------------------------------------

    def followers(self, rnd: int) -> None:
        """A cold burst on 3 replicas with a slow upstream; and one late client, on a
        4th replica, once the download is half-way."""
        svc = self.svc
        host, port = svc.registry.host.split(":")
        case = "followers (throttled)"
        with ThrottledRelay(host, int(port), self.args.rate_mb * 1e6) as relay:
            cluster = Cluster(svc, "followers", "s3", relay.url, 4)
            try:

                def half_way() -> bool:
                    # The replicas' temp files (no request to the replicas being measured).
                    return any(
                        f.stat().st_size >= svc.size // 2
                        for p in cluster.procs[:3]
                        for f in (p.cache_dir / "tmp").glob("*")
                    )

                targets = [(i % 3, cluster.url(i % 3)) for i in range(self.args.clients)]
                sample, fetches = self.timed(
                    case,
                    rnd,
                    cluster,
                    targets,
                    settle=cluster.settle,
                    late=[(3, cluster.url(3))],
                    trigger=half_way,
                )
                leader = cluster.leader()
                if leader is None or leader == 3:
                    raise RuntimeError(f"replica {leader} acquired the lease")
                *burst_fetches, late = fetches
                mine = [f for f in burst_fetches if f.replica == leader]
                others = [f for f in burst_fetches if f.replica != leader]
                gets, _ = svc.upstream_gets()
                sample.values |= {
                    "upstream_gets": gets,
                    "upstream_bytes_x": cluster.metric("mirror_upstream_bytes_total") / svc.size,
                    "leader_ttfb_med": statistics.median(f.ttfb for f in mine),
                    "leader_ttfb_max": max(f.ttfb for f in mine),
                    "follower_ttfb_med": statistics.median(f.ttfb for f in others),
                    "follower_ttfb_max": max(f.ttfb for f in others),
                    "leader_done_max": max(f.done for f in mine),
                    "follower_done_max": max(f.done for f in others),
                    "follower_lag_max": max(f.done for f in others) - max(f.done for f in mine),
                    "late_sent": late.sent,
                    "late_ttfb": late.ttfb,
                    "late_lag": late.done - max(f.done for f in mine),
                }
                self.log(sample)
            finally:
                cluster.stop(self.trouble)


# -- the run ------------------------------------------------------------------------------------


def build_image(work: Path, registry: Registry, mib: int) -> tuple[str, str, int]:
    """Push an image whose one layer is `mib` MiB of random bytes; (repo, layer, size)."""
    started = time.perf_counter()
    layout = Layout(work / "layout")
    image = layout.image([[("big.bin", os.urandom(mib * MiB))]])
    layout.tag(image, "big")
    repo = "bench/replicas"
    push(layout.root, "big", registry, repo, "1")
    layers = json.loads(layout.read(image["digest"]))["layers"]
    largest = max(layers, key=lambda d: d["size"])
    shutil.rmtree(layout.root)
    print(f"pushed a {mib} MiB layer in {time.perf_counter() - started:.1f} s", flush=True)
    return repo, largest["digest"], int(largest["size"])


def run_rounds(bench: Bench) -> None:
    args = bench.args
    for rnd in range(1, args.repeat + 1):
        order = [
            ("3 replicas, s3", "s3", 3),
            ("1 replica, s3", "s3", 1),
            ("1 replica, disk", "disk", 1),
        ]
        random.shuffle(order)
        clusters: dict[str, Cluster] = {}
        try:
            for case, store, n in order:
                clusters[case] = bench.cold(f"cold {case}", rnd, store, n)
            shared, disk = clusters["3 replicas, s3"], clusters["1 replica, disk"]
            warm = [(kind, c) for c in (1, args.warm_clients) for kind in WARM]
            random.shuffle(warm)
            for kind, c in warm:
                case = f"warm {kind} x{c}"
                if kind == "L1":
                    bench.warm_l1(case, rnd, shared, c)
                elif kind == "disk":
                    bench.warm_l1(case, rnd, disk, c)
                elif kind.startswith("S3"):
                    bench.warm_s3(case, rnd, shared, c, fill=kind == "S3")
                else:
                    bench.warm_direct(case, rnd, shared, c)
        finally:
            for cluster in clusters.values():
                cluster.stop(bench.trouble)
        bench.followers(rnd)


# -- the report ---------------------------------------------------------------------------------


def med(values: Sequence[float]) -> float:
    return statistics.median(values)


def spread(values: Sequence[float], fmt: str = ".2f") -> str:
    return f"{med(values):{fmt}} ({min(values):{fmt}}-{max(values):{fmt}})"


def report(bench: Bench) -> str:
    args, svc = bench.args, bench.svc

    def group(case: str) -> list[Sample]:
        return [s for s in bench.samples if s.case == case]

    def values(case: str, key: str) -> list[float]:
        return [s.values[key] for s in group(case)]

    out: list[str] = []
    size_mib = svc.size / MiB
    out.append(
        f"Blob: one layer of {size_mib:.0f} MiB of random bytes; medians of {args.repeat} "
        "rounds (min-max in brackets)."
    )
    out.append("")
    out.append(
        f"**Cold burst: {args.clients} clients at once**, upstream on loopback (not throttled)"
    )
    out.append("")
    cases = ["1 replica, disk", "1 replica, s3", "3 replicas, s3"]
    out.append("| metric | " + " | ".join(cases) + " | 3 replicas / 1 replica, s3 |")
    out.append("|---|" + "---:|" * (len(cases) + 1))

    def row(label: str, get: Callable[[str], list[float]], fmt: str = ".2f") -> None:
        cells = [spread(get(f"cold {c}"), fmt) for c in cases]
        ref, ours = med(get("cold 1 replica, s3")), med(get("cold 3 replicas, s3"))
        ratio = f"{ours / ref:.2f}\u00d7" if ref else "\u2013"
        out.append(f"| {label} | " + " | ".join(cells) + f" | {ratio} |")

    row("upstream GETs of the blob (registry log)", lambda c: values(c, "upstream_gets"), ".0f")
    row(
        "upstream bytes / blob size (mirror_upstream_bytes_total)",
        lambda c: values(c, "upstream_bytes_x"),
    )
    row("upstream bytes / blob size (registry log)", lambda c: values(c, "registry_bytes_x"))
    row("bytes between replicas / blob size", lambda c: values(c, "peer_received_x"))
    row("time to first byte, median of the clients, s", lambda c: values(c, "ttfb_med"), ".3f")
    row("wall time to the last client's last byte, s", lambda c: [s.seconds for s in group(c)])
    row("GB/s to the clients (sum)", lambda c: [s.gbps for s in group(c)])
    row(
        "mirror CPU-s/GB served, until the last byte", lambda c: [s.mirror_per_gb for s in group(c)]
    )
    row(
        "mirror CPU-s, commits and uploads included",
        lambda c: values(c, "mirror_cpu_settled"),
    )
    row("RGW+OSD CPU-s, uploads included", lambda c: values(c, "rgw_cpu_settled"))
    row(
        "blob committed everywhere, s after the last byte",
        lambda c: values(c, "settled_s"),
    )
    out.append("")
    out.append(
        f"**Warm reads** (1 client reads the blob {args.warm_reads} times in a row; "
        f"{args.warm_clients} clients read it once each, at once)"
    )
    out.append("")
    out.append(
        "| source | clients | GB/s | vs disk store | mirror CPU-s/GB | RGW+OSD CPU-s/GB "
        "| time to first byte, ms |"
    )
    out.append("|---|---:|---:|---:|---:|---:|---:|")
    sources = [
        ("disk", "1 replica, disk store (reference)"),
        ("L1", "replica with the blob in L1"),
        ("S3", "fresh replica, from the bucket (a local download, kept in L1)"),
        ("RGW", "RGW direct, presigned GET, no mirror"),
    ]
    for c in (1, args.warm_clients):
        ref = med([s.gbps for s in group(f"warm disk x{c}")])
        for key, label in sources:
            g = group(f"warm {key} x{c}")
            rate = med([s.gbps for s in g])
            mirror = "\u2013" if key == "RGW" else spread([s.mirror_per_gb for s in g])
            rgw = "\u2013" if key in ("disk", "L1") else spread([s.rgw_per_gb for s in g])
            out.append(
                f"| {label} | {c} | {spread([s.gbps for s in g])} | {rate / ref:.2f}\u00d7 "
                f"| {mirror} | {rgw} | {med([s.values['ttfb_med'] for s in g]) * 1e3:.1f} |"
            )
    s3 = [s for c in (1, args.warm_clients) for s in group(f"warm S3 x{c}")]
    out.append("")
    out.append(
        "Fresh replica, from the bucket: bucket GETs per case "
        + ", ".join(
            f"x{c}: {med(values(f'warm S3 x{c}', 'bucket_gets')):.0f}"
            for c in (1, args.warm_clients)
        )
        + "; the blob was in its L1 "
        + spread([s.values["settled_s"] for s in s3])
        + " s after the last client byte; mirror CPU-s/GB with the L1 copy included "
        + ", ".join(
            f"x{c}: "
            + spread(
                [s.values["mirror_cpu_settled"] / (s.nbytes / GB) for s in group(f"warm S3 x{c}")]
            )
            for c in (1, args.warm_clients)
        )
        + "."
    )
    out.append("")
    f = "followers (throttled)"
    out.append(
        f"**Followers' time to first byte**: {args.clients} clients at once on 3 fresh "
        f"replicas, upstream throttled to {args.rate_mb:g} MB/s"
    )
    out.append("")
    out.append("| metric | leader's clients | followers' clients |")
    out.append("|---|---:|---:|")
    out.append(
        f"| time to first byte, median, s | {spread(values(f, 'leader_ttfb_med'), '.3f')} "
        f"| {spread(values(f, 'follower_ttfb_med'), '.3f')} |"
    )
    out.append(
        f"| time to first byte, max, s | {spread(values(f, 'leader_ttfb_max'), '.3f')} "
        f"| {spread(values(f, 'follower_ttfb_max'), '.3f')} |"
    )
    out.append(
        f"| last byte, latest client, s | {spread(values(f, 'leader_done_max'))} "
        f"| {spread(values(f, 'follower_done_max'))} |"
    )
    out.append(
        "| a late client on a 4th replica, sent half-way (at "
        f"{spread(values(f, 'late_sent'))} s): time to first byte, s "
        f"| | {spread(values(f, 'late_ttfb'), '.3f')} |"
    )
    out.append(
        "| the late client's last byte, s after the leader's last client "
        f"| | {spread(values(f, 'late_lag'), '.3f')} |"
    )
    out.append("")
    out.append(
        f"Upstream: {spread(values(f, 'upstream_gets'), '.0f')} GET(s), "
        f"{spread(values(f, 'upstream_bytes_x'))}\u00d7 the blob size; the download "
        f"({size_mib:.0f} MiB through the relay set to {args.rate_mb:g} MB/s: "
        f"{med([svc.size / 1e6 / x for x in values(f, 'leader_done_max')]):.0f} MB/s achieved) "
        f"took {spread(values(f, 'leader_done_max'))} s to the leader's last client; the "
        f"followers' last byte came {spread(values(f, 'follower_lag_max'), '.3f')} s after it."
    )
    loads = [s.values["foreign_load"] for s in bench.samples]
    kernel = [s.values["kernel_load"] for s in bench.samples]
    out.append("")
    out.append(
        "Other load on the machine during the timed cases (its busy time minus this "
        f"benchmark's processes and the kernel's threads, as a share of its {NCPU} cores): "
        f"median {med(loads):.0%}, max {max(loads):.0%}; the kernel (interrupts, writeback, "
        f"softirq threads): median {med(kernel):.0%}, max {max(kernel):.0%}."
    )
    return "\n".join(out)


def write_docs(text: str) -> None:
    docs = DOCS.read_text()
    if BEGIN not in docs or END not in docs:
        raise SystemExit(f"{DOCS} has no {BEGIN} ... {END} block")
    head, rest = docs.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    DOCS.write_text(f"{head}{BEGIN}\n{text}\n{END}{tail}")
    print(f"wrote the tables into {DOCS}")


@contextmanager
def services(args: argparse.Namespace, work: Path) -> Iterator[Services]:
    with (
        TokenServer(work) as tokens,
        Registry(work / "registry", tokens) as registry,
        RadosGateway() as rgw,  # tcp_nodelay=1 on its frontend (see the harness)
        RedisServer(work / "redis") as redis,
    ):
        repo, layer, size = build_image(work, registry, args.size_mib)
        yield Services(work, registry, rgw, redis, repo, layer, size)


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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--size-mib", type=int, default=256, help="size of the blob")
    parser.add_argument("--clients", type=int, default=16, help="clients of a cold burst")
    parser.add_argument("--warm-clients", type=int, default=8, help="concurrent warm clients")
    parser.add_argument("--warm-reads", type=int, default=8, help="reads of the 1 warm client")
    parser.add_argument("--repeat", type=int, default=3, help="rounds")
    parser.add_argument("--rate-mb", type=float, default=50, help="throttled upstream, MB/s")
    parser.add_argument("--seed", type=int, default=None, help="for the order of the cases")
    parser.add_argument("--json", type=Path, help="write every sample here")
    parser.add_argument("--write-docs", action="store_true", help=f"update {DOCS.name}")
    args = parser.parse_args()
    if os.geteuid() != 0:
        sys.exit("run as root: the Ceph daemons run as the ceph user")
    for tool in ("docker-registry", "skopeo", "radosgw", "redis-server", "ceph-osd"):
        if shutil.which(tool) is None:
            sys.exit(f"{tool} is not on PATH (bash scripts/system-deps.sh)")
    random.seed(args.seed)
    check_import()
    started = time.monotonic()
    with (
        tempfile.TemporaryDirectory(prefix="bench-replicas-") as tmp,
        services(args, Path(tmp)) as svc,
    ):
        bench = Bench(svc, args)
        run_rounds(bench)
    text = report(bench)
    print()
    print(text)
    print()
    if bench.trouble:
        print("mirror log lines worth a look (count x line):")
        for line, count in bench.trouble.most_common(30):
            print(f"  {count:4d} x {line[:240]}")
    else:
        print("mirror logs: no warnings or errors")
    print(f"\ntotal {time.monotonic() - started:.0f} s")
    if args.json:
        args.json.write_text(json.dumps([asdict(s) for s in bench.samples], indent=1))
    if args.write_docs:
        write_docs(text)


if __name__ == "__main__":
    main()
