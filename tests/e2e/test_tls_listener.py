"""End to end: the real `mirror serve` over TLS. A certificate rotated (as the kubelet
swaps a Secret volume) during a pull; containerd presenting a client certificate from
hosts.toml; and the admin listener with /metrics, apart from the registry port."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import signal
import ssl
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from conftest import RealUpstream, until
from cryptography import x509
from fakes.pki import CA, client_context, peer_serial
from harness import require_root, require_tool
from harness.containerd import Containerd
from harness.daemon import NotReady, free_port
from harness.images import Layout, push
from harness.mirror import MirrorProcess, TLSMirror
from harness.throttle import ThrottledRelay

pytestmark = pytest.mark.e2e

MiB = 1 << 20
UNREACHABLE = "http://127.0.0.1:9"  # containerd's fallback `server`: nothing listens


class SecretVolume:
    """TLS files laid out as the kubelet mounts a Secret (and cert-manager renews it):
    tls.crt -> ..data/tls.crt, ..data -> a timestamped directory, replaced whole by
    renaming a new ..data symlink over the old one."""

    def __init__(self, root: Path, ca: CA) -> None:
        self.root = root
        self.ca = ca
        self.generation = 0
        root.mkdir(parents=True)
        self.serial = self.rotate()
        for name in ("tls.crt", "tls.key"):
            (root / name).symlink_to(f"..data/{name}")

    @property
    def cert(self) -> Path:
        return self.root / "tls.crt"

    @property
    def key(self) -> Path:
        return self.root / "tls.key"

    def rotate(self) -> int:
        self.generation += 1
        target = self.root / f"..2026_{self.generation}"
        target.mkdir()
        issued = self.ca.issue("mirror", to=target / "tls.crt")
        issued.key.rename(target / "tls.key")
        link = self.root / "..data_tmp"
        link.symlink_to(target.name)
        link.rename(self.root / "..data")
        self.serial = issued.serial
        return issued.serial


@dataclass
class BigLayer:
    repo: str
    digest: str
    size: int


@pytest.fixture(scope="module")
def big_layer(real_upstream: RealUpstream, tmp_path_factory: pytest.TempPathFactory) -> BigLayer:
    """An image with one 24 MiB layer of random bytes (gzip cannot shrink it)."""
    layout = Layout(tmp_path_factory.mktemp("tls-big") / "layout")
    image = layout.image([[("big.bin", os.urandom(24 * MiB))]])
    layout.tag(image, "big")
    push(layout.root, "big", real_upstream.registry, "tls/big", "1")
    layers = json.loads(layout.read(image["digest"]))["layers"]
    largest = max(layers, key=lambda d: d["size"])
    return BigLayer("tls/big", largest["digest"], largest["size"])


def _serial_of(stream: httpx.Response) -> int:
    ssl_object: ssl.SSLSocket = stream.extensions["network_stream"].get_extra_info("ssl_object")
    der = ssl_object.getpeercert(True)  # httpx's is the C object: no keyword arguments
    assert der is not None
    return x509.load_der_x509_certificate(der).serial_number


async def test_a_certificate_rotated_during_a_pull(
    real_upstream: RealUpstream, big_layer: BigLayer, tmp_path: Path
) -> None:
    """The pull in flight completes on its old certificate; new connections get the
    new one, once the mirror's reload metric says it has it."""
    ca = CA(tmp_path / "ca")
    volume = SecretVolume(tmp_path / "secret", ca)
    old_serial = volume.serial
    host, port = real_upstream.registry.host.split(":")
    env = {
        "MIRROR_TLS_CERT_FILE": str(volume.cert),
        "MIRROR_TLS_KEY_FILE": str(volume.key),
        "MIRROR_TLS_RELOAD_INTERVAL": "0.1",
    }
    # ~8 MB/s from the registry: the 24 MiB layer takes about 3 s.
    with (
        ThrottledRelay(host, int(port), 8e6) as relay,
        TLSMirror(tmp_path / "mirror", relay.url, ca, env) as mirror,
    ):
        loop = asyncio.get_running_loop()
        first_bytes = asyncio.Event()
        received = 0

        def pull() -> tuple[int, str, int]:
            nonlocal received
            h = hashlib.sha256()
            url = f"{mirror.url}/v2/{big_layer.repo}/blobs/{big_layer.digest}"
            with httpx.stream("GET", url, verify=client_context(ca), timeout=60) as r:
                serial = _serial_of(r)
                for chunk in r.iter_raw():
                    h.update(chunk)
                    received += len(chunk)
                    loop.call_soon_threadsafe(first_bytes.set)
                return r.status_code, "sha256:" + h.hexdigest(), serial

        transfer = asyncio.create_task(asyncio.to_thread(pull))
        await asyncio.wait_for(first_bytes.wait(), 30)
        new_serial = volume.rotate()
        await until(
            lambda: mirror.metric("mirror_tls_reloads_total", result="ok") == 1,
            "the mirror to reload its certificate",
        )
        assert not transfer.done() and received < big_layer.size  # still mid-transfer
        seen = await asyncio.to_thread(peer_serial, "127.0.0.1", mirror.port, ca)
        status, digest, in_flight_serial = await transfer
        assert mirror.metric("mirror_tls_reloads_total", result="error") == 0
    assert (status, digest) == (200, big_layer.digest)
    assert in_flight_serial == old_serial
    assert seen == new_serial != old_serial


