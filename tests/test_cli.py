from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest
from click.testing import CliRunner
from conftest import MirrorFactory
from fakes.cache import commit_bytes
from fakes.upstream import FakeUpstream

from mirror.cli import main
from mirror.diskstore import DiskStore
from mirror.mediatypes import OCI_INDEX, OCI_MANIFEST
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
    # quay.io images fall back to quay.io itself, not to the cache that answers for it.
    assert found["quay.io"]["server"] == "https://quay.io"
    assert "server" not in found["_default"]
    for hosts in found.values():
        assert hosts["host"] == {"http://10.1.2.3:5000": {"capabilities": ["pull", "resolve"]}}
    assert not list(certs.glob("*/.hosts-*"))  # no temp files left behind


def test_containerd_hosts_for_a_serve_upstream_falls_back_to_docker_hub(
    tmp_path: Path, no_mirror_env: None
) -> None:
    """`mirror serve --upstream URL` also answers ns=docker.io; containerd's fallback for
    docker.io images must still be Docker Hub, never the private upstream."""
    import tomllib

    certs = tmp_path / "certs.d"
    args = ["--upstream", "http://127.0.0.1:5004", "--mirror-url", "http://10.1.2.3:5000"]
    result = CliRunner().invoke(main, ["containerd-hosts", *args, "--dir", str(certs)])
    assert result.exit_code == 0, result.output
    found = {p.parent.name: tomllib.loads(p.read_text()) for p in certs.glob("*/hosts.toml")}
    assert found["docker.io"]["server"] == "https://registry-1.docker.io"
    assert found["127.0.0.1:5004"]["server"] == "http://127.0.0.1:5004"


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


# -- what a newcomer sees when something is wrong ----------------------------------------


def _run(*args: str, env: dict[str, str] | None = None) -> tuple[int, str]:
    result = CliRunner().invoke(main, list(args), env=env)
    assert "Traceback" not in result.output
    return result.exit_code, result.output


def test_a_bad_setting_is_one_line_naming_it_and_where_it_came_from(
    tmp_path: Path, no_mirror_env: None
) -> None:
    code, out = _run("serve", "--listen", "5000", "--cache-dir", str(tmp_path))
    assert (code, out) == (
        2,
        "Error: setting listen (command line): listen must be HOST:PORT, got '5000'\n",
    )


def test_a_typo_in_the_file_or_environment_gets_a_did_you_mean(
    tmp_path: Path, no_mirror_env: None
) -> None:
    config = tmp_path / "mirror.yaml"
    config.write_text("tag_tll: 5m\n")
    code, out = _run("serve", "--config", str(config), env={"MIRROR_MAX_SIZ": "1GiB"})
    assert code == 2
    assert out == (
        "warning: ignoring unknown environment variable MIRROR_MAX_SIZ "
        "(did you mean MIRROR_MAX_SIZE?)\n"
        f"Error: unknown setting tag_tll (in {config}) (did you mean tag_ttl?)\n"
    )
    assert "pydantic" not in out and "FileSettings" not in out


def test_malformed_yaml_names_the_file_and_line(tmp_path: Path, no_mirror_env: None) -> None:
    config = tmp_path / "mirror.yaml"
    config.write_text("tag_ttl: 5m\nupstreams: [\n")
    code, out = _run("serve", "--config", str(config))
    assert code == 2
    assert out.startswith(f"Error: {config}, line 3, column 1: not valid YAML: ")


def test_credentials_in_a_bad_setting_are_never_echoed(no_mirror_env: None) -> None:
    code, out = _run("serve", "--upstream", "http://bot:hunter2@registry.example")
    assert code == 2
    assert "hunter2" not in out
    assert "without a path or credentials" in out


def test_files_secrets_and_the_cache_dir_are_checked_before_serving(
    tmp_path: Path, no_mirror_env: None
) -> None:
    config = tmp_path / "mirror.yaml"
    config.write_text(
        "upstreams:\n"
        "  - {name: a.io, ca_bundle: /nonexistent/ca.pem}\n"
        "  - {name: b.io, username: u, password_file: /nonexistent/token}\n"
    )
    (tmp_path / "file").write_text("")
    cache = tmp_path / "file" / "cache"  # under a regular file
    code, out = _run("serve", "--config", str(config), "--cache-dir", str(cache))
    assert (code, out) == (
        2,
        "Error: 3 problems:\n"
        "  upstream a.io: ca_bundle /nonexistent/ca.pem is not a readable file\n"
        "  upstream b.io: cannot read password_file /nonexistent/token: "
        "No such file or directory\n"
        f"  cache_dir {cache} cannot be used: Not a directory\n",
    )


