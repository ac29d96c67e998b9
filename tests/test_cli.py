from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest
from click.testing import CliRunner
from fakes.cache import commit_bytes

from mirror.cli import main
from mirror.diskstore import DiskStore
from mirror.reference import Digest
from mirror.store import TagEntry, TagKey


def test_serve_help_lists_options_but_no_secrets() -> None:
    result = CliRunner().invoke(main, ["serve", "--help"])
    assert result.exit_code == 0
    for option in ("--config", "--listen", "--upstream", "--cache-dir"):
        assert option in result.output
    assert "--password" not in result.output
    assert "MIRROR_UPSTREAM_PASSWORD" in result.output


def test_bad_listen_is_a_usage_error(tmp_path: Path) -> None:
    result = CliRunner().invoke(main, ["serve", "--listen", "nope", "--cache-dir", str(tmp_path)])
    assert result.exit_code == 2
    assert "HOST:PORT" in result.output


def test_missing_config_file_is_a_usage_error(tmp_path: Path) -> None:
    result = CliRunner().invoke(main, ["serve", "--config", str(tmp_path / "x.yaml")])
    assert result.exit_code == 2
    assert "config file not found" in result.output


def test_version() -> None:
    result = CliRunner().invoke(main, ["--version"])
    assert result.exit_code == 0
    assert "version" in result.output


def test_cache_stats_and_verify(tmp_path: Path) -> None:
    store = DiskStore(tmp_path)
    good = b"good bytes"
    asyncio.run(commit_bytes(store, good))
    rotten = asyncio.run(commit_bytes(store, b"soon rotten"))
    store.blob_path(rotten).write_bytes(b"soon rotteN")
    store.close()

    stats = CliRunner().invoke(main, ["cache", "stats", "--cache-dir", str(tmp_path)])
    assert stats.exit_code == 0, stats.output
    assert "blobs:      2" in stats.output
    assert f"blob bytes: {len(good) + 11}" in stats.output

    verify = CliRunner().invoke(main, ["cache", "verify", "--cache-dir", str(tmp_path)])
    assert verify.exit_code == 1
    assert f"removed {rotten}" in verify.output
    again = CliRunner().invoke(main, ["cache", "verify", "--cache-dir", str(tmp_path)])
    assert again.exit_code == 0
    assert "verified 1 blobs: 1 ok, 0 removed" in again.output


def test_cache_commands_need_an_existing_cache(tmp_path: Path) -> None:
    result = CliRunner().invoke(main, ["cache", "stats", "--cache-dir", str(tmp_path / "no")])
    assert result.exit_code == 2
    assert "no cache at" in result.output


