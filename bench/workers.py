"""Warm blob throughput of `mirror serve --workers N`: what a second process adds.

One `mirror serve` group (this checkout's package) in front of an upstream that sends
--size-mib MiB of zeros from memory (bench/loadgen.py's blob_server, its own process).
The blob is fetched once, cold and verified by the client, so it is in the cache and
in the page cache; then, --repeat times, --clients concurrent GETs of it, released
together. The clients are threads of this process that do not hash (`recv_into` a
reused 1 MiB buffer, status and full length checked; the mirror verified the digest
when it cached the blob): what is measured is the mirror, not sha256 on the client.

GB/s is the bytes of all clients over the wall time from the first request to the
last byte (10**9 bytes). Mirror CPU is utime + stime from /proc/PID/stat of the
supervisor and every worker (10 ms ticks), per GB served. Memory: each process's RSS
when the group is idle, after the cold fetch. Medians over the runs. Output: one JSON
object (stdout, or --json FILE), so runs with different --workers compare side by side:

    .venv/bin/python bench/workers.py --workers 1 --json w1.json
    .venv/bin/python bench/workers.py --workers 2 --json w2.json

On a machine with as many cores as the clients and the mirror together need; on a
2-vCPU machine the clients' own receive path competes with the workers for the cores.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import re
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT / "bench"))  # loadgen, as bench/compare imports it
# The mirror processes import this checkout's package, whatever the venv installed.
os.environ["PYTHONPATH"] = os.pathsep.join(
    [str(REPO_ROOT), *filter(None, [os.environ.get("PYTHONPATH")])]
)

import loadgen  # noqa: E402

GB = 10**9
MiB = 1 << 20


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--workers", default="1", help="as `mirror serve --workers` (a number, auto)")
    p.add_argument("--clients", type=int, default=8)
    p.add_argument("--size-mib", type=int, default=1024)
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--json", type=Path, help="write the result here (default: stdout)")
    return p.parse_args(argv)


def proc_cpu(pid: int) -> float:
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def rss_mib(pid: int) -> float:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


def group_pids(log: Path, supervisor: int) -> list[int]:
    """The supervisor and the workers it says are ready (one process: just itself)."""
    workers = re.findall(r"worker \d+ ready \(pid (\d+)\)", log.read_text())
    return [supervisor, *map(int, workers)]


def wait_until(check: Any, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise RuntimeError(f"timed out waiting for {what}")
        time.sleep(0.05)


def ready(url: str) -> bool:
    try:
        with urllib.request.urlopen(url + "/readyz", timeout=1) as resp:
            return bool(resp.status == 200)
    except OSError:
        return False


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    size = args.size_mib * MiB
    digest = loadgen.zeros_digest(size)
    ctx = multiprocessing.get_context("spawn")
    here, there = ctx.Pipe(duplex=False)
    upstream = ctx.Process(target=loadgen.blob_server, args=(size, there), daemon=True)
    upstream.start()
    upstream_port = here.recv()
    work = Path(tempfile.mkdtemp(prefix="bench-workers-"))
    port = free_port()
    log = work / "mirror.log"
    cmd = [
        sys.executable, "-m", "mirror", "serve",
        "--listen", f"127.0.0.1:{port}",
        "--cache-dir", str(work / "cache"),
        "--upstream", f"http://127.0.0.1:{upstream_port}",
        "--workers", str(args.workers),
    ]  # fmt: skip
    env = {k: v for k, v in os.environ.items() if not k.startswith("MIRROR_")}
    env["MIRROR_ACCESS_LOG"] = "false"
    env["MIRROR_MAX_BLOB_SIZE"] = str(2 * size)
    with log.open("wb") as out:
        mirror = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env)
    url = f"http://127.0.0.1:{port}"
    path = f"/v2/bench/blob/blobs/{digest}"
    try:
        wait_until(lambda: ready(url), 60, "the mirror")
        if args.workers.isdigit() and int(args.workers) > 1:
            count = 1 + int(args.workers)  # the supervisor and its workers
            wait_until(lambda: len(group_pids(log, mirror.pid)) == count, 60, "the workers")
        cold = loadgen.fetch_blobs("127.0.0.1", port, path, digest, size, 1, verify=True)
        if cold.failures:
            raise RuntimeError(f"cold fetch failed: {cold.failures}")
        pids = group_pids(log, mirror.pid)
        idle_rss = {str(pid): round(rss_mib(pid), 1) for pid in pids}
        runs = []
        for _ in range(args.repeat):
            before = sum(proc_cpu(p) for p in pids)
            run = loadgen.fetch_blobs(
                "127.0.0.1", port, path, digest, size, args.clients, verify=False
            )
            cpu = sum(proc_cpu(p) for p in pids) - before
            if run.failures:
                raise RuntimeError(f"warm run failed: {run.failures}")
            runs.append(
                {
                    "gbs": round(run.total / run.wall / GB, 3),
                    "wall_s": round(run.wall, 3),
                    "mirror_cpu_s_per_gb": round(cpu / (run.total / GB), 3),
                    "client_cpu_s_per_gb": round(run.cpu / (run.total / GB), 3),
                }
            )
    finally:
        mirror.terminate()
        code = mirror.wait(60)
        upstream.kill()
    result = {
        "workers": args.workers,
        "processes": len(pids),
        "clients": args.clients,
        "size_mib": args.size_mib,
        "cpus": len(os.sched_getaffinity(0)),
        "median_gbs": statistics.median(r["gbs"] for r in runs),
        "median_mirror_cpu_s_per_gb": statistics.median(r["mirror_cpu_s_per_gb"] for r in runs),
        "idle_rss_mib": idle_rss,
        "runs": runs,
        "exit_code": code,
    }
    text = json.dumps(result, indent=2)
    if args.json is not None:
        args.json.write_text(text + "\n")
    print(text)
    shutil.rmtree(work, ignore_errors=True)
    return result


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


if __name__ == "__main__":
    main()
