"""The shipped examples stay valid."""

from __future__ import annotations

import json
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import yaml

from mirror.loading import load_settings

DEPLOY = Path(__file__).resolve().parent.parent / "deploy"


@pytest.mark.usefixtures("no_mirror_env")
def test_example_config_loads() -> None:
    settings = load_settings(DEPLOY / "mirror.yaml")
    upstreams = {u.name: u for u in settings.resolved_upstreams()}
    assert list(upstreams) == [
        "docker.io",
        "ghcr.io",
        "quay.io",
        "registry.k8s.io",
        "registry.example.com:5000",
    ]
    assert upstreams["docker.io"].base_url == "https://registry-1.docker.io"
    assert settings.default_upstream_name() == "docker.io"
    assert settings.tag_ttl == 300


def test_client_snippets_parse() -> None:
    assert json.loads((DEPLOY / "docker" / "daemon.json").read_text())["registry-mirrors"]
    certs = DEPLOY / "containerd" / "certs.d"
    hub = tomllib.loads((certs / "docker.io" / "hosts.toml").read_text())
    assert hub["server"] == "https://registry-1.docker.io"
    ghcr = tomllib.loads((certs / "ghcr.io" / "hosts.toml").read_text())
    assert ghcr["server"] == "https://ghcr.io"
    default = tomllib.loads((certs / "_default" / "hosts.toml").read_text())
    assert "server" not in default
    for hosts in (hub, ghcr, default):
        [(mirror, host)] = hosts["host"].items()
        assert mirror == "http://mirror.example.internal:5000"
        assert host["capabilities"] == ["pull", "resolve"]
    podman = tomllib.loads((DEPLOY / "podman" / "registries.conf").read_text())
    locations = {r["prefix"]: r["mirror"][0]["location"] for r in podman["registry"]}
    assert locations == {
        "docker.io": "mirror.example.internal:5000",
        "ghcr.io": "mirror.example.internal:5000/ghcr",
        "quay.io": "mirror.example.internal:5000/quay",
    }


@pytest.mark.usefixtures("no_mirror_env")
def test_podman_prefixes_match_the_example_config() -> None:
    """Each podman mirror path names an upstream's path_prefix in deploy/mirror.yaml."""
    settings = load_settings(DEPLOY / "mirror.yaml")
    prefixes = {u.path_prefix: u.name for u in settings.resolved_upstreams() if u.path_prefix}
    podman = tomllib.loads((DEPLOY / "podman" / "registries.conf").read_text())
    for registry in podman["registry"]:
        _, _, path = registry["mirror"][0]["location"].partition("/")
        if path:
            assert prefixes[path] == registry["prefix"]


def _check_compose(path: Path) -> subprocess.CompletedProcess[str]:
    tool = Path(sys.executable).parent / "check-jsonschema"
    return subprocess.run(
        [str(tool), "--builtin-schema", "vendor.compose-spec", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_compose_file_follows_the_compose_specification(tmp_path: Path) -> None:
    result = _check_compose(DEPLOY / "compose.yaml")
    assert result.returncode == 0, result.stdout + result.stderr
    # The same check refuses a broken file.
    compose = yaml.safe_load((DEPLOY / "compose.yaml").read_text())
    compose["services"]["mirror"]["restart"] = ["always"]
    compose["services"]["mirror"]["helthcheck"] = {}
    broken = tmp_path / "compose.yaml"
    broken.write_text(yaml.safe_dump(compose))
    assert _check_compose(broken).returncode != 0


def test_compose_wires_mirror_prometheus_and_grafana() -> None:
    compose = yaml.safe_load((DEPLOY / "compose.yaml").read_text())
    services = compose["services"]
    assert set(services) == {"mirror", "prometheus", "grafana"}
    assert services["mirror"]["build"] == {"context": "..", "dockerfile": "deploy/Dockerfile"}
    # Every bind-mounted file or directory exists in the repository.
    for service in services.values():
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            if source.startswith("."):
                assert (DEPLOY / source).exists(), source
    config = load_settings(DEPLOY / "compose" / "mirror.yaml")
    assert config.default_upstream_name() == "docker.io"
    prometheus = yaml.safe_load((DEPLOY / "prometheus" / "prometheus.yml").read_text())
    assert prometheus["scrape_configs"][0]["static_configs"][0]["targets"] == ["mirror:5000"]


def test_dockerfile_runs_non_root_with_health_and_graceful_stop() -> None:
    text = (DEPLOY / "Dockerfile").read_text()
    final_stage = text[text.rindex("\nFROM ") :]
    instructions = [line.split(None, 1) for line in final_stage.splitlines() if line[:1].isupper()]
    keywords = [i[0] for i in instructions]
    assert ["USER", "10001:10001"] in instructions
    assert ["STOPSIGNAL", "SIGTERM"] in instructions
    assert ["VOLUME", '["/var/cache/mirror"]'] in instructions
    assert keywords.index("USER") < keywords.index("ENTRYPOINT")
    healthcheck = final_stage.split("HEALTHCHECK", 1)[1].split("\n#", 1)[0]
    assert '["mirror", "probe", "--url", "http://127.0.0.1:5000"]' in healthcheck  # /healthz
    assert "pip install --no-cache-dir --no-index" in final_stage  # no network here
    # The build context holds exactly what the build stage copies.
    ignore = (DEPLOY.parent / ".dockerignore").read_text().split()
    copied = [line.split()[1:-1] for line in text.splitlines() if line.startswith("COPY ")]
    assert sorted(f for files in copied for f in files) == ["README.md", "mirror", "pyproject.toml"]
    for item in ("pyproject.toml", "README.md", "mirror/"):
        assert f"!{item}" in ignore


def test_image_build_context_builds_a_complete_wheel(tmp_path: Path) -> None:
    """The Dockerfile's build stage, without a container engine: from exactly the files
    .dockerignore lets in, `pip wheel` builds a wheel holding every module and the
    `mirror` command (dependencies come from PyPI in the real build; not here)."""
    import shutil
    import zipfile

    root = DEPLOY.parent
    context = tmp_path / "context"
    context.mkdir()
    for item in ("pyproject.toml", "README.md"):
        shutil.copy(root / item, context / item)
    shutil.copytree(
        root / "mirror", context / "mirror", ignore=shutil.ignore_patterns("__pycache__")
    )
    result = subprocess.run(
        [
            *(sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q"),
            *("--wheel-dir", str(tmp_path / "wheels"), str(context)),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    [wheel] = (tmp_path / "wheels").glob("mirror-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    modules = {f"mirror/{p.name}" for p in (root / "mirror").glob("*.py")}
    assert modules <= set(names)
    [entry_points] = [n for n in names if n.endswith("entry_points.txt")]
    text = zipfile.ZipFile(wheel).read(entry_points).decode()
    assert "mirror = mirror.cli:main" in text