def test_a_port_in_use_is_said_before_anything_claims_to_be_ready(
    tmp_path: Path, no_mirror_env: None
) -> None:
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        listen = f"127.0.0.1:{port}"
        code, out = _run("serve", "--listen", listen, "--cache-dir", str(tmp_path / "c"))
    assert code == 2
    assert out == (
        f"Error: cannot listen on {listen}: address already in use; is another mirror "
        "running? Choose another address with --listen HOST:PORT\n"
    )


def test_cache_commands_name_their_directory_and_never_make_one(
    tmp_path: Path, no_mirror_env: None
) -> None:
    code, out = _run("cache", "stats", "--cache-dir", str(tmp_path))
    assert (code, out) == (
        2,
        f"cache:      {tmp_path}\nError: {tmp_path} is not a mirror cache (it has no index/)\n",
    )
    assert list(tmp_path.iterdir()) == []  # nothing created in somebody else's directory


def test_warm_says_where_it_found_no_mirror(no_mirror_env: None) -> None:
    code, out = _run("warm", "--mirror", "http://127.0.0.1:9", "alpine")
    assert code == 1
    assert out.startswith("Error: cannot reach the mirror at http://127.0.0.1:9: ")
    assert "(is it running? --mirror URL)" in out


async def test_warm_reports_the_mirrors_own_error_and_a_platform_that_matches_nothing(
    fake: tuple[FakeUpstream, str], mirror: MirrorFactory
) -> None:
    upstream, url = fake
    child = upstream.add_manifest(OCI_MANIFEST, {"mediaType": OCI_MANIFEST, "layers": []})
    index = {
        "mediaType": OCI_INDEX,
        "manifests": [
            {
                "digest": child,
                "size": 1,
                "mediaType": OCI_MANIFEST,
                "platform": {"os": "linux", "architecture": "amd64"},
            },
        ],
    }
    upstream.add_manifest(OCI_INDEX, index, tag="multi")
    async with mirror(url) as m:
        missing = await asyncio.to_thread(
            CliRunner().invoke, main, ["warm", "--mirror", m.url, "app:nope"]
        )
        other = await asyncio.to_thread(
            CliRunner().invoke,
            main,
            ["warm", "--mirror", m.url, "--platform", "windows/amd64", "app:multi"],
        )
    assert missing.exit_code == 1
    assert "app:nope: failed: the mirror answered 404 for /v2/app/manifests/nope: " in (
        missing.output
    )
    assert "MANIFEST_UNKNOWN" in missing.output and "mozilla" not in missing.output
    assert other.exit_code == 1
    assert (
        "app:multi: failed: no platform matches windows/amd64 (the image has: linux/amd64)"
        in other.output
    )


def test_a_cache_that_cannot_be_opened_is_one_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, no_mirror_env: None
) -> None:
    import sqlite3

    DiskStore(tmp_path).close()

    def read_only(*args: object, **kwargs: object) -> None:
        raise sqlite3.OperationalError("attempt to write a readonly database")

    monkeypatch.setattr(DiskStore, "__init__", read_only)
    code, out = _run("cache", "stats", "--cache-dir", str(tmp_path))
    assert (code, out) == (
        2,
        f"cache:      {tmp_path}\n"
        f"Error: cannot open the cache at {tmp_path}: attempt to write a readonly database\n",
    )


def test_serve_never_adopts_a_directory_that_holds_something_else(
    tmp_path: Path, no_mirror_env: None
) -> None:
    """Start-up recovery empties tmp/: a home directory given as the cache would lose
    its ~/tmp."""
    home = tmp_path / "home"
    (home / "tmp").mkdir(parents=True)
    (home / "tmp" / "notes.txt").write_text("mine")
    code, out = _run("serve", "--cache-dir", str(home))
    assert (code, out) == (
        2,
        f"Error: cache_dir {home} is not empty and not a mirror cache: give a new or empty one\n",
    )
    assert (home / "tmp" / "notes.txt").read_text() == "mine"