def _hosts_toml(
    hosts_dir: Path, mirror_url: str, ca: Path, client: tuple[Path, Path] | None
) -> None:
    lines = [
        f"server = {json.dumps(UNREACHABLE)}",
        "",
        f"[host.{json.dumps(mirror_url)}]",
        '  capabilities = ["pull", "resolve"]',
        f"  ca = {json.dumps(str(ca))}",
    ]
    if client is not None:
        lines.append(f"  client = [[{json.dumps(str(client[0]))}, {json.dumps(str(client[1]))}]]")
    directory = hosts_dir / "docker.io"
    directory.mkdir(parents=True)
    (directory / "hosts.toml").write_text("\n".join(lines) + "\n")


def test_containerd_pulls_over_tls_with_its_client_certificate_and_not_without(
    real_upstream: RealUpstream, tmp_path: Path
) -> None:
    require_root("run containerd")
    require_tool("containerd")
    require_tool("ctr")
    image = real_upstream.images["schema2"]
    ref = f"docker.io/{image.repo}:{image.tag}"
    ca = CA(tmp_path / "ca")
    server = ca.issue("mirror")
    node = ca.issue("node-1", server=False)
    # A certificate from the same CA whose CN no access rule names.
    other = ca.issue("node-2", server=False)
    env = {
        "MIRROR_UPSTREAMS": json.dumps([{"name": "docker.io", "url": real_upstream.registry.url}]),
        "MIRROR_TLS_CERT_FILE": str(server.cert),
        "MIRROR_TLS_KEY_FILE": str(server.key),
        "MIRROR_TLS_CLIENT_CA": str(ca.cert),
        "MIRROR_TLS_CLIENT_AUTH": "require",
        # The certificate's CN is the user the access rules see.
        "MIRROR_ACCESS": json.dumps([{"users": ["node-1"], "upstreams": ["docker.io"]}]),
    }

    class MTLSMirror(TLSMirror):
        def check_ready(self) -> None:
            with urllib.request.urlopen(f"{self.admin_url}/readyz", timeout=1) as resp:
                if resp.status != 200:
                    raise NotReady(f"readyz: {resp.status}")

    with MTLSMirror(tmp_path / "mirror", None, ca, env) as mirror:
        with_cert, without = tmp_path / "hosts-cert", tmp_path / "hosts-nocert"
        not_allowed = tmp_path / "hosts-node-2"
        _hosts_toml(with_cert, mirror.url, ca.cert, (node.cert, node.key))
        _hosts_toml(without, mirror.url, ca.cert, None)
        _hosts_toml(not_allowed, mirror.url, ca.cert, (other.cert, other.key))
        with Containerd(tmp_path / "ctd") as containerd:
            refused = containerd.pull(ref, without)
            # The handshake fails at the mirror (asyncio drops the TLS alert with the
            # connection: Go sees EOF), and the fallback server is unreachable.
            assert refused.returncode != 0
            assert f'"{mirror.url}/v2/{image.repo}/manifests/' in refused.stderr
            assert containerd.images() == {}
            denied = containerd.pull(ref, not_allowed)
            assert denied.returncode != 0
            assert containerd.images() == {}
            assert mirror.metric("mirror_client_auth_total", method="user", result="denied") >= 1
            pulled = containerd.pull(ref, with_cert)
            assert pulled.returncode == 0, f"{pulled.stderr}\n{mirror.log()}"
            assert containerd.image_digest(ref) == image.digest
            assert containerd.check(ref).status == "complete"
        misses = mirror.metric("mirror_cache_requests_total", kind="blob", result="miss")
        assert misses == len(image.layer_digests)


async def test_admin_listener_serves_metrics_the_registry_port_does_not_and_sigterm_exits_0(
    tmp_path: Path,
) -> None:
    admin_port = free_port()
    env = {"MIRROR_ADMIN_LISTEN": f"127.0.0.1:{admin_port}"}
    mirror = MirrorProcess(tmp_path / "m", UNREACHABLE, env=env)
    await asyncio.to_thread(mirror.start)
    try:
        admin = f"http://127.0.0.1:{admin_port}"
        async with httpx.AsyncClient(timeout=10) as c:
            r = await c.get(f"{admin}/metrics")
            assert r.status_code == 200
            assert "mirror_client_connections_refused_total" in r.text
            r = await c.get(f"{mirror.url}/metrics")
            assert r.status_code == 404
            assert r.json()["errors"][0]["code"] == "NAME_UNKNOWN"
            for path in ("/healthz", "/readyz"):
                assert (await c.get(f"{admin}{path}")).status_code == 200
                assert (await c.get(f"{mirror.url}{path}")).status_code == 200
            assert (await c.get(f"{admin}/v2/")).status_code == 404  # no registry API here
        assert f"admin (metrics, health) on {admin}" in mirror.log()
        code = await asyncio.to_thread(mirror.terminate, signal.SIGTERM)
    finally:
        await asyncio.to_thread(mirror.stop)
    assert code == 0, mirror.log()
    for url in (admin, mirror.url):
        with pytest.raises(httpx.ConnectError):
            httpx.get(f"{url}/healthz", timeout=2)
