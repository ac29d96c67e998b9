from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pydantic
import pytest

from mirror.config import Settings, host_port
from mirror.loading import SettingsError, load_settings

pytestmark = pytest.mark.usefixtures("no_mirror_env")


def test_defaults() -> None:
    s = Settings()
    [hub] = s.resolved_upstreams()
    assert (hub.name, hub.base_url) == ("docker.io", "https://registry-1.docker.io")
    assert s.default_upstream_name() == "docker.io"
    assert s.listen == "0.0.0.0:5000"
    assert s.tag_ttl == 300
    assert s.manifest_max_bytes == 4 * 1024 * 1024


def test_precedence_file_then_env_then_command_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = tmp_path / "mirror.yaml"
    config.write_text(
        "upstream: https://file.example\ntag_ttl: 10m\nlisten: 127.0.0.1:1\n"
        "upstream_username: bob\nupstream_password: from-file\n"
    )
    monkeypatch.setenv("MIRROR_LISTEN", "127.0.0.1:2")
    monkeypatch.setenv("MIRROR_UPSTREAM_PASSWORD", "from-env")
    s = load_settings(config, upstream="https://cli.example")
    assert s.upstream == "https://cli.example"  # command line beats all
    assert s.listen == "127.0.0.1:2"  # environment beats the file
    assert s.tag_ttl == 600  # the file beats defaults
    assert s.upstream_username == "bob"
    assert s.upstream_password is not None
    assert s.upstream_password.get_secret_value() == "from-env"
    assert "from-env" not in repr(s) and "from-env" not in str(s.model_dump())


def test_unknown_key_in_file_is_an_error(tmp_path: Path) -> None:
    config = tmp_path / "mirror.yaml"
    config.write_text("upstreem: https://typo.example\n")
    with pytest.raises(SettingsError) as err:
        load_settings(config)
    assert str(err.value) == f"unknown setting upstreem (in {config}) (did you mean upstream?)"


def test_missing_config_file(tmp_path: Path) -> None:
    with pytest.raises(SettingsError, match="config file not found"):
        load_settings(tmp_path / "nope.yaml")


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("listen", "nohostport"),
        ("listen", "1.2.3.4:99999"),
        ("upstream", "ftp://x"),
        ("upstream", "https://x/some/path"),
        ("tag_ttl", "five minutes"),
        ("resume_attempts", -1),
    ],
)
def test_invalid_values(field: str, value: object) -> None:
    with pytest.raises(pydantic.ValidationError):
        Settings.model_validate({field: value})


@pytest.mark.parametrize(
    ("listen", "expected"),
    [
        ("127.0.0.1:5000", ("127.0.0.1", 5000)),
        (":80", ("0.0.0.0", 80)),
        ("[::1]:5000", ("::1", 5000)),
    ],
)
def test_host_port(listen: str, expected: tuple[str, int]) -> None:
    assert host_port(listen) == expected


def test_ttl_rules_and_max_stale_from_yaml(tmp_path: Path) -> None:
    config = tmp_path / "mirror.yaml"
    config.write_text(
        "max_stale: 2d\ntag_ttl: 10m\ntag_ttl_rules:\n"
        "  - {pattern: '*:latest', ttl: 30s}\n  - {pattern: 'library/*', ttl: 1h}\n"
    )
    freshness = load_settings(config).freshness()
    assert freshness.max_stale == 2 * 86400
    assert freshness.ttl("team/app", "latest") == 30
    assert freshness.ttl("library/alpine", "3.20") == 3600
    assert freshness.ttl("team/app", "1.0") == 600


