"""Load clients for bench/compare/, run in worker processes (never in the orchestrator).

- `fetch_blobs`: N concurrent GETs of one blob, one thread and one raw socket each,
  `recv_into` a reused 1 MiB buffer and hashlib on each piece (both release the GIL, so
  the threads use every core). Every body's sha256 is checked, unless the clients only
  count bytes (`verify=False`, like curl): then the clients leave the CPU to the server.
- `manifest_load`: C keep-alive connections on uvloop with a minimal HTTP/1.1 protocol,
  each sending requests back to back for a fixed time; latencies and checked digests.
- `probe`: sequential requests on one keep-alive connection, paced, until a stop file
  appears; latencies and checked digests.
- `static_server` / `blob_server`: answer every request with one fixed response, to
  measure the ceilings of `manifest_load` and `fetch_blobs` themselves.

Times are `time.monotonic()` (CLOCK_MONOTONIC is system-wide, so they compare across
processes). Results are plain dataclasses, so they pickle back to the orchestrator.
"""

from __future__ import annotations

import asyncio
import hashlib
import http.client
import resource
import socket
import threading
import time
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from pathlib import Path
from typing import cast

CHUNK = 1 << 20


def _cpu_self() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


# -- blobs ----------------------------------------------------------------------------------


@dataclass
class Stream:
    status: int = 0
    received: int = 0
    digest_ok: bool = False
    start: float = 0.0
    first_byte: float = 0.0  # response head received
    all_but_last: float = 0.0  # every byte but the last one received
    end: float = 0.0
    error: str = ""

    @property
    def ok(self) -> bool:
        return self.status == 200 and self.digest_ok and not self.error


@dataclass
class BlobRun:
    streams: list[Stream]
    cpu: float  # user + system seconds of the client process during the run
    size: int

    @property
    def failures(self) -> list[str]:
        return [
            f"stream {i}: status {s.status}, {s.received} bytes, digest ok {s.digest_ok}"
            + (f", {s.error}" if s.error else "")
            for i, s in enumerate(self.streams)
            if not s.ok or s.received != self.size
        ]

    @property
    def wall(self) -> float:
        return max(s.end for s in self.streams) - min(s.start for s in self.streams)

    @property
    def total(self) -> int:
        return sum(s.received for s in self.streams)


def _fetch_one(
    host: str,
    port: int,
    path: str,
    headers: dict[str, str],
    digest: str,
    barrier: threading.Barrier,
    timeout: float,
    verify: bool,
) -> Stream:
    """One GET on a raw socket: `recv_into` returns whatever has arrived, so the time the
    last-but-one byte arrived is seen (our mirror holds the last byte back until commit)."""
    out = Stream()
    view = memoryview(bytearray(CHUNK))
    hasher = hashlib.sha256()
    lines = [f"GET {path} HTTP/1.1", f"Host: {host}:{port}", "Accept-Encoding: identity"]
    lines += [f"{k}: {v}" for k, v in headers.items()]
    request = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")
    sock: socket.socket | None = None
    try:
        try:
            sock = socket.create_connection((host, port), timeout=timeout)
        except BaseException:
            barrier.abort()  # the others must not wait for a client that never comes
            raise
        barrier.wait(timeout)
        out.start = time.monotonic()
        sock.sendall(request)
        pending = b""
        while b"\r\n\r\n" not in pending:
            data = sock.recv(65536)
            if not data:
                raise ConnectionError("closed before the response head")
            pending += data
        head, _, rest = pending.partition(b"\r\n\r\n")
        out.first_byte = time.monotonic()
        head_lines = head.decode("latin-1").split("\r\n")
        out.status = int(head_lines[0].split(" ", 2)[1])
        fields = {
            name.strip().lower(): value.strip()
            for name, _, value in (line.partition(":") for line in head_lines[1:])
        }
        if "content-length" not in fields:
            raise ValueError(f"no Content-Length in the response head: {fields}")
        length = int(fields["content-length"])
        hasher.update(rest)
        out.received = len(rest)
        while out.received < length:
            n = sock.recv_into(view, min(CHUNK, length - out.received))
            if n == 0:
                raise ConnectionError(f"closed after {out.received} of {length} bytes")
            if verify:
                hasher.update(view[:n])
            out.received += n
            if not out.all_but_last and out.received >= length - 1:
                out.all_but_last = time.monotonic()
        out.end = time.monotonic()
        out.digest_ok = not verify or "sha256:" + hasher.hexdigest() == digest
    except Exception as exc:  # every failure is reported, none is raised past the thread
        out.end = out.end or time.monotonic()
        out.error = repr(exc)
    finally:
        if sock is not None:
            sock.close()
    return out


