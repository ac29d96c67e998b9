"""Cold misses through two `mirror serve` processes on one cache directory: the
cross-process follower path (mirror/sharing.py).

One blob of --size-mib MiB of random bytes is served by a static upstream
(`python -m http.server` in its own process over a directory laid out as
/v2/<repo>/blobs/<digest>, no auth: the upstream's cost stays out of the mirror's).
Per round, two fresh `mirror serve` processes share an empty cache directory, and
--clients concurrent GETs are sent round-robin to them (released together). The
clients are threads of this process that do not hash: `recv_into` a 1 MiB buffer,
checked for status 200 and the full length (the mirror verifies the digest itself).

Reported per round: wall time, upstream GETs of the blob (from the upstream's log),
which process led, and CPU seconds per process (utime + stime from /proc/PID/stat;
the leader hashes and writes, the follower only tails the file and sends). With
--single, the same clients on one process, for reference. GB is 10**9 bytes.

    .venv/bin/python bench/processes_cold.py [--size-mib 256] [--clients 8] [--repeat 3]
"""

from __future__ import annotations

import argparse
import hashlib
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT / "tests"))

from harness.daemon import free_port  # noqa: E402
from harness.mirror import MirrorProcess  # noqa: E402

REPO = "bench/app"


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def get(host: str, port: int, path: str, size: int, start: threading.Barrier) -> None:
    start.wait()
    with socket.create_connection((host, port), timeout=120) as sock:
        sock.sendall(f"GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n".encode())
        buf = bytearray(1 << 20)
        view = memoryview(buf)
        head = b""
        while b"\r\n\r\n" not in head:
            n = sock.recv_into(view)
            if not n:
                raise RuntimeError("closed before the headers")
            head += bytes(view[:n])
        header, _, body = head.partition(b"\r\n\r\n")
        if not header.startswith(b"HTTP/1.1 200"):
            raise RuntimeError(header.split(b"\r\n")[0].decode())
        got = len(body)
        while n := sock.recv_into(view):
            got += n
        if got != size:
            raise RuntimeError(f"short body: {got} of {size}")


def round_(
    upstream: str, log: Path, digest: str, size: int, clients: int, mirrors: int, tmp: Path
) -> dict[str, object]:
    cache = tmp / "cache"
    env = {"MIRROR_ACCESS_LOG": "false", "MIRROR_LOG_LEVEL": "warning"}
    procs = [
        MirrorProcess(tmp / f"m{i}", upstream, cache_dir=cache, env=env) for i in range(mirrors)
    ]
    for p in procs:
        p.start()
    try:
        before_gets = log.read_text().count(f"GET /v2/{REPO}/blobs/{digest}")
        cpu0 = [cpu_seconds(p.pid or 0) for p in procs]
        barrier = threading.Barrier(clients + 1)
        path = f"/v2/{REPO}/blobs/{digest}"
        errors: list[BaseException] = []

        def client(i: int) -> None:
            try:
                get("127.0.0.1", procs[i % mirrors].port, path, size, barrier)
            except BaseException as exc:  # reported below
                errors.append(exc)

        threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
        for t in threads:
            t.start()
        barrier.wait()
        started = time.perf_counter()
        for t in threads:
            t.join()
        wall = time.perf_counter() - started
        if errors:
            raise RuntimeError(f"{len(errors)} clients failed: {errors[0]!r}")
        cpu = [cpu_seconds(p.pid or 0) - c for p, c in zip(procs, cpu0, strict=True)]
        followed = [p.metric("mirror_downloads_followed_total") for p in procs]
        gets = log.read_text().count(f"GET /v2/{REPO}/blobs/{digest}") - before_gets
        return {"wall": wall, "gets": gets, "cpu": cpu, "followed": followed}
    finally:
        for p in procs:
            p.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size-mib", type=int, default=256)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--single", action="store_true", help="also one process, for reference")
    args = parser.parse_args()
    size = args.size_mib << 20
    with tempfile.TemporaryDirectory(prefix="bench-procs-") as tmp_name:
        tmp = Path(tmp_name)
        data = os.urandom(size)
        digest = "sha256:" + hashlib.sha256(data).hexdigest()
        blob_dir = tmp / "upstream" / "v2" / REPO / "blobs"
        blob_dir.mkdir(parents=True)
        (blob_dir / digest).write_bytes(data)
        del data
        port = free_port()
        log = tmp / "upstream.log"
        with log.open("wb") as log_file:
            server = subprocess.Popen(
                [sys.executable, "-m", "http.server", str(port), "--bind", "127.0.0.1"],
                cwd=tmp / "upstream",
                stdout=log_file,
                stderr=subprocess.STDOUT,
            )
        try:
            for _ in range(100):
                try:
                    socket.create_connection(("127.0.0.1", port), timeout=1).close()
                    break
                except OSError:
                    time.sleep(0.05)
            upstream = f"http://127.0.0.1:{port}"
            cases = [("2 processes", 2)] + ([("1 process", 1)] if args.single else [])
            for name, mirrors in cases:
                results = []
                for i in range(args.repeat):
                    r = round_(
                        upstream, log, digest, size, args.clients, mirrors, tmp / f"{name}-{i}"
                    )
                    results.append(r)
                    cpu = ", ".join(f"{c:.2f}" for c in r["cpu"])  # type: ignore[attr-defined]
                    print(
                        f"{name}: {args.clients} clients, {args.size_mib} MiB: "
                        f"{r['wall']:.2f} s, upstream GETs {r['gets']}, "
                        f"CPU-s per process [{cpu}], followed {r['followed']}"
                    )
                walls = [float(r["wall"]) for r in results]  # type: ignore[arg-type]
                print(f"{name}: median wall {statistics.median(walls):.2f} s")
        finally:
            server.terminate()
            server.wait()


if __name__ == "__main__":
    main()