@pytest.mark.parametrize(
    ("content", "told"),
    [
        ("- a\n- b\n", "must be a mapping of settings (key: value)"),
        ("42\n", "must be a mapping of settings (key: value)"),
        (b"\xff\xfe", "not UTF-8 text"),
    ],
    ids=["a list", "a number", "not UTF-8"],
)
def test_a_config_file_that_is_no_mapping_is_one_line(
    content: str | bytes, told: str, tmp_path: Path, no_mirror_env: None
) -> None:
    config = tmp_path / "mirror.yaml"
    if isinstance(content, bytes):
        config.write_bytes(content)
    else:
        config.write_text(content)
    assert _run("serve", "--config", str(config)) == (2, f"Error: {config}: {told}\n")


@pytest.mark.parametrize(
    ("env", "told"),
    [
        ({"MIRROR_UPSTREAMS": '[{"name": ghcr'}, "MIRROR_UPSTREAMS: not valid JSON"),
        (
            {"MIRROR_UPSTREAMS": '[{"name": "ghcr.io", "pasword": "x"}]'},
            "unknown setting upstreams[0].pasword (MIRROR_UPSTREAMS) (did you mean password?)",
        ),
        (
            {"MIRROR_TAG_TTL_RULES": '[{"patern": "*", "ttl": "1m"}]'},
            "2 problems:\n  setting tag_ttl_rules[0].pattern (MIRROR_TAG_TTL_RULES): is required\n"
            "  unknown setting tag_ttl_rules[0].patern (MIRROR_TAG_TTL_RULES) "
            "(did you mean pattern?)",
        ),
        ({"MIRROR_LOG_LEVEL": "verbose"}, "setting log_level (MIRROR_LOG_LEVEL): "),
        ({"MIRROR_EVICTION_INTERVAL": "0"}, "setting eviction_interval (MIRROR_EVICTION_INTERVAL)"),
        ({"MIRROR_MAX_SIZE": "-5"}, "setting max_size (MIRROR_MAX_SIZE): invalid size '-5'"),
        (
            {"MIRROR_UPSTREAM_PASSWORD": "x"},
            "invalid settings: upstream_password needs upstream_username "
            "(MIRROR_UPSTREAM_USERNAME)",
        ),
    ],
    ids=[
        "bad JSON",
        "typo in JSON",
        "typo in a rule",
        "log level",
        "zero interval",
        "negative size",
        "password alone",
    ],
)
def test_settings_from_the_environment_are_one_line_each_with_their_source(
    env: dict[str, str], told: str, tmp_path: Path, no_mirror_env: None
) -> None:
    code, out = _run("serve", "--cache-dir", str(tmp_path / "c"), env=env)
    assert code == 2
    assert out.startswith(f"Error: {told}"), out


def test_a_ca_bundle_that_holds_no_certificate_is_said_before_serving(
    tmp_path: Path, no_mirror_env: None
) -> None:
    bundle = tmp_path / "ca.pem"
    bundle.write_text("garbage\n")
    config = tmp_path / "mirror.yaml"
    config.write_text(f"upstreams: [{{name: a.io, ca_bundle: {bundle}}}]\n")
    code, out = _run("serve", "--config", str(config), "--cache-dir", str(tmp_path / "c"))
    assert code == 2
    assert out.startswith(f"Error: upstream a.io: ca_bundle {bundle} holds no usable PEM")


def test_containerd_hosts_into_an_unwritable_place_is_one_line(
    tmp_path: Path, no_mirror_env: None
) -> None:
    (tmp_path / "file").write_text("")
    target = tmp_path / "file" / "certs.d"
    code, out = _run(
        "containerd-hosts", "--mirror-url", "http://10.0.0.1:5000", "--dir", str(target)
    )
    assert (code, out) == (1, f"Error: cannot write to {target}: Not a directory\n")


def test_warm_wants_a_mirror_url(no_mirror_env: None) -> None:
    code, out = _run("warm", "--mirror", "127.0.0.1:5000", "alpine")
    assert code == 2
    assert "Error: --mirror must be a URL such as http://127.0.0.1:5000" in out


