"""Test harness: a real Distribution registry behind a Docker-Hub-style token server."""

from __future__ import annotations

import importlib.util
import os
import shutil

import pytest

from .daemon import free_port
from .images import (
    DOCKER_LIST,
    DOCKER_MANIFEST,
    MANIFEST_ACCEPT,
    OCI_INDEX,
    OCI_MANIFEST,
    Layout,
    TestImage,
    build_and_push_test_images,
    fetch_token,
    push,
    registry_get,
    sha256_digest,
)
from .registry import LoggedRequest, Registry
from .tokenserver import TokenRequest, TokenServer

__all__ = [
    "DOCKER_LIST",
    "DOCKER_MANIFEST",
    "MANIFEST_ACCEPT",
    "OCI_INDEX",
    "OCI_MANIFEST",
    "Layout",
    "LoggedRequest",
    "Registry",
    "TestImage",
    "TokenRequest",
    "TokenServer",
    "build_and_push_test_images",
    "fetch_token",
    "free_port",
    "push",
    "registry_get",
    "require_module",
    "require_root",
    "require_tool",
    "sha256_digest",
]


def require_tool(name: str) -> str:
    """Path of an external tool; in CI its absence fails, elsewhere it skips."""
    path = shutil.which(name)
    if path is None:
        message = f"{name} is not on PATH; the e2e tests need it (apt-get install {name})"
        if os.environ.get("CI") == "true":
            pytest.fail(message)
        pytest.skip(message)
    return path


def require_module(name: str) -> None:
    """A Python package of the dev extras that a test module imports: call it before
    the import. In CI its absence fails, elsewhere the module is skipped."""
    if importlib.util.find_spec(name) is None:
        message = f"{name} is not installed (pip install -e '.[dev]')"
        if os.environ.get("CI") == "true":
            pytest.fail(message, pytrace=False)
        pytest.skip(message, allow_module_level=True)


def require_root(why: str) -> None:
    """Tests that mount file systems or run daemons need root; in CI that is a given."""
    if os.geteuid() != 0:
        message = f"needs root to {why}"
        if os.environ.get("CI") == "true":
            pytest.fail(message)
        pytest.skip(message)
