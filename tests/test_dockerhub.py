from __future__ import annotations

import pytest

from mirror import dockerhub


@pytest.mark.parametrize(
    ("name", "hub", "expected"),
    [
        ("alpine", True, "library/alpine"),
        ("library/alpine", True, "library/alpine"),
        ("bitnami/redis", True, "bitnami/redis"),
        ("alpine", False, "alpine"),
    ],
)
def test_official_images_live_under_library(name: str, hub: bool, expected: str) -> None:
    assert dockerhub.repository(name, hub=hub) == expected


@pytest.mark.parametrize(
    ("name", "url", "hub"),
    [
        ("docker.io", "http://127.0.0.1:5000", True),  # a local stand-in named docker.io
        ("registry-1.docker.io", "https://registry-1.docker.io", True),
        ("mirror.example", "https://index.docker.io", True),
        ("ghcr.io", "https://ghcr.io", False),
    ],
)
def test_hub_rules_follow_the_name_or_the_api_host(name: str, url: str, hub: bool) -> None:
    assert dockerhub.is_hub(name, url) is hub


def test_every_name_of_hub_is_docker_io() -> None:
    assert {dockerhub.canonical(n) for n in ("Docker.io", "index.docker.io ")} == {"docker.io"}
    assert dockerhub.name_of("https://registry-1.docker.io") == "docker.io"
    assert dockerhub.name_of("http://127.0.0.1:5000") == "127.0.0.1:5000"


def test_patterns_match_names_as_clients_write_them() -> None:
    assert dockerhub.patterns("docker.io", ["alpine", "bitnami/*"]) == (
        "library/alpine",
        "bitnami/*",
    )
    assert dockerhub.patterns("ghcr.io", ["alpine"]) == ("alpine",)
