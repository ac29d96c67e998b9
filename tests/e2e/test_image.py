"""The container image's entrypoint, without a container engine: the exact command line
the Dockerfile runs (ENTRYPOINT + CMD), with the Dockerfile's ENV and the environment,
settings file and Secret files the central Kubernetes Deployment gives it (the shared
store, here on a real Ceph RGW and a real Redis with a password); then a real pull
through it."""

from __future__ import annotations

import json
import secrets
import signal
import subprocess
import sys
import time
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml
from conftest import RealUpstream
from harness import free_port, require_root, require_tool, sha256_digest
from harness.kube import container_env, local_paths, materialize_volumes, render
from harness.mirror import MirrorProcess, skopeo_copy
from harness.redisserver import RedisServer
from harness.rgw import RadosGateway

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).resolve().parents[2]


def _dockerfile() -> tuple[list[str], dict[str, str], list[str]]:
    """ENTRYPOINT + CMD, ENV, and the HEALTHCHECK command of the final stage."""
    text = (ROOT / "deploy" / "Dockerfile").read_text().replace("\\\n", " ")
    final = text[text.rindex("\nFROM ") :]
    argv: dict[str, list[str]] = {}
    env: dict[str, str] = {}
    health: list[str] = []
    for line in final.splitlines():
        keyword, _, rest = line.partition(" ")
        if keyword in ("ENTRYPOINT", "CMD"):
            argv[keyword] = json.loads(rest)
        elif keyword == "ENV":
            for pair in rest.split():
                key, _, value = pair.partition("=")
                env[key] = value
        elif keyword == "HEALTHCHECK":
            health = json.loads(rest[rest.index("CMD") + 3 :])
    return argv["ENTRYPOINT"] + argv["CMD"], env, health


@dataclass
class Backends:
    rgw: RadosGateway
    redis: RedisServer


@pytest.fixture(scope="module")
def backends(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Backends]:
    require_root("run the Ceph daemons")
    require_tool("radosgw")
    require_tool("redis-server")
    password = secrets.token_hex(16)
    with (
        RadosGateway() as rgw,
        RedisServer(tmp_path_factory.mktemp("redis"), password=password) as redis,
    ):
        yield Backends(rgw, redis)


def _central_pod(root: Path, secret_values: dict[str, str]) -> dict[str, str]:
    """The mirror container's environment as the kubelet gives it (pod IP 127.0.0.1),
    with its ConfigMap and Secret volumes written under `root` and the variables that
    name files in them pointing there."""
    docs = render("central")
    [deployment] = [d for d in docs if d["kind"] == "Deployment"]
    pod = deployment["spec"]["template"]["spec"]
    [container] = pod["containers"]
    mounted = materialize_volumes(pod, container, docs, root, secrets=secret_values)
    env = container_env(container, docs, pod_ip="127.0.0.1", secrets=secret_values)
    return local_paths(env, mounted)


def test_image_command_line_with_the_manifests_env_serves_pulls(
    real_upstream: RealUpstream, backends: Backends, tmp_path: Path
) -> None:
    argv, image_env, healthcheck = _dockerfile()
    assert argv == ["mirror", "serve"]
    rgw, redis = backends.rgw, backends.redis
    assert redis.password is not None
    # The Secret's keys with this test's values: the Deployment reads each the way it
    # would in the cluster (the key id as a variable, the rest as mounted files).
    pod_env = _central_pod(
        tmp_path / "pod",
        {
            "s3-access-key-id": rgw.credentials.access_key,
            "s3-secret-access-key": rgw.credentials.secret_key,
            "redis-password": redis.password,
            "peer-secret": secrets.token_hex(16),
        },
    )
    assert pod_env["MIRROR_STORE"] == "s3"
    assert "MIRROR_REDIS_PASSWORD_FILE" in pod_env
    # The settings file the ConfigMap mounts, with docker.io reached at the test's
    # registry (nothing may leave the machine).
    config = Path(pod_env["MIRROR_CONFIG"])
    settings = yaml.safe_load(config.read_text())
    for upstream in settings["upstreams"]:
        if upstream["name"] == "docker.io":
            upstream["url"] = real_upstream.registry.url
    config.write_text(yaml.safe_dump(settings))
    bucket = f"t{uuid.uuid4().hex[:12]}"
    rgw.create_bucket(bucket)
    port = free_port()
    env = {
        **image_env,
        **pod_env,
        # The image listens on 0.0.0.0:5000 and caches in /var/cache/mirror; tests use
        # loopback only, on a free port, and a private directory.
        "MIRROR_LISTEN": f"127.0.0.1:{port}",
        "MIRROR_PEER_URL": f"http://127.0.0.1:{port}",
        "MIRROR_CACHE_DIR": str(tmp_path / "cache"),
        # The placeholders for your bucket and Redis, here the test's own.
        "MIRROR_S3_BUCKET": bucket,
        "MIRROR_S3_ENDPOINT": rgw.endpoint,
        "MIRROR_S3_PATH_STYLE": "true",
        "MIRROR_REDIS_URL": redis.url,
    }
    # `mirror` is the console script the image's pip install puts on PATH.
    executable = str(Path(sys.executable).parent / argv[0])
    mirror = MirrorProcess(tmp_path / "m", None, env=env, port=port, argv=[executable, *argv[1:]])
    with mirror:
        image = real_upstream.images["schema2"]
        result = skopeo_copy(f"docker://{mirror.host}/{image.reference}", f"dir:{tmp_path / 'out'}")
        assert result.returncode == 0, result.stderr + mirror.log()
        assert sha256_digest((tmp_path / "out" / "manifest.json").read_bytes()) == image.digest
        # The HEALTHCHECK command itself, aimed at this port.
        probe = [part.replace("127.0.0.1:5000", mirror.host) for part in healthcheck]
        assert probe[:2] == ["mirror", "probe"]
        checked = subprocess.run([str(Path(sys.executable).parent / "mirror"), *probe[1:]])
        assert checked.returncode == 0
        # And it fails when nothing answers there.
        gone = [part.replace("127.0.0.1:5000", "127.0.0.1:9") for part in healthcheck]
        failed = subprocess.run([str(Path(sys.executable).parent / "mirror"), *gone[1:]])
        assert failed.returncode == 1
        # The shared store was used: the layers went to the bucket (each upload ends
        # with its commit, just after the last byte), and /readyz sees both
        # dependencies (Redis with the password from the mounted file).
        deadline = time.monotonic() + 30
        while mirror.metric("mirror_s3_requests_total", operation="upload", result="ok") < len(
            image.layer_digests
        ):
            assert time.monotonic() < deadline, mirror.log_tail()
            time.sleep(0.1)
        assert mirror.metric("mirror_redis_errors_total") == 0
        with urllib.request.urlopen(mirror.url + "/readyz") as resp:
            cache = json.load(resp)["checks"]["cache"]
        assert "redis: ok" in cache and "s3: ok" in cache, cache
        # JSON logs, as the image sets: one object per line.
        lines = [json.loads(line) for line in mirror.log().splitlines() if line.startswith("{")]
        assert any(line.get("logger") == "mirror.access" for line in lines)
        assert mirror.terminate(signal.SIGTERM) == 0