def test_a_fresh_volume_with_lost_and_found_is_a_fine_cache(
    tmp_path: Path, no_mirror_env: None
) -> None:
    from mirror.config import Settings
    from mirror.loading import check_usable

    volume = tmp_path / "volume"
    (volume / "lost+found").mkdir(parents=True)
    check_usable(Settings(upstream="http://127.0.0.1:9", cache_dir=volume))  # no error


async def test_warm_checks_a_single_platform_image_and_a_tag_before_asking(
    fake: tuple[FakeUpstream, str], mirror: MirrorFactory
) -> None:
    import json

    upstream, url = fake
    config_body = json.dumps({"os": "linux", "architecture": "amd64"}).encode()
    config = upstream.add_blob(config_body)
    descriptor = {"digest": config, "size": len(config_body)}
    upstream.add_manifest(
        OCI_MANIFEST, {"mediaType": OCI_MANIFEST, "config": descriptor, "layers": []}, tag="single"
    )
    async with mirror(url) as m:
        other = await asyncio.to_thread(
            CliRunner().invoke,
            main,
            ["warm", "--mirror", m.url, "--platform", "linux/arm64", "app:single"],
        )
        same = await asyncio.to_thread(
            CliRunner().invoke,
            main,
            ["warm", "--mirror", m.url, "--platform", "linux/amd64", "app:single"],
        )
        bad = await asyncio.to_thread(
            CliRunner().invoke, main, ["warm", "--mirror", m.url, "app:bad tag"]
        )
    assert other.exit_code == 1
    assert "app:single: failed: the image is linux/amd64, which matches none of linux/arm64" in (
        other.output
    )
    assert same.exit_code == 0, same.output
    assert bad.exit_code == 1
    assert "app:bad tag: failed: 'bad tag' is not a valid tag" in bad.output


def test_a_corrupt_index_is_refused_without_creating_anything(
    tmp_path: Path, no_mirror_env: None
) -> None:
    (tmp_path / "index").mkdir()
    (tmp_path / "index" / "cache.db").write_bytes(b"not a database" * 100)
    code, out = _run("cache", "stats", "--cache-dir", str(tmp_path))
    assert code == 2
    assert f"Error: cannot open the cache at {tmp_path}: " in out
    assert sorted(p.name for p in tmp_path.iterdir()) == ["index"]


@pytest.mark.parametrize(
    ("args", "env"),
    [
        pytest.param(["--workers", "0"], {}, id="zero"),
        pytest.param(["--workers", "two"], {}, id="word"),
        pytest.param([], {"MIRROR_WORKERS": "-1"}, id="env-negative"),
    ],
)
def test_a_bad_workers_value_is_one_clear_line(
    tmp_path: Path, no_mirror_env: None, args: list[str], env: dict[str, str]
) -> None:
    result = CliRunner().invoke(main, ["serve", "--cache-dir", str(tmp_path), *args], env=env)
    assert result.exit_code == 2
    problem = result.output.strip().splitlines()
    assert len(problem) == 1, result.output
    assert "workers is a number of processes from 1 to 1024, or auto" in problem[0]


def test_workers_with_the_shared_store_is_refused_in_one_line(
    tmp_path: Path, no_mirror_env: None
) -> None:
    env = {
        "MIRROR_STORE": "s3",
        "MIRROR_S3_BUCKET": "b",
        "MIRROR_REDIS_URL": "redis://127.0.0.1:1",
        "MIRROR_PEER_URL": "http://127.0.0.1:5000",
        "MIRROR_PEER_SECRET": "x" * 16,
    }
    cmd = ["serve", "--cache-dir", str(tmp_path), "--workers", "2"]
    result = CliRunner().invoke(main, cmd, env=env)
    assert result.exit_code == 2
    assert result.output.strip().splitlines() == [
        "Error: invalid settings: store s3 runs one worker per replica: set workers: 1 and "
        "run more replicas"
    ]


def test_workers_auto_is_the_cpus_this_process_may_use(
    monkeypatch: pytest.MonkeyPatch, no_mirror_env: None
) -> None:
    import mirror.cpus
    from mirror.cli import _worker_count
    from mirror.config import Settings

    monkeypatch.setattr(mirror.cpus, "available_cpus", lambda: 3)
    assert _worker_count(Settings(workers="auto")) == 3
    assert _worker_count(Settings(workers=2)) == 2
