"""The container image's entrypoint, without a container engine: the exact command line
the Dockerfile runs (ENTRYPOINT + CMD), with the Dockerfile's ENV and the environment
and settings file the Kubernetes manifests give it; then a real pull through it."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest import RealUpstream
from harness import free_port, require_tool, sha256_digest
from harness.mirror import MirrorProcess, skopeo_copy

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


def _central_pod() -> tuple[dict[str, str], str]:
    """The mirror container's env and its mounted mirror.yaml, as kustomize renders them."""
    kubectl = require_tool("kubectl")
    rendered = subprocess.run(
        [kubectl, "kustomize", str(ROOT / "deploy" / "kubernetes" / "overlays" / "central")],
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    ).stdout
    docs = [d for d in yaml.safe_load_all(rendered) if d]
    [deployment] = [d for d in docs if d["kind"] == "Deployment"]
    [container] = deployment["spec"]["template"]["spec"]["containers"]
    env = {e["name"]: e["value"] for e in container["env"]}
    [config] = [d for d in docs if d["kind"] == "ConfigMap" and "mirror.yaml" in d["data"]]
    return env, config["data"]["mirror.yaml"]


def test_image_command_line_with_the_manifests_env_serves_pulls(
    real_upstream: RealUpstream, tmp_path: Path
) -> None:
    argv, image_env, healthcheck = _dockerfile()
    assert argv == ["mirror", "serve"]
    pod_env, settings_text = _central_pod()
    # The settings file the ConfigMap mounts, with docker.io reached at the test's
    # registry (the only change: nothing may leave the machine).
    settings = yaml.safe_load(settings_text)
    for upstream in settings["upstreams"]:
        if upstream["name"] == "docker.io":
            upstream["url"] = real_upstream.registry.url
    config = tmp_path / "etc" / "mirror.yaml"
    config.parent.mkdir()
    config.write_text(yaml.safe_dump(settings))
    port = free_port()
    env = {
        **image_env,
        **pod_env,
        "MIRROR_CONFIG": str(config),  # the pod mounts it at /etc/mirror/mirror.yaml
        # The image listens on 0.0.0.0:5000 and caches in /var/cache/mirror; tests use
        # loopback only, on a free port, and a private directory.
        "MIRROR_LISTEN": f"127.0.0.1:{port}",
        "MIRROR_CACHE_DIR": str(tmp_path / "cache"),
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
        # JSON logs, as the image sets: one object per line.
        lines = [json.loads(line) for line in mirror.log().splitlines() if line.startswith("{")]
        assert any(line.get("logger") == "mirror.access" for line in lines)
        assert mirror.terminate(signal.SIGTERM) == 0
