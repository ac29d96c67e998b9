"""Cached bytes sent with sendfile(2) through the real listener: the zero-copy extension."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import socket
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
from fakes.server import serve
from starlette.types import Receive, Scope, Send

from mirror import filespan, zerocopy
from mirror.diskstore import DiskBlob
from mirror.listener import Limits
from mirror.metrics import Metrics
from mirror.responses import BlobResponse

SIZE = 24 << 20


@pytest.fixture
def blob_file(tmp_path: Path) -> tuple[Path, bytes]:
    data = os.urandom(SIZE)
    path = tmp_path / "blob"
    path.write_bytes(data)
    return path, data


class Served:
    def __init__(self) -> None:
        self.sent: list[int] = []  # on_chunk calls
        self.scopes: list[Scope] = []
        self.finished = asyncio.Event()
        self.errors: list[BaseException] = []


def _app(path: Path, served: Served, length: int = SIZE) -> Callable[..., Any]:
    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return
        served.scopes.append(scope)
        blob = DiskBlob(os.open(path, os.O_RDONLY), length)
        response = BlobResponse(
            200, {"Content-Length": str(length)}, blob.body(0, None), served.sent.append
        )
        try:
            await response(scope, receive, send)
        except BaseException as exc:
            served.errors.append(exc)
            raise
        finally:
            served.finished.set()

    return app


@contextlib.asynccontextmanager
async def listening(app: Callable[..., Any]) -> AsyncIterator[int]:
    """`app` behind the listener `mirror serve` uses (its protocol class); the port."""
    limits = Limits(Metrics(), max_connections=100, header_timeout=30, max_header_bytes=16384)
    async with serve(app, lifespan="off", http=limits.protocol()) as url:
        yield int(url.rsplit(":", 1)[1])


async def _get(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> tuple[bytes, bytes]:
    writer.write(b"GET /blob HTTP/1.1\r\nhost: x\r\n\r\n")
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
    length = int(head.lower().split(b"content-length: ")[1].split(b"\r\n")[0])
    body = await asyncio.wait_for(reader.readexactly(length), 30)
    return head, body


class SendfileCalls:
    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.calls = 0
        real = os.sendfile

        def counted(*args: int) -> int:
            self.calls += 1
            return real(*args)

        monkeypatch.setattr(os, "sendfile", counted)


async def test_a_cached_file_is_sent_with_sendfile_on_a_keep_alive_connection(
    blob_file: tuple[Path, bytes], monkeypatch: pytest.MonkeyPatch
) -> None:
    path, data = blob_file
    calls = SendfileCalls(monkeypatch)
    served = Served()
    async with listening(_app(path, served)) as port:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        # Twice on one connection: the cycle's bookkeeping lets the next request in.
        for _ in range(2):
            head, body = await _get(reader, writer)
            assert head.startswith(b"HTTP/1.1 200")
            assert hashlib.sha256(body).digest() == hashlib.sha256(data).digest()
        writer.close()
    assert calls.calls >= 2
    assert zerocopy.EXTENSION in served.scopes[0]["extensions"]
    # Counted per window, as the bytes leave.
    assert sum(served.sent) == 2 * SIZE
    assert max(served.sent) <= filespan.SEND_WINDOW


async def test_a_slow_reader_gets_every_byte_in_order(
    blob_file: tuple[Path, bytes], monkeypatch: pytest.MonkeyPatch
) -> None:
    path, data = blob_file
    calls = SendfileCalls(monkeypatch)
    async with listening(_app(path, Served())) as port:
        sock = socket.socket()
        # A small receive window: the server's socket fills, and sendfile must wait.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 16384)
        sock.connect(("127.0.0.1", port))
        reader, writer = await asyncio.open_connection(sock=sock)
        writer.write(b"GET /blob HTTP/1.1\r\nhost: x\r\n\r\n")
        await reader.readuntil(b"\r\n\r\n")
        got = bytearray()
        while len(got) < SIZE:
            got += await asyncio.wait_for(reader.read(65536), 10)
            if len(got) < 1 << 20:
                await asyncio.sleep(0.001)
        writer.close()
    assert bytes(got) == data
    assert calls.calls > 2  # partial sends, each resumed once the socket drained


async def test_a_client_that_leaves_ends_the_send_and_releases_everything(
    blob_file: tuple[Path, bytes],
) -> None:
    path, _ = blob_file
    served = Served()
    fds_before = len(os.listdir("/proc/self/fd"))
    async with listening(_app(path, served)) as port:
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 16384)
        sock.connect(("127.0.0.1", port))
        reader, writer = await asyncio.open_connection(sock=sock)
        writer.write(b"GET /blob HTTP/1.1\r\nhost: x\r\n\r\n")
        await reader.readexactly(100_000)
        writer.transport.abort()  # a reset, mid-body
        await asyncio.wait_for(served.finished.wait(), 10)
    # The blob's descriptor and any duplicate of the socket are closed.
    assert len(os.listdir("/proc/self/fd")) <= fds_before
    assert served.errors == []


async def test_a_file_shorter_than_promised_cuts_the_connection(tmp_path: Path) -> None:
    path = tmp_path / "short"
    path.write_bytes(b"x" * 1000)
    served = Served()
    async with listening(_app(path, served, length=5000)) as port:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"GET /blob HTTP/1.1\r\nhost: x\r\n\r\n")
        head = await reader.readuntil(b"\r\n\r\n")
        assert b"content-length: 5000" in head.lower()
        rest = await asyncio.wait_for(reader.read(), 10)  # until the server closes
        writer.close()
    assert len(rest) == 1000  # never a complete body


def _resident(fd: int, pos: int) -> bool:
    try:
        os.preadv(fd, [bytearray(1)], pos, os.RWF_NOWAIT)
    except BlockingIOError:
        return False
    return True


async def test_cold_pages_are_read_by_a_worker_thread_never_the_loop(
    blob_file: tuple[Path, bytes], monkeypatch: pytest.MonkeyPatch
) -> None:
    path, data = blob_file
    faulted: list[tuple[int, int]] = []
    cold_reads: list[int] = []  # reads in the loop that would have waited for the disk
    real_fault_in, real_pread = filespan._fault_in, os.pread

    def fault_in(fd: int, offset: int, count: int) -> None:
        faulted.append((offset, count))
        real_fault_in(fd, offset, count)

    def pread(fd: int, n: int, pos: int) -> bytes:
        if not (_resident(fd, pos) and _resident(fd, pos + n - 1)):
            cold_reads.append(pos)
        return real_pread(fd, n, pos)

    monkeypatch.setattr(filespan, "_fault_in", fault_in)
    monkeypatch.setattr(os, "pread", pread)
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)  # out of the page cache
        assert not _resident(fd, 0)
        span = filespan.FileSpan(fd, 0, SIZE)
        assert b"".join([p async for p in filespan.as_bytes(_once(span))]) == data
        assert faulted[0] == (0, filespan.SEND_WINDOW)  # by a worker thread
        assert cold_reads == []
        faulted.clear()
        assert b"".join([p async for p in filespan.as_bytes(_once(span))]) == data
        assert faulted == []  # warm now: the probes only
    finally:
        os.close(fd)


async def _once(span: filespan.FileSpan) -> AsyncIterator[filespan.FileSpan]:
    yield span


async def test_a_response_without_content_length_is_sent_chunked_with_sendfile(
    blob_file: tuple[Path, bytes], monkeypatch: pytest.MonkeyPatch
) -> None:
    # A blob of a chunked upstream has no Content-Length: its spans are framed as chunks.
    path, data = blob_file
    calls = SendfileCalls(monkeypatch)
    errors: list[BaseException] = []

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return
        blob = DiskBlob(os.open(path, os.O_RDONLY), SIZE)
        try:
            await BlobResponse(200, {}, blob.body(0, None), lambda n: None)(scope, receive, send)
        except BaseException as exc:
            errors.append(exc)
            raise

    async with listening(app) as port, httpx.AsyncClient(timeout=30) as client:
        for _ in range(2):  # kept alive: the last chunk ended the first body
            resp = await client.get(f"http://127.0.0.1:{port}/blob")
            assert resp.headers["transfer-encoding"] == "chunked"
            assert hashlib.sha256(resp.content).digest() == hashlib.sha256(data).digest()
    assert errors == []
    assert calls.calls >= 2


async def test_bytes_a_departed_client_never_got_are_not_counted_as_sent(tmp_path: Path) -> None:
    size = 64 << 20  # eight windows, all in the page cache: nothing makes the send wait
    path = tmp_path / "big"
    path.write_bytes(b"s" * size)
    served = Served()
    async with listening(_app(path, served, length=size)) as port:
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 16384)
        sock.connect(("127.0.0.1", port))
        reader, writer = await asyncio.open_connection(sock=sock)
        writer.write(b"GET /blob HTTP/1.1\r\nhost: x\r\n\r\n")
        await reader.readexactly(100_000)
        writer.transport.abort()  # a reset in the first window
        await asyncio.wait_for(served.finished.wait(), 10)
    assert served.errors == []
    assert sum(served.sent) < filespan.SEND_WINDOW  # not the other 56 MiB