def fetch_blobs(
    host: str,
    port: int,
    path: str,
    digest: str,
    size: int,
    clients: int,
    *,
    headers: dict[str, str] | None = None,
    timeout: float = 300,
    verify: bool = True,
    targets: list[tuple[str, str]] | None = None,
) -> BlobRun:
    """`clients` concurrent GETs of one blob; all connect first, then start together.

    `verify=False` only counts bytes (every stream must still bring exactly `size`).
    `targets`: (path, digest) per client, round robin, instead of the one blob; all of
    `size` bytes.
    """
    barrier = threading.Barrier(clients)
    streams: list[Stream] = [Stream() for _ in range(clients)]
    where = targets or [(path, digest)]

    def run(i: int) -> None:
        p, d = where[i % len(where)]
        streams[i] = _fetch_one(host, port, p, headers or {}, d, barrier, timeout, verify)

    threads = [threading.Thread(target=run, args=(i,), daemon=True) for i in range(clients)]
    before = _cpu_self()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout + 30)
        if thread.is_alive():
            raise RuntimeError(f"a blob client thread did not finish within {timeout + 30}s")
    return BlobRun(streams, _cpu_self() - before, size)


# -- manifests ------------------------------------------------------------------------------


@dataclass
class LoadRun:
    requests: int
    seconds: float
    latencies: list[float]  # seconds, every request completed inside the window
    bad: int  # wrong status or wrong digest
    errors: list[str] = field(default_factory=list)
    cpu: float = 0.0
    statuses: dict[int, int] = field(default_factory=dict)
    total: int = 0  # all requests sent, warm-up included
    starts: list[float] = field(default_factory=list)  # probe: when each request began