def test_cache_prune_applies_the_size_cap(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    store = DiskStore(tmp_path)
    for i in range(4):
        asyncio.run(commit_bytes(store, bytes([i]) * 1000))
    store.close()
    monkeypatch.setenv("MIRROR_MAX_SIZE", "2500B")
    result = CliRunner().invoke(main, ["cache", "prune", "--cache-dir", str(tmp_path)])
    assert result.exit_code == 0, result.output
    assert "evicted 2 blobs (0 unused" in result.output
    assert "2000 bytes cached" in result.output


def test_cache_prune_keeps_tags_an_upstream_may_still_serve_stale(
    tmp_path: Path, no_mirror_env: None
) -> None:
    """The server keeps a tag for the largest max_stale of any upstream; prune must
    too (it once used the global max_stale and deleted tags still served stale)."""
    config = tmp_path / "mirror.yaml"
    config.write_text(
        f"cache_dir: {tmp_path / 'cache'}\nmax_stale: 1d\n"
        "upstreams:\n  - name: ghcr.io\n    max_stale: 30d\n"
    )
    day, now = 86400.0, time.time()
    digest = Digest("sha256", "0" * 64)
    kept, gone = (TagKey("ghcr.io", "org/app", t, "-") for t in ("kept", "gone"))
    store = DiskStore(tmp_path / "cache")
    asyncio.run(store.put_tag(kept, TagEntry(digest, "application/json", now - 10 * day)))
    asyncio.run(store.put_tag(gone, TagEntry(digest, "application/json", now - 40 * day)))
    store.close()

    result = CliRunner().invoke(main, ["cache", "prune", "--config", str(config)])
    assert result.exit_code == 0, result.output
    assert ", 1 tags;" in result.output
    store = DiskStore(tmp_path / "cache")
    assert [key for key, _ in store.scan().tags] == [kept]
    store.close()


def test_cache_prune_with_a_bad_setting_is_one_clear_line(
    tmp_path: Path, no_mirror_env: None
) -> None:
    config = tmp_path / "mirror.yaml"
    config.write_text(f"cache_dir: {tmp_path}\nmax_stale: soon\n")
    result = CliRunner().invoke(main, ["cache", "prune", "--config", str(config)])
    assert result.exit_code == 2
    assert "invalid duration 'soon'" in result.output
    assert "Traceback" not in result.output


@pytest.mark.parametrize(
    ("image", "expected"),
    [
        ("alpine", (None, "alpine", "latest")),
        ("library/alpine:3.20", (None, "library/alpine", "3.20")),
        ("a/b@sha256:" + "c" * 64, (None, "a/b", "sha256:" + "c" * 64)),
        ("ghcr.io/myorg/app:1.2", ("ghcr.io", "myorg/app", "1.2")),
        ("regb.test:5000/team/app", ("regb.test:5000", "team/app", "latest")),
        ("localhost/app:1", ("localhost", "app", "1")),
        ("docker.io/library/alpine", ("docker.io", "library/alpine", "latest")),
    ],
)
def test_parse_image(image: str, expected: tuple[str | None, str, str]) -> None:
    from mirror.warm import parse_image

    assert parse_image(image) == expected


def test_containerd_hosts_writes_one_file_per_registry(tmp_path: Path, no_mirror_env: None) -> None:
    import tomllib

    config = tmp_path / "mirror.yaml"
    config.write_text(
        "upstreams:\n"
        "  - {name: docker.io}\n"
        "  - {name: ghcr.io}\n"
        "  - {name: 'registry.example.com:5000', url: 'http://10.0.0.5:5000'}\n"
        "  - {name: hub-cache.example.com, aliases: [quay.io]}\n"
    )
    certs = tmp_path / "certs.d"
    result = CliRunner().invoke(
        main,
        [
            "containerd-hosts",
            "--config",
            str(config),
            "--mirror-url",
            "http://10.1.2.3:5000",
            "--dir",
            str(certs),
            "--default",
        ],
    )
    assert result.exit_code == 0, result.output
    found = {p.parent.name: tomllib.loads(p.read_text()) for p in certs.glob("*/hosts.toml")}
    assert set(found) == {
        "docker.io",
        "ghcr.io",
        "registry.example.com:5000",
        "hub-cache.example.com",
        "quay.io",
        "_default",
    }
    assert found["docker.io"]["server"] == "https://registry-1.docker.io"
    assert found["registry.example.com:5000"]["server"] == "http://10.0.0.5:5000"
    assert found["quay.io"]["server"] == "https://hub-cache.example.com"
    assert "server" not in found["_default"]
    for hosts in found.values():
        assert hosts["host"] == {"http://10.1.2.3:5000": {"capabilities": ["pull", "resolve"]}}
    assert not list(certs.glob("*/.hosts-*"))  # no temp files left behind


def test_containerd_hosts_refuses_a_bad_mirror_url(tmp_path: Path) -> None:
    result = CliRunner().invoke(
        main, ["containerd-hosts", "--mirror-url", "10.1.2.3:5000", "--dir", str(tmp_path)]
    )
    assert result.exit_code == 2
    assert "must be http(s)://host:port" in result.output


def test_containerd_hosts_brackets_an_ipv6_node_ip(tmp_path: Path) -> None:
    import tomllib

    result = CliRunner().invoke(
        main,
        [
            *("containerd-hosts", "--mirror-host", "fd00::1"),
            *("--mirror-port", "29500", "--dir", str(tmp_path)),
        ],
    )
    assert result.exit_code == 0, result.output
    hosts = tomllib.loads((tmp_path / "docker.io" / "hosts.toml").read_text())
    assert list(hosts["host"]) == ["http://[fd00::1]:29500"]
    unbracketed = CliRunner().invoke(
        main, ["containerd-hosts", "--mirror-url", "http://fd00::1:29500", "--dir", str(tmp_path)]
    )
    assert unbracketed.exit_code == 2
    assert "IPv6 in brackets" in unbracketed.output


def test_probe_exits_0_only_for_a_healthy_mirror() -> None:
    refused = CliRunner().invoke(main, ["probe", "--url", "http://127.0.0.1:9"])
    assert refused.exit_code == 1
