from __future__ import annotations

from typing import NoReturn

import pytest

from mirror.auth import UpstreamAuth, parse_www_authenticate
from mirror.metrics import Metrics


@pytest.mark.parametrize(
    ("header", "scheme", "params"),
    [
        pytest.param(
            'Bearer realm="https://auth.docker.io/token",service="registry.docker.io",'
            'scope="repository:library/alpine:pull"',
            "bearer",
            {
                "realm": "https://auth.docker.io/token",
                "service": "registry.docker.io",
                "scope": "repository:library/alpine:pull",
            },
            id="docker-hub",
        ),
        pytest.param(
            'Bearer realm="https://r/token",scope="repository:a:pull,push repository:b:pull"',
            "bearer",
            {"realm": "https://r/token", "scope": "repository:a:pull,push repository:b:pull"},
            id="comma-inside-quotes",
        ),
        pytest.param(
            'Bearer realm="https://r/t", service="s", error="insufficient_scope"',
            "bearer",
            {"realm": "https://r/t", "service": "s", "error": "insufficient_scope"},
            id="spaces-and-error",
        ),
        pytest.param(
            'Bearer realm="a\\"b",service=plain',
            "bearer",
            {"realm": 'a"b', "service": "plain"},
            id="escaped-quote-and-token-value",
        ),
        pytest.param(
            'Basic realm="Registry Realm"', "basic", {"realm": "Registry Realm"}, id="basic"
        ),
        pytest.param("BEARER Realm=x", "bearer", {"realm": "x"}, id="case-insensitive"),
    ],
)
def test_parse_www_authenticate(header: str, scheme: str, params: dict[str, str]) -> None:
    challenge = parse_www_authenticate(header)
    assert challenge is not None
    assert challenge.scheme == scheme
    assert challenge.params == params


def test_empty_challenge() -> None:
    assert parse_www_authenticate("  ") is None


def _auth(url: str, other_upstreams: tuple[str, ...] = ()) -> UpstreamAuth:
    async def no_fetch(realm: str, params: dict[str, str], headers: dict[str, str]) -> NoReturn:
        raise AssertionError("a realm check fetches nothing")

    return UpstreamAuth("up", url, Metrics(), no_fetch, other_upstreams=other_upstreams)


@pytest.mark.parametrize(
    ("upstream", "realm", "allowed"),
    [
        ("https://registry-1.docker.io", "https://auth.docker.io/token", True),
        ("https://ghcr.io", "https://ghcr.io/token", True),
        ("https://registry.example.com:5000", "https://registry.example.com:5000/t", True),
        ("https://registry.example.com", "https://auth.example.com/token", True),
        ("https://registry.example.com", "https://auth.example.com:8443/token", False),
        ("https://myreg.azurecr.io", "https://attacker.azurecr.io/oauth2/token", False),
        (
            "https://111111111111.dkr.ecr.us-east-1.amazonaws.com",
            "https://999999999999.dkr.ecr.us-east-1.amazonaws.com/t",
            False,
        ),
        ("https://corp.jfrog.io", "https://evil.jfrog.io/token", False),
        ("https://ghcr.io", "http://ghcr.io/token", False),  # no downgrade to http
        ("http://[::1]:5000", "http://[::1]:6000/token", True),  # its host, another port
        ("https://a.co.uk", "https://b.co.uk/token", False),  # only a public suffix shared
    ],
)
def test_token_realm_rules(upstream: str, realm: str, allowed: bool) -> None:
    assert _auth(upstream).realm_allowed(realm) is allowed


def test_another_upstreams_origin_is_never_a_realm() -> None:
    other = "http://127.0.0.1:6000"
    auth = _auth("http://127.0.0.1:5000", other_upstreams=(other,))
    assert not auth.realm_allowed(f"{other}/token")
    assert auth.realm_allowed("http://127.0.0.1:7000/token")  # its own host
