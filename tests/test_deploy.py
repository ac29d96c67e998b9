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
    assert settings.upstream == "https://registry-1.docker.io"
    assert settings.tag_ttl == 300


def test_client_snippets_parse() -> None:
    assert json.loads((DEPLOY / "docker" / "daemon.json").read_text())["registry-mirrors"]
    hosts = tomllib.loads((DEPLOY / "containerd" / "hosts.toml").read_text())
    assert hosts["server"] == "https://registry-1.docker.io"
    podman = tomllib.loads((DEPLOY / "podman" / "registries.conf").read_text())
    assert podman["registry"][0]["mirror"][0]["location"].endswith(":5000")
