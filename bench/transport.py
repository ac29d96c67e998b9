"""How fast does an httpx.AsyncClient read a large response body?

Compares httpx's default transport with the client `mirror.upstream.make_client` builds
(httpx on the httpx-aiohttp transport), both reading with `aiter_raw()`, and that client
with the body taken off its socket in 1 MiB blocks (`mirror.rawbody`), as the mirror's
blob downloads of 8 MiB and more do.

The body comes from a raw asyncio server in a separate process that answers every GET
with a Content-Length body sent straight from one pre-built memoryview (`sock_sendall`
sends slices of it without copying), so what is measured is the client process.

    .venv/bin/python bench/transport.py [--size-mib 1024] [--repeat 3] [--loop uvloop]

GB is 10**9 bytes. CPU is user + system time of the client process (getrusage); the
CPU columns are medians too.
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing
import os
import resource
import socket
import statistics
import sys
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from multiprocessing.connection import Connection
from pathlib import Path
from typing import TypeVar

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from mirror import rawbody
from mirror.upstream import make_client

GB = 1e9
CEILING = "ceiling: blocking socket recv_into, no HTTP"
_SLICE = 64 << 20
T = TypeVar("T")  # the server hands the kernel 64 MiB of the body per sock_sendall call


# -- server (child process) -----------------------------------------------------------------


async def _handle(
    loop: asyncio.AbstractEventLoop, conn: socket.socket, head: bytes, body: memoryview
) -> None:
    pending = b""
    with conn:
        while True:
            while b"\r\n\r\n" not in pending:
                data = await loop.sock_recv(conn, 65536)
                if not data:
                    return
                pending += data
            request, _, pending = pending.partition(b"\r\n\r\n")
            # Any method, any path: GETs carry no body, so the request ends at the blank line.
            await loop.sock_sendall(conn, head)
            if not request.startswith(b"HEAD "):
                for start in range(0, len(body), _SLICE):
                    await loop.sock_sendall(conn, body[start : start + _SLICE])


async def _serve(listener: socket.socket, size: int) -> None:
    loop = asyncio.get_running_loop()
    body = memoryview(bytearray(size))
    head = (
        "HTTP/1.1 200 OK\r\n"
        f"Content-Length: {size}\r\n"
        "Content-Type: application/octet-stream\r\n"
        "\r\n"
    ).encode()
    tasks: set[asyncio.Task[None]] = set()
    while True:
        conn, _ = await loop.sock_accept(listener)
        conn.setblocking(False)
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        task = loop.create_task(_handle(loop, conn, head, body))
        tasks.add(task)
        task.add_done_callback(tasks.discard)


def _server_main(size: int, ready: Connection) -> None:
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind(("127.0.0.1", 0))
    listener.listen(16)
    listener.setblocking(False)
    ready.send(listener.getsockname()[1])
    ready.close()
    asyncio.run(_serve(listener, size))


# -- client (this process) ------------------------------------------------------------------


@dataclass(frozen=True)
class Sample:
    wall: float
    user: float
    system: float

    @property
    def cpu(self) -> float:
        return self.user + self.system


@dataclass(frozen=True)
class Variant:
    name: str
    make: Callable[[], httpx.AsyncClient]
    raw: bool = False  # the body read off the socket as the mirror's downloads do


VARIANTS = (
    Variant("httpx default transport", httpx.AsyncClient),
    Variant("make_client (httpx-aiohttp)", lambda: make_client(10, 60)),
    Variant("make_client + mirror.rawbody", lambda: make_client(10, 60), raw=True),
)


async def _read_once(client: httpx.AsyncClient, url: str, size: int, raw: bool) -> Sample:
    before = resource.getrusage(resource.RUSAGE_SELF)
    start = time.perf_counter()
    received = 0
    async with client.stream("GET", url) as resp:
        resp.raise_for_status()
        body = (rawbody.take(resp, 1.0) if raw else None) or resp.aiter_raw()
        async for chunk in body:
            received += len(chunk)
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_SELF)
    if received != size:
        raise RuntimeError(f"read {received} bytes, expected {size}")
    return Sample(wall, after.ru_utime - before.ru_utime, after.ru_stime - before.ru_stime)


def _ceiling(port: int, size: int) -> Sample:
    """A blocking socket reading into one reused buffer: what server and kernel allow."""
    buf = memoryview(bytearray(1 << 20))
    before = resource.getrusage(resource.RUSAGE_SELF)
    start = time.perf_counter()
    with socket.create_connection(("127.0.0.1", port)) as sock:
        sock.sendall(b"GET /blob HTTP/1.1\r\nHost: bench\r\n\r\n")
        pending = b""
        while b"\r\n\r\n" not in pending:
            pending += sock.recv(65536)
        received = len(pending.partition(b"\r\n\r\n")[2])
        while received < size:
            n = sock.recv_into(buf)
            if not n:
                break
            received += n
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_SELF)
    if received != size:
        raise RuntimeError(f"read {received} bytes, expected {size}")
    return Sample(wall, after.ru_utime - before.ru_utime, after.ru_stime - before.ru_stime)


async def _bench(url: str, size: int, repeat: int) -> dict[str, list[Sample]]:
    clients = [(v, v.make()) for v in VARIANTS]
    results: dict[str, list[Sample]] = {v.name: [] for v, _ in clients}
    try:
        # Interleaved, so drift (thermal, page cache, noisy neighbours) hits all alike.
        for _ in range(repeat):
            for v, client in clients:
                results[v.name].append(await _read_once(client, url, size, v.raw))
    finally:
        for _, client in clients:
            await client.aclose()
    return results


def _run(main: Coroutine[None, None, T], loop_name: str) -> T:
    if loop_name == "uvloop":
        import uvloop

        return uvloop.run(main)
    return asyncio.run(main)


def _report(results: dict[str, list[Sample]], size: int, loop_name: str) -> None:
    gb = size / GB
    repeats = len(next(iter(results.values())))
    print(
        f"Body {size >> 20} MiB, {repeats} repeats, client loop {loop_name}, "
        f"Python {sys.version.split()[0]}, httpx {httpx.__version__}"
    )
    # glibc's malloc tunables change the result a lot (page faults on fresh buffers).
    tunables = sorted(f"{k}={v}" for k, v in os.environ.items() if k.startswith("MALLOC_"))
    print(f"malloc tunables: {' '.join(tunables) or 'none'}")
    print()
    print("| variant | GB/s (median) | GB/s (min-max) | CPU s/GB | user s/GB | sys s/GB |")
    print("|---|---:|---:|---:|---:|---:|")
    medians: dict[str, float] = {}
    for name, samples in results.items():
        rates = [gb / s.wall for s in samples]
        medians[name] = statistics.median(rates)
        print(
            f"| {name} | {medians[name]:.2f} | {min(rates):.2f}-{max(rates):.2f} "
            f"| {statistics.median(s.cpu / gb for s in samples):.3f} "
            f"| {statistics.median(s.user / gb for s in samples):.3f} "
            f"| {statistics.median(s.system / gb for s in samples):.3f} |"
        )
    default, aiohttp, raw = (medians[v.name] for v in VARIANTS)
    print()
    print(f"aiohttp transport / default = {aiohttp / default:.2f}\u00d7")
    print(f"rawbody / aiohttp transport = {raw / aiohttp:.2f}\u00d7")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--size-mib", type=int, default=1024, help="body size (MiB)")
    parser.add_argument("--repeat", type=int, default=3, help="timed reads per variant")
    parser.add_argument(
        "--loop",
        choices=("uvloop", "asyncio"),
        default="uvloop",
        help="client event loop (default uvloop: what `mirror serve` runs on under uvicorn)",
    )
    parser.add_argument(
        "--mallopt",
        action="store_true",
        help="pin glibc malloc thresholds in the client first, as `mirror serve` does",
    )
    args = parser.parse_args()
    size = args.size_mib << 20
    if args.mallopt:
        from mirror.tuning import tune_malloc

        print(f"mirror.tuning.tune_malloc() applied: {tune_malloc()}")

    ctx = multiprocessing.get_context("spawn")
    receiver, sender = ctx.Pipe(duplex=False)
    server = ctx.Process(target=_server_main, args=(size, sender), daemon=True)
    server.start()
    sender.close()
    try:
        if not receiver.poll(30):
            raise RuntimeError("the body server did not start")
        port: int = receiver.recv()
        url = f"http://127.0.0.1:{port}/blob"
        results = _run(_bench(url, size, args.repeat), args.loop)
        results[CEILING] = [_ceiling(port, size) for _ in range(args.repeat)]
    finally:
        server.terminate()
        server.join(10)
        if server.is_alive():
            server.kill()
            server.join()
    _report(results, size, args.loop)


if __name__ == "__main__":
    main()