class _HttpConn(asyncio.Protocol):
    """One keep-alive connection: one outstanding request, Content-Length responses."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.buf = bytearray()
        self.waiter: asyncio.Future[tuple[int, bytes]] | None = None
        self.need = -1  # total bytes of the current response, once the head is parsed
        self.head_len = 0
        self.status = 0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not asyncio.Transport subclasses, but behave as one.
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        self.buf += data
        if self.need < 0:
            at = self.buf.find(b"\r\n\r\n")
            if at < 0:
                return
            head = bytes(self.buf[:at]).decode("latin-1").lower()
            self.status = int(head.split(" ", 2)[1])
            length = -1
            for line in head.split("\r\n")[1:]:
                name, _, value = line.partition(":")
                if name.strip() == "content-length":
                    length = int(value)
            if length < 0:
                self._fail(RuntimeError("response without Content-Length"))
                return
            self.head_len = at + 4
            self.need = self.head_len + length
        if len(self.buf) >= self.need:
            body = bytes(self.buf[self.head_len : self.need])
            del self.buf[: self.need]
            self.need = -1
            if self.waiter is not None and not self.waiter.done():
                self.waiter.set_result((self.status, body))

    def _fail(self, exc: BaseException) -> None:
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_exception(exc)

    def connection_lost(self, exc: Exception | None) -> None:
        self._fail(exc or ConnectionError("connection closed by the server"))

    async def request(self, raw: bytes) -> tuple[int, bytes]:
        assert self.transport is not None
        self.waiter = asyncio.get_running_loop().create_future()
        self.transport.write(raw)
        return await self.waiter


def _request_bytes(host: str, port: int, path: str, headers: dict[str, str]) -> bytes:
    lines = [f"GET {path} HTTP/1.1", f"Host: {host}:{port}"]
    lines += [f"{k}: {v}" for k, v in headers.items()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


async def _manifest_load(
    host: str,
    port: int,
    path: str,
    headers: dict[str, str],
    digest: str | None,
    conns: int,
    seconds: float,
    warmup: float,
) -> LoadRun:
    loop = asyncio.get_running_loop()
    raw = _request_bytes(host, port, path, headers)
    protocols = []
    for _ in range(conns):
        _, proto = await loop.create_connection(_HttpConn, host, port)
        protocols.append(proto)
    start = time.monotonic()
    window = (start + warmup, start + warmup + seconds)
    latencies: list[float] = []
    statuses: dict[int, int] = {}
    bad = total = 0
    errors: list[str] = []

    async def worker(proto: _HttpConn) -> None:
        nonlocal bad, total
        while (now := time.monotonic()) < window[1]:
            try:
                status, body = await proto.request(raw)
            except Exception as exc:
                errors.append(repr(exc))
                return
            total += 1
            done = time.monotonic()
            if now >= window[0] and done <= window[1]:
                latencies.append(done - now)
                statuses[status] = statuses.get(status, 0) + 1
                good = status == 200 and (
                    digest is None or "sha256:" + hashlib.sha256(body).hexdigest() == digest
                )
                bad += not good

    before = _cpu_self()
    await asyncio.wait_for(asyncio.gather(*(worker(p) for p in protocols)), warmup + seconds + 60)
    cpu = _cpu_self() - before
    for proto in protocols:
        if proto.transport is not None:
            proto.transport.close()
    return LoadRun(len(latencies), seconds, latencies, bad, errors[:10], cpu, statuses, total)


def manifest_load(
    host: str,
    port: int,
    path: str,
    headers: dict[str, str],
    digest: str | None,
    conns: int,
    seconds: float,
    warmup: float = 0.5,
) -> LoadRun:
    """Closed-loop load: `conns` connections, each with one request in flight at a time.

    Only requests that start after `warmup` and end inside the `seconds` window count.
    """
    import uvloop

    return uvloop.run(_manifest_load(host, port, path, headers, digest, conns, seconds, warmup))


def probe(
    host: str,
    port: int,
    path: str,
    headers: dict[str, str],
    digest: str,
    stop_file: str,
    interval: float,
    max_seconds: float,
) -> LoadRun:
    """Sequential GETs on one keep-alive connection, one every `interval` seconds at most,
    until `stop_file` exists or `max_seconds` pass."""
    conn = http.client.HTTPConnection(host, port, timeout=30)
    latencies: list[float] = []
    starts: list[float] = []
    statuses: dict[int, int] = {}
    errors: list[str] = []
    bad = 0
    start = time.monotonic()
    before = _cpu_self()
    stop = Path(stop_file)
    try:
        while not stop.exists() and time.monotonic() - start < max_seconds:
            began = time.monotonic()
            try:
                conn.request("GET", path, headers=headers)
                resp = conn.getresponse()
                body = resp.read()
            except Exception as exc:
                errors.append(repr(exc))
                conn.close()
                conn = http.client.HTTPConnection(host, port, timeout=30)
                continue
            latencies.append(time.monotonic() - began)
            starts.append(began)
            statuses[resp.status] = statuses.get(resp.status, 0) + 1
            bad += resp.status != 200 or "sha256:" + hashlib.sha256(body).hexdigest() != digest
            pause = interval - (time.monotonic() - began)
            if pause > 0:
                time.sleep(pause)
    finally:
        conn.close()
    seconds = time.monotonic() - start
    cpu = _cpu_self() - before
    return LoadRun(
        len(latencies), seconds, latencies, bad, errors[:10], cpu, statuses, len(latencies), starts
    )


# -- a trivial server, for the manifest client's own ceiling ---------------------------------


class _Static(asyncio.Protocol):
    response = b""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        self.buf = b""

    def data_received(self, data: bytes) -> None:
        self.buf += data
        while (at := self.buf.find(b"\r\n\r\n")) >= 0:
            self.buf = self.buf[at + 4 :]
            self.transport.write(self.response)


def static_server(body: bytes, content_type: str, ready: Connection) -> None:
    """Answer every GET with `body` (run in its own process; terminate it to stop)."""
    import uvloop

    _Static.response = (
        f"HTTP/1.1 200 OK\r\nContent-Type: {content_type}\r\nContent-Length: {len(body)}\r\n\r\n"
    ).encode() + body

    async def main() -> None:
        loop = asyncio.get_running_loop()
        server = await loop.create_server(_Static, "127.0.0.1", 0, backlog=512)
        ready.send(server.sockets[0].getsockname()[1])
        ready.close()
        await server.serve_forever()

    uvloop.run(main())


async def _serve_blob(listener: socket.socket, size: int) -> None:
    loop = asyncio.get_running_loop()
    body = memoryview(bytearray(size))
    head = f"HTTP/1.1 200 OK\r\nContent-Length: {size}\r\n\r\n".encode()

    async def handle(conn: socket.socket) -> None:
        pending = b""
        with conn:
            while True:
                while b"\r\n\r\n" not in pending:
                    data = await loop.sock_recv(conn, 65536)
                    if not data:
                        return
                    pending += data
                _, _, pending = pending.partition(b"\r\n\r\n")
                await loop.sock_sendall(conn, head)
                for start in range(0, size, 64 * CHUNK):
                    await loop.sock_sendall(conn, body[start : start + 64 * CHUNK])

    tasks: set[asyncio.Task[None]] = set()
    while True:
        conn, _ = await loop.sock_accept(listener)
        conn.setblocking(False)
        task = loop.create_task(handle(conn))
        tasks.add(task)
        task.add_done_callback(tasks.discard)


def blob_server(size: int, ready: Connection) -> None:
    """Answer every GET with `size` zero bytes straight from memory (its own process)."""
    import uvloop

    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.bind(("127.0.0.1", 0))
    listener.listen(128)
    listener.setblocking(False)
    ready.send(listener.getsockname()[1])
    ready.close()
    uvloop.run(_serve_blob(listener, size))


def zeros_digest(size: int) -> str:
    hasher = hashlib.sha256()
    block = bytes(CHUNK)
    for start in range(0, size, CHUNK):
        hasher.update(block[: min(CHUNK, size - start)])
    return "sha256:" + hasher.hexdigest()
