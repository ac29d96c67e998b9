"""The listener's guard against clients: silent, oversized and too many connections."""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import AsyncIterator

import pytest
import uvicorn

from mirror.app import create_app
from mirror.config import Settings
from mirror.metrics import Metrics
from mirror.server import uvicorn_config


@contextlib.asynccontextmanager
async def guarded(settings: Settings) -> AsyncIterator[tuple[int, Metrics]]:
    """The mirror app behind the real listener configuration `mirror serve` uses."""
    app = create_app(settings)
    config = uvicorn_config(app, settings, app.state.metrics)
    config.log_level = "warning"
    server = uvicorn.Server(config)
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    task = asyncio.create_task(server.serve(sockets=[sock]))
    while not server.started:
        await asyncio.sleep(0.01)
    try:
        yield sock.getsockname()[1], app.state.metrics
    finally:
        server.should_exit = True
        await task
        sock.close()


def _refused(metrics: Metrics, reason: str) -> float:
    value = metrics.registry.get_sample_value(
        "mirror_client_connections_refused_total", {"reason": reason}
    )
    return value or 0.0


async def _closed_by_server(reader: asyncio.StreamReader) -> bytes:
    return await asyncio.wait_for(reader.read(), timeout=10)


@pytest.fixture
def settings(tmp_path: object, no_mirror_env: None) -> Settings:
    return Settings(
        upstream="http://127.0.0.1:9",
        cache_dir=f"{tmp_path}/cache",
        header_timeout=0.3,
        max_header_bytes=16 * 1024,
        max_connections=5,
    )


async def test_connections_that_send_nothing_are_closed(settings: Settings) -> None:
    async with guarded(settings) as (port, metrics):
        silent = [await asyncio.open_connection("127.0.0.1", port) for _ in range(3)]
        # A trickle of header bytes is no excuse either: the deadline is for the head.
        trickle = await asyncio.open_connection("127.0.0.1", port)
        trickle[1].write(b"GET /v2/ HTTP/1.1\r\n")
        for reader, writer in [*silent, trickle]:
            assert await _closed_by_server(reader) == b""
            writer.close()
        assert _refused(metrics, "header_timeout") == 4
        # A client that asks in time is served, and may ask again on the same connection.
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        for _ in range(2):
            writer.write(b"GET /healthz HTTP/1.1\r\nhost: x\r\n\r\n")
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
            assert head.startswith(b"HTTP/1.1 200")
            await reader.readexactly(15)  # {"status":"ok"}
        writer.close()


async def test_an_oversized_request_head_gets_431_and_is_never_buffered(
    settings: Settings,
) -> None:
    async with guarded(settings) as (port, metrics):
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"GET /v2/ HTTP/1.1\r\nx-big: " + b"a" * (20 << 10) + b"\r\n\r\n")
        answer = await _closed_by_server(reader)
        writer.close()
        assert answer.startswith(b"HTTP/1.1 431")
        assert b'"errors"' in answer
        # 32 MiB of header: cut off after the first 16 KiB, not read into memory. The
        # client may see the 431 or a reset: the server closed with bytes unread.
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        with contextlib.suppress(ConnectionError):
            writer.write(b"GET /v2/ HTTP/1.1\r\nx-big: " + b"a" * (32 << 20))
            await writer.drain()
        with contextlib.suppress(ConnectionError):
            await _closed_by_server(reader)
        writer.close()
        assert _refused(metrics, "headers_too_large") == 2


async def test_connections_past_the_cap_are_closed_at_once(settings: Settings) -> None:
    async with guarded(settings) as (port, metrics):
        held = [await asyncio.open_connection("127.0.0.1", port) for _ in range(5)]
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        assert await asyncio.wait_for(reader.read(), timeout=0.25) == b""  # before the deadline
        assert _refused(metrics, "limit") == 1
        for _, w in [*held, (reader, writer)]:
            w.close()


async def test_a_tls_handshake_on_the_plain_port_is_closed_quietly(
    settings: Settings, caplog: pytest.LogCaptureFixture
) -> None:
    # skopeo and podman try HTTPS first: a ClientHello's first bytes.
    async with guarded(settings) as (port, metrics):
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + b"\x00" * 64)
        assert await _closed_by_server(reader) == b""
        writer.close()
        assert _refused(metrics, "tls_on_plain_port") == 1
    assert "Invalid HTTP request" not in caplog.text


async def test_pipelined_small_requests_are_each_their_own_head(settings: Settings) -> None:
    async with guarded(settings) as (port, metrics):
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        one = b"GET /healthz HTTP/1.1\r\nhost: x\r\n\r\n"
        writer.write(one * 600)  # ~21 KB in a read or two, each head far under 16 KiB
        answers = b""
        while answers.count(b"HTTP/1.1 200") < 600:
            chunk = await asyncio.wait_for(reader.read(1 << 20), 10)
            assert chunk, f"closed after {answers.count(b'HTTP/1.1 200')} answers"
            answers += chunk
        writer.close()
        assert _refused(metrics, "headers_too_large") == 0


async def test_the_next_head_is_due_after_a_long_response_and_a_body_is_never_waited_for(
    settings: Settings,
) -> None:
    async with guarded(settings) as (port, metrics):
        # A request announcing a body it trickles: answered, then the connection closes.
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"GET /healthz HTTP/1.1\r\nhost: x\r\ncontent-length: 100000000\r\n\r\n")
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
        assert head.startswith(b"HTTP/1.1 200")
        await reader.readexactly(15)
        writer.write(b"a")
        assert await _closed_by_server(reader) == b""
        writer.close()
        # After a response, a head trickled a byte at a time still meets the deadline.
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"GET /healthz HTTP/1.1\r\nhost: x\r\n\r\n")
        await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
        await reader.readexactly(15)

        async def trickle() -> None:
            for byte in b"GET /healthz HTTP/1.1\r\n":
                writer.write(bytes([byte]))
                await asyncio.sleep(0.05)

        trickling = asyncio.create_task(trickle())
        assert await _closed_by_server(reader) == b""
        trickling.cancel()
        writer.close()
        assert _refused(metrics, "header_timeout") >= 1
