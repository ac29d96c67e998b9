"""/healthz, /readyz and /metrics: on the registry listener, or on the admin listener
(`admin_listen`) only, from the same handlers and the same state."""

from __future__ import annotations

import socket
from pathlib import Path

import httpx
import pytest
from click.testing import CliRunner
from conftest import MirrorFactory
from fakes.pki import CA
from fakes.upstream import FakeUpstream

from mirror.app import create_admin_app, create_app
from mirror.cli import main
from mirror.cluster import PEER_PATH
from mirror.config import Settings


async def _get(app: object, path: str) -> httpx.Response:
    transport = httpx.ASGITransport(app=app)  # type: ignore[arg-type]
    async with httpx.AsyncClient(transport=transport, base_url="http://m") as client:
        return await client.get(path)


@pytest.mark.parametrize(
    ("admin_listen", "registry_metrics"),
    [
        pytest.param(None, 200, id="no-admin-listener"),
        pytest.param("127.0.0.1:5001", 404, id="admin-listener"),
    ],
)
async def test_metrics_leave_the_registry_port_for_the_admin_listener(
    tmp_path: Path, no_mirror_env: None, admin_listen: str | None, registry_metrics: int
) -> None:
    settings = Settings(cache_dir=tmp_path, admin_listen=admin_listen)
    app = create_app(settings)
    r = await _get(app, "/metrics")
    assert r.status_code == registry_metrics
    if registry_metrics == 404:
        assert r.json()["errors"][0]["code"] == "NAME_UNKNOWN"  # as any unknown path
    assert (await _get(app, "/healthz")).status_code == 200
    admin = create_admin_app(app)
    app.state.metrics.refused_connections.labels("limit").inc()
    r = await _get(admin, "/metrics")
    assert r.status_code == 200
    # The registry app's metrics, not a registry of its own.
    assert 'mirror_client_connections_refused_total{reason="limit"} 1.0' in r.text
    assert (await _get(admin, "/healthz")).status_code == 200
    assert (await _get(admin, "/readyz")).status_code == 503  # no lifespan ran: not ready
    assert (await _get(admin, "/v2/")).status_code == 404


def test_a_taken_admin_port_is_one_line(tmp_path: Path, no_mirror_env: None) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        admin = f"127.0.0.1:{taken.getsockname()[1]}"
        args = ["serve", "--listen", "127.0.0.1:0", "--admin-listen", admin]
        result = CliRunner().invoke(main, [*args, "--cache-dir", str(tmp_path / "c")])
    assert (result.exit_code, result.output) == (
        2,
        f"Error: cannot listen on {admin}: address already in use; is another mirror "
        "running? Choose another address with --admin-listen HOST:PORT\n",
    )


def test_unusable_tls_files_stop_serve_with_one_line(tmp_path: Path, no_mirror_env: None) -> None:
    ca = CA(tmp_path / "ca")
    server, other = ca.issue("server"), ca.issue("other")
    args = ["serve", "--listen", "127.0.0.1:0", "--cache-dir", str(tmp_path / "c")]
    args += ["--tls-cert-file", str(server.cert), "--tls-key-file", str(other.key)]
    result = CliRunner().invoke(main, args)
    assert (result.exit_code, result.output) == (
        2,
        f"Error: tls_key_file {other.key} does not match the certificate in tls_cert_file "
        f"{server.cert}\n",
    )


async def test_the_peer_endpoint_is_on_the_admin_listener_too(
    fake: tuple[FakeUpstream, str], mirror: MirrorFactory
) -> None:
    """Replicas behind a TLS registry port reach each other on the plain admin port: the
    same handler, still behind the peer secret."""
    _, url = fake
    path = PEER_PATH + "sha256:" + "0" * 64
    async with mirror(url, admin_listen="127.0.0.1:5001") as m:
        r = await _get(create_admin_app(m.app), path)
        assert r.status_code == 403
        assert r.json()["errors"][0]["code"] == "DENIED"
        assert "peer secret" in r.json()["errors"][0]["message"]