def test_ttl_rules_from_environment_json(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MIRROR_TAG_TTL_RULES", '[{"pattern": "*:latest", "ttl": "1m"}]')
    assert Settings().freshness().ttl("a", "latest") == 60


def test_upstream_shorthand_names_the_registry_by_host() -> None:
    [one] = Settings(upstream="http://127.0.0.1:5001").resolved_upstreams()
    assert (one.name, one.base_url) == ("127.0.0.1:5001", "http://127.0.0.1:5001")
    [hub] = Settings(upstream="https://registry-1.docker.io").resolved_upstreams()
    assert hub.name == "docker.io"


def test_several_upstreams_from_yaml(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "ghcr-token").write_text("ghp_secret\n")
    monkeypatch.setenv("QUAY_PASSWORD", "quay-secret")
    config = tmp_path / "mirror.yaml"
    config.write_text(
        f"""
upstreams:
  - name: docker.io
    username: hubuser
    password: hub-secret
    tag_ttl: 1m
  - name: ghcr.io
    username: bot
    password_file: {tmp_path / "ghcr-token"}
    path_prefix: ghcr
    allow: ["myorg/*"]
  - name: quay.io
    username: robot
    password_env: QUAY_PASSWORD
    deny: ["*/secret*"]
  - name: registry.example.com:5000
    url: http://10.0.0.5:5000
    token_hosts: [auth.example.com]
    max_stale: 1d
default_upstream: registry-1.docker.io
"""
    )
    s = load_settings(config)
    hub, ghcr, quay, private = s.resolved_upstreams()
    assert s.default_upstream_name() == "docker.io"  # aliases name the same registry
    assert hub.base_url == "https://registry-1.docker.io"
    assert ghcr.base_url == "https://ghcr.io"
    assert private.base_url == "http://10.0.0.5:5000"
    assert (hub.secret(), ghcr.secret(), quay.secret()) == (
        "hub-secret",
        "ghp_secret",
        "quay-secret",
    )
    assert private.secret() is None
    base = s.freshness()
    assert hub.freshness(base).ttl("library/alpine", "3") == 60
    assert private.freshness(base).max_stale == 86400
    assert quay.freshness(base) == base
    assert "hub-secret" not in repr(s) and "hub-secret" not in str(s.model_dump())


@pytest.mark.parametrize(
    ("yaml", "message"),
    [
        ("upstreams: [{name: a.io}, {name: a.io}]", "unique"),
        ("upstreams: [{name: a.io, path_prefix: x}, {name: b.io, path_prefix: x}]", "unique"),
        ("upstreams: [{name: 'http://a.io'}]", "registry host name"),
        ("upstreams: [{name: a.io, url: 'ftp://a.io'}]", "http(s)"),
        ("upstreams: [{name: a.io, password: x}]", "needs a username"),
        ("upstreams: [{name: a.io, username: u, password: x, password_env: Y}]", "one of"),
        ("upstreams: [{name: a.io}]\ndefault_upstream: b.io", "not a configured upstream"),
        ("upstream: https://a.io\nupstreams: [{name: b.io}]", "not both"),
        ("upstreams: [{name: a.io, path_prefix: 'a/b'}]", "one path component"),
    ],
)
def test_bad_upstream_settings_are_clear_errors(tmp_path: Path, yaml: str, message: str) -> None:
    config = tmp_path / "mirror.yaml"
    config.write_text(yaml + "\n")
    with pytest.raises(SettingsError, match=re.escape(message)):
        load_settings(config)


def test_missing_password_sources_are_clear_errors(tmp_path: Path) -> None:
    from mirror.config import UpstreamSettings

    gone = UpstreamSettings(name="a.io", username="u", password_file=tmp_path / "none")
    with pytest.raises(ValueError, match="cannot read password_file"):
        gone.secret()
    unset = UpstreamSettings(name="a.io", username="u", password_env="MIRROR_TEST_UNSET_VAR")
    with pytest.raises(ValueError, match="MIRROR_TEST_UNSET_VAR is not set"):
        unset.secret()


def test_the_shared_store_names_what_it_lacks() -> None:
    with pytest.raises(pydantic.ValidationError) as err:
        Settings(store="s3")
    assert "store s3 needs s3_bucket, redis_url, peer_url, peer_secret (or peer_secret_file)" in (
        str(err.value)
    )
    base: dict[str, Any] = {
        "store": "s3",
        "s3_bucket": "b",
        "redis_url": "redis://:hunter2@redis:6379/0",
        "peer_url": "http://10.0.0.5:5000",
        "peer_secret": "p" * 16,
    }
    with pytest.raises(pydantic.ValidationError, match="at least 16 characters"):
        Settings(**{**base, "peer_secret": ""})
    with pytest.raises(pydantic.ValidationError, match="go together"):
        Settings(**base, s3_access_key_id="AK")
    with pytest.raises(pydantic.ValidationError, match="http"):
        Settings(**{**base, "peer_url": "10.0.0.5:5000"})
    assert Settings(**base, l1_max_size=0).l1_max_size == 0
    assert Settings(**base, l1_max_size="0").l1_max_size == 0
    settings = Settings(**base, s3_access_key_id="AK", s3_secret_access_key="SK")
    assert settings.shared_secrets().s3_secret_access_key == "SK"
    # Secrets never print.
    for text in (repr(settings), str(settings), repr(settings.shared_secrets())):
        assert "hunter2" not in text and "SK'" not in text


def test_shared_secrets_come_from_files(tmp_path: Path) -> None:
    (tmp_path / "s3").write_text("from-file\n")
    (tmp_path / "peer").write_text("peer-file-0123456789\n")
    (tmp_path / "empty").write_text("\n")
    settings = Settings(
        store="s3",
        s3_bucket="b",
        redis_url="redis://redis:6379/0",
        redis_password_file=tmp_path / "empty",
        peer_url="http://10.0.0.5:5000",
        peer_secret_file=tmp_path / "peer",
        s3_access_key_id="AK",
        s3_secret_access_key_file=tmp_path / "s3",
    )
    with pytest.raises(ValueError, match=r"redis password file .* is empty"):
        settings.shared_secrets()
    settings.redis_password_file = None
    secrets = settings.shared_secrets()
    assert (secrets.s3_secret_access_key, secrets.peer_secret) == (
        "from-file",
        "peer-file-0123456789",
    )


def test_a_tiers_secret_and_ca_bundle_are_checked_before_serving(tmp_path: Path) -> None:
    from mirror.loading import check_usable

    settings = Settings(
        cache_dir=tmp_path / "cache",
        upstreams=[
            {
                "name": "docker.io",
                "mirrors": [
                    {"url": "http://central:5000", "username": "u", "password_env": "NOPE_X"},
                    {"url": "https://other:5000", "ca_bundle": str(tmp_path / "none.pem")},
                ],
            }
        ],
    )
    with pytest.raises(SettingsError) as err:
        check_usable(settings)
    assert str(err.value).splitlines() == [
        "mirror tier central:5000: environment variable NOPE_X is not set",
        f"mirror tier other:5000: ca_bundle {tmp_path / 'none.pem'} is not a readable file",
    ]


def test_tier_names_never_clash_with_a_registry_and_are_unique_per_upstream() -> None:
    central = {"name": "central", "url": "http://central:5000"}
    Settings(upstreams=[{"name": "docker.io", "mirrors": [central]},
                        {"name": "ghcr.io", "mirrors": [central]}])  # fmt: skip
    with pytest.raises(pydantic.ValidationError, match="must be unique"):
        Settings(upstreams=[{"name": "docker.io", "mirrors": [central, central]}])
    with pytest.raises(pydantic.ValidationError, match="has a registry's name"):
        Settings(
            upstreams=[
                {"name": "docker.io", "mirrors": [{"name": "ghcr.io", "url": "http://c:5000"}]},
                {"name": "ghcr.io"},
            ]
        )
