"""The shipped examples stay valid."""

from __future__ import annotations

import json
import tomllib
from pathlib import Path

import pytest

from mirror.config import load_settings

DEPLOY = Path(__file__).resolve().parent.parent / "deploy"


def test_example_config_loads(monkeypatch: pytest.MonkeyPatch) -> None:
    import os

    for key in list(os.environ):
        if key.startswith("MIRROR_"):
            monkeypatch.delenv(key)
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


def test_podman_prefixes_match_the_example_config(monkeypatch: pytest.MonkeyPatch) -> None:
    """Each podman mirror path names an upstream's path_prefix in deploy/mirror.yaml."""
    import os

    for key in list(os.environ):
        if key.startswith("MIRROR_"):
            monkeypatch.delenv(key)
    settings = load_settings(DEPLOY / "mirror.yaml")
    prefixes = {u.path_prefix: u.name for u in settings.resolved_upstreams() if u.path_prefix}
    podman = tomllib.loads((DEPLOY / "podman" / "registries.conf").read_text())
    for registry in podman["registry"]:
        _, _, path = registry["mirror"][0]["location"].partition("/")
        if path:
            assert prefixes[path] == registry["prefix"]
