"""TLS on the listener: the context, reloads in place, client certificates, and the
ASGI TLS extension, through real handshakes with the real listener configuration."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil
import socket
import ssl
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import uvicorn
from fakes.pki import CA, Issued, client_context, peer_serial
from fastapi import FastAPI, Request
from starlette.responses import JSONResponse

from mirror.config import Settings
from mirror.loading import SettingsError, load_settings
from mirror.metrics import Metrics
from mirror.server import uvicorn_config
from mirror.tls import ServerTLS, TLSError, TLSFiles, client_common_name, server_tls


@dataclass
class PKI:
    ca: CA
    server: Issued
    alice: Issued  # a client certificate from the same CA
    stranger: Issued  # a client certificate from another CA


@pytest.fixture
def pki(tmp_path: Path) -> PKI:
    ca = CA(tmp_path / "ca")
    other = CA(tmp_path / "other", name="other CA")
    server = ca.issue("server")
    return PKI(ca, server, ca.issue("alice", server=False), other.issue("mallory", server=False))


def _files(pki: PKI, client_auth: str | None = None) -> TLSFiles:
    if client_auth is None:
        return TLSFiles(pki.server.cert, pki.server.key)
    assert client_auth in ("require", "optional")
    return TLSFiles(pki.server.cert, pki.server.key, pki.ca.cert, client_auth)  # type: ignore[arg-type]


def _whoami() -> FastAPI:
    app = FastAPI()

    @app.get("/whoami")
    async def whoami(request: Request) -> JSONResponse:
        tls: dict[str, Any] = request.scope.get("extensions", {}).get("tls", {})
        return JSONResponse(
            {
                "cn": client_common_name(request.scope),
                "name": tls.get("client_cert_name"),
                "version": tls.get("tls_version"),
                "cipher": tls.get("cipher_suite"),
                "scheme": request.url.scheme,
            }
        )

    return app


@contextlib.asynccontextmanager
async def listening(
    tls: ServerTLS, tmp_path: Path, **limits: Any
) -> AsyncIterator[tuple[int, Metrics]]:
    """A test app behind the listener configuration `mirror serve` uses, with TLS."""
    settings = Settings(upstream="http://127.0.0.1:9", cache_dir=tmp_path / "cache", **limits)
    metrics = Metrics()
    config = uvicorn_config(_whoami(), settings, metrics, tls)
    config.log_level = "warning"
    server = uvicorn.Server(config)
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    task = asyncio.create_task(server.serve(sockets=[sock]))
    while not server.started:
        await asyncio.sleep(0.01)
    try:
        yield sock.getsockname()[1], metrics
    finally:
        server.should_exit = True
        await task
        sock.close()


async def _whoami_over(port: int, context: ssl.SSLContext) -> dict[str, Any]:
    async with httpx.AsyncClient(verify=context) as client:
        r = await client.get(f"https://127.0.0.1:{port}/whoami", timeout=10)
    assert r.status_code == 200
    body: dict[str, Any] = r.json()
    return body


def _sample(metrics: Metrics, name: str, **labels: str) -> float:
    return metrics.registry.get_sample_value(name, labels) or 0.0


# -- the context ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("client_auth", "mode"),
    [
        pytest.param(None, ssl.CERT_NONE, id="no-client-ca"),
        pytest.param("require", ssl.CERT_REQUIRED, id="require"),
        pytest.param("optional", ssl.CERT_OPTIONAL, id="optional"),
    ],
)
def test_context_is_tls12_or_later_and_verifies_clients_as_configured(
    pki: PKI, client_auth: str | None, mode: ssl.VerifyMode
) -> None:
    context = ServerTLS(_files(pki, client_auth)).context
    assert context.minimum_version == ssl.TLSVersion.TLSv1_2
    assert context.verify_mode == mode


def test_settings_build_the_listener_tls_and_none_without_files(
    pki: PKI, tmp_path: Path, no_mirror_env: None
) -> None:
    plain = Settings(cache_dir=tmp_path)
    assert server_tls(plain) is None
    assert plain.scheme == "http"
    on = Settings(cache_dir=tmp_path, tls_cert_file=pki.server.cert, tls_key_file=pki.server.key)
    tls = server_tls(on)
    assert tls is not None and tls.certificate.serial_number == pki.server.serial
    assert on.scheme == "https"


@pytest.mark.parametrize(
    ("overrides", "problem"),
    [
        pytest.param(
            {"tls_cert_file": "/c.pem"},
            "invalid settings: tls_cert_file and tls_key_file go together (neither: plain HTTP)",
            id="cert-without-key",
        ),
        pytest.param(
            {"tls_client_ca": "/ca.pem"},
            "invalid settings: tls_client_ca needs tls_cert_file and tls_key_file",
            id="ca-without-pair",
        ),
        pytest.param(
            {"admin_listen": "127.0.0.1:5000", "listen": "127.0.0.1:5000"},
            "invalid settings: admin_listen must differ from listen",
            id="admin-same-as-listen",
        ),
        pytest.param(
            {"tls_client_auth": "sometimes"},
            "setting tls_client_auth (command line): Input should be 'require' or 'optional'",
            id="client-auth-value",
        ),
    ],
)
def test_inconsistent_tls_settings_are_one_line(
    overrides: dict[str, str], problem: str, no_mirror_env: None
) -> None:
    with pytest.raises(SettingsError) as caught:
        load_settings(None, **overrides)
    assert str(caught.value) == problem


def test_unusable_files_at_start_are_one_line_naming_the_setting(pki: PKI, tmp_path: Path) -> None:
    other = pki.ca.issue("other-server")
    garbage = tmp_path / "garbage.pem"
    garbage.write_text("not a certificate\n")
    missing = tmp_path / "missing.pem"
    cases = {
        TLSFiles(missing, pki.server.key): f"tls_cert_file {missing} cannot be read: "
        "No such file or directory",
        TLSFiles(garbage, pki.server.key): f"tls_cert_file {garbage} holds no PEM certificate",
        TLSFiles(pki.server.cert, other.key): f"tls_key_file {other.key} does not match the "
        f"certificate in tls_cert_file {pki.server.cert}",
        TLSFiles(pki.server.cert, pki.server.key, garbage): f"tls_client_ca {garbage} holds "
        "no usable PEM certificate",
    }
    for files, message in cases.items():
        with pytest.raises(TLSError) as caught:
            ServerTLS(files)
        assert str(caught.value) == message


# -- reloads ----------------------------------------------------------------------------


async def test_a_changed_pair_is_loaded_into_the_same_context_for_new_handshakes(
    pki: PKI, tmp_path: Path
) -> None:
    tls = ServerTLS(_files(pki))
    context = tls.context
    metrics = Metrics()
    async with listening(tls, tmp_path) as (port, _):
        assert await asyncio.to_thread(peer_serial, "127.0.0.1", port, pki.ca) == pki.server.serial
        assert tls.poll(metrics) is None  # nothing changed
        renewed = pki.ca.issue("server", to=pki.server.cert, days=2)
        assert tls.poll(metrics) is True
        assert tls.context is context
        assert await asyncio.to_thread(peer_serial, "127.0.0.1", port, pki.ca) == renewed.serial
    assert _sample(metrics, "mirror_tls_reloads_total", result="ok") == 1
    expiry = _sample(metrics, "mirror_tls_certificate_expiry_seconds", listener="registry")
    assert expiry == tls.certificate.not_valid_after_utc.timestamp()
    assert tls.certificate.serial_number == renewed.serial


def test_a_symlink_swap_is_seen_even_with_the_same_size_and_time(tmp_path: Path) -> None:
    """The kubelet's Secret volume: tls.crt -> ..data/tls.crt, ..data -> a directory
    replaced as a whole by renaming a new symlink over ..data."""
    ca = CA(tmp_path / "ca")
    volume = tmp_path / "volume"
    first, second = volume / "..2026_1", volume / "..2026_2"
    for d in (first, second):
        d.mkdir(parents=True)
    old = ca.issue("server", to=first / "tls.crt")
    new = ca.issue("server", to=second / "tls.crt")
    for d in (first, second):
        (d / "tls.crt").with_suffix(".key").rename(d / "tls.key")
        os.utime(d / "tls.crt", ns=(10**18, 10**18))
        os.utime(d / "tls.key", ns=(10**18, 10**18))
    (volume / "..data").symlink_to(first.name)
    for name in ("tls.crt", "tls.key"):
        (volume / name).symlink_to(f"..data/{name}")
    tls = ServerTLS(TLSFiles(volume / "tls.crt", volume / "tls.key"))
    assert tls.certificate.serial_number == old.serial
    (volume / "..data_tmp").symlink_to(second.name)
    (volume / "..data_tmp").rename(volume / "..data")
    assert tls.poll(Metrics()) is True
    assert tls.certificate.serial_number == new.serial


async def test_a_mismatched_pair_keeps_the_old_certificate_until_the_pair_is_whole(
    pki: PKI, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    tls = ServerTLS(_files(pki))
    metrics = Metrics()
    staged = pki.ca.issue("server", to=tmp_path / "staged.crt")
    async with listening(tls, tmp_path) as (port, _):
        # A rotation half done: the new certificate is in place, its key is not yet.
        shutil.copy(staged.cert, pki.server.cert)
        with caplog.at_level(logging.ERROR, logger="mirror.tls"):
            assert tls.poll(metrics) is False
            assert tls.poll(metrics) is False  # tried again, but said and counted once
        assert await asyncio.to_thread(peer_serial, "127.0.0.1", port, pki.ca) == pki.server.serial
        assert _sample(metrics, "mirror_tls_reloads_total", result="error") == 1
        [record] = [r for r in caplog.records if r.name == "mirror.tls"]
        assert record.exc_info is None
        assert record.getMessage() == (
            "TLS files changed but cannot be used, keeping the old ones: tls_key_file "
            f"{pki.server.key} does not match the certificate in tls_cert_file "
            f"{pki.server.cert}"
        )
        # The key arrives: the next poll completes the rotation.
        shutil.copy(staged.key, pki.server.key)
        assert tls.poll(metrics) is True
        assert await asyncio.to_thread(peer_serial, "127.0.0.1", port, pki.ca) == staged.serial
    assert _sample(metrics, "mirror_tls_reloads_total", result="ok") == 1


async def test_keep_fresh_polls_and_exports_the_expiry(pki: PKI) -> None:
    tls = ServerTLS(_files(pki))
    metrics = Metrics()
    task = asyncio.create_task(tls.keep_fresh(metrics, 0.05))
    try:
        expiry = tls.certificate.not_valid_after_utc.timestamp()
        await asyncio.sleep(0)
        assert _sample(metrics, "mirror_tls_certificate_expiry_seconds", listener="registry") == (
            expiry
        )
        renewed = pki.ca.issue("server", to=pki.server.cert, days=3)
        for _ in range(200):
            if _sample(metrics, "mirror_tls_reloads_total", result="ok") == 1:
                break
            await asyncio.sleep(0.01)
        assert tls.certificate.serial_number == renewed.serial
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


# -- client certificates ----------------------------------------------------------------


async def test_require_admits_only_clients_with_a_certificate_from_the_ca(
    pki: PKI, tmp_path: Path
) -> None:
    async with listening(ServerTLS(_files(pki, "require")), tmp_path) as (port, _):
        got = await _whoami_over(port, client_context(pki.ca, pki.alice))
        assert got["cn"] == "alice"
        assert got["name"] == "CN=alice,O=mirror tests"
        assert got["scheme"] == "https"
        assert got["version"] in (0x0303, 0x0304)
        assert isinstance(got["cipher"], int)
        for client in (None, pki.stranger):
            with pytest.raises(httpx.TransportError):
                await _whoami_over(port, client_context(pki.ca, client))


async def test_optional_admits_clients_without_a_certificate_but_not_with_a_bad_one(
    pki: PKI, tmp_path: Path
) -> None:
    async with listening(ServerTLS(_files(pki, "optional")), tmp_path) as (port, _):
        assert (await _whoami_over(port, client_context(pki.ca, pki.alice)))["cn"] == "alice"
        anonymous = await _whoami_over(port, client_context(pki.ca))
        assert (anonymous["cn"], anonymous["name"]) == (None, None)
        with pytest.raises(httpx.TransportError):
            await _whoami_over(port, client_context(pki.ca, pki.stranger))


async def test_without_a_client_ca_no_certificate_is_asked_for(pki: PKI, tmp_path: Path) -> None:
    async with listening(ServerTLS(_files(pki)), tmp_path) as (port, _):
        got = await _whoami_over(port, client_context(pki.ca, pki.alice))
    assert (got["cn"], got["name"], got["scheme"]) == (None, None, "https")


def test_client_common_name_without_tls_or_cn() -> None:
    assert client_common_name({"type": "http"}) is None
    no_cn = {"extensions": {"tls": {"client_cert_name": "O=mirror tests"}}}
    assert client_common_name(no_cn) is None
    escaped = {"extensions": {"tls": {"client_cert_name": r"CN=node\,1,O=x"}}}
    assert client_common_name(escaped) == "node,1"


# -- the guard over TLS -----------------------------------------------------------------


async def test_the_guard_applies_over_tls_and_plain_http_is_closed_at_once(
    pki: PKI, tmp_path: Path
) -> None:
    async with listening(ServerTLS(_files(pki)), tmp_path, max_header_bytes=16 * 1024) as (
        port,
        metrics,
    ):
        async with httpx.AsyncClient(verify=client_context(pki.ca)) as client:
            r = await client.get(
                f"https://127.0.0.1:{port}/whoami", headers={"x-big": "a" * 20_000}
            )
            assert r.status_code == 431
            # Decrypted bytes are HTTP: no misfire of the plain port's TLS check.
            assert (await client.get(f"https://127.0.0.1:{port}/whoami")).status_code == 200
        assert (
            _sample(metrics, "mirror_client_connections_refused_total", reason="tls_on_plain_port")
            == 0
        )
        # Plain HTTP on the TLS port: the connection closes, no hang, no answer.
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"GET /whoami HTTP/1.1\r\nhost: x\r\n\r\n")
        assert await asyncio.wait_for(reader.read(), timeout=5) == b""
        writer.close()
