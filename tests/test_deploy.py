"""The shipped examples stay valid."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import yaml
from harness import require_tool

from mirror.budget import Reserve
from mirror.freshness import TagFreshness
from mirror.loading import load_settings, unknown_environment

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


@pytest.mark.usefixtures("no_mirror_env")
def test_example_config_shared_store_block_loads_uncommented(tmp_path: Path) -> None:
    """The commented `store: s3` example in deploy/mirror.yaml is valid as written."""
    text = (DEPLOY / "mirror.yaml").read_text()
    start = text.index("# store: s3")
    end = text.index("\n\n", start)
    block = "\n".join(line.removeprefix("# ") for line in text[start:end].splitlines())
    config = tmp_path / "mirror.yaml"
    config.write_text(text[:start] + block.replace("AKIA...", "AKIAEXAMPLE") + text[end:])
    settings = load_settings(config)
    assert settings.store == "s3"
    assert settings.s3_secret_access_key_file is not None
    assert settings.peer_secret_file is not None and settings.redis_password_file is not None
    assert settings.peer_url == "http://10.1.2.3:5000"


@pytest.mark.usefixtures("no_mirror_env")
def test_example_config_auth_block_loads_uncommented(tmp_path: Path) -> None:
    """The commented authentication example in deploy/mirror.yaml is valid as written."""
    text = (DEPLOY / "mirror.yaml").read_text()
    start = text.index("# auth_htpasswd:")
    block = "\n".join(line.removeprefix("# ") for line in text[start:].splitlines())
    (tmp_path / "htpasswd").write_text("")
    block = block.replace("/etc/mirror/htpasswd", str(tmp_path / "htpasswd"))
    config = tmp_path / "mirror.yaml"
    config.write_text(text[:start] + block.replace("<64 hex digits>", "0" * 64) + "\n")
    settings = load_settings(config)
    assert settings.auth_tokens[0].groups == ["builders"]
    assert [r.upstreams for r in settings.access] == [["docker.io"], ["ghcr.io"]]
    assert settings.anonymous_allowed() and settings.credentials_configured()


@pytest.mark.usefixtures("no_mirror_env")
def test_example_config_mirror_tier_loads_uncommented(tmp_path: Path) -> None:
    """The commented `mirrors:` example under docker.io in deploy/mirror.yaml is valid
    as written: a tier of that upstream, without the upstream's credentials."""
    lines = (DEPLOY / "mirror.yaml").read_text().splitlines()
    start = lines.index("    # mirrors:")
    end = start + 1
    while lines[end].startswith("    #   "):
        end += 1
    assert end - start == 3
    lines[start:end] = ["    " + line.removeprefix("    # ") for line in lines[start:end]]
    config = tmp_path / "mirror.yaml"
    config.write_text("\n".join(lines) + "\n")
    settings = load_settings(config)
    upstreams = {u.name: u for u in settings.resolved_upstreams()}
    [tier] = upstreams["docker.io"].mirrors
    assert (tier.name, tier.url) == ("central", "http://mirror-central.example.internal:5000")
    assert tier.username is None and tier.password_file is None
    assert upstreams["docker.io"].password_file is not None
    assert settings.tier_backoff == 30
    # As shipped, no upstream has a tier.
    assert not any(u.mirrors for u in load_settings(DEPLOY / "mirror.yaml").resolved_upstreams())


def _tiers_section_blocks(language: str) -> list[str]:
    """The ```<language> blocks of docs/deploy.md's "Tiers" section, dedented."""
    text = (DEPLOY.parent / "docs" / "deploy.md").read_text()
    start = text.index("\n## Tiers\n")
    section = text[start : text.index("\n## ", start + 1)]
    blocks = re.findall(rf"^( *)```{language}\n(.*?)^\1```$", section, re.M | re.S)
    return [
        "\n".join(line.removeprefix(indent) for line in body.splitlines())
        for indent, body in blocks
    ]


@pytest.mark.usefixtures("no_mirror_env")
def test_deploy_docs_tier_settings_example_loads(tmp_path: Path) -> None:
    """The settings example of docs/deploy.md's "Tiers" section is valid as written."""
    settings_block, _rule = _tiers_section_blocks("yaml")
    config = tmp_path / "mirror.yaml"
    config.write_text(settings_block)
    settings = load_settings(config)
    assert settings.tier_backoff == 30
    upstreams = {u.name: u for u in settings.resolved_upstreams()}
    assert [t.name for t in upstreams["ghcr.io"].mirrors] == ["central", "partner"]
    assert upstreams["docker.io"].mirrors[0].username is None  # the registry's stay there


def test_deploy_docs_tier_alert_example_passes_promtool(tmp_path: Path) -> None:
    promtool = require_tool("promtool")
    _settings, rule = _tiers_section_blocks("yaml")
    rules = tmp_path / "rules.yml"
    rules.write_text(yaml.safe_dump({"groups": [{"name": "tiers", "rules": yaml.safe_load(rule)}]}))
    result = subprocess.run(
        [promtool, "check", "rules", str(rules)], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "mirror_tier_state" in rule


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
    # What `docker compose up` starts: everything else is behind a profile.
    assert {name for name, s in services.items() if not s.get("profiles")} == {
        "mirror",
        "prometheus",
        "grafana",
    }
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


_INTERPOLATION = re.compile(r"\$\{(\w+):-([^}]*)\}")


def _interpolate(value: str) -> str:
    """Compose's `${VAR:-default}` with nothing set: the default."""
    return _INTERPOLATION.sub(lambda m: m[2], value)


@pytest.mark.usefixtures("no_mirror_env")
def test_compose_ha_profile_runs_replicas_on_a_shared_store(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`--profile ha`: Redis, an S3 store with its bucket made by a one-shot, and
    replicas on store s3, each with its own peer URL and L1, one peer secret."""
    compose = yaml.safe_load((DEPLOY / "compose.yaml").read_text())
    services = compose["services"]
    ha = {name for name, s in services.items() if s.get("profiles")}
    assert all(services[name]["profiles"] == ["ha"] for name in ha)
    assert services["redis"]["image"].startswith("redis:7")
    replicas = sorted(
        name for name in ha if services[name].get("environment", {}).get("MIRROR_STORE") == "s3"
    )
    assert len(replicas) == 3
    # The bucket the one-shot creates is the one the replicas use.
    bucket = services["bucket"]
    [script] = bucket["command"]
    env = {k: _interpolate(str(v)) for k, v in services[replicas[0]]["environment"].items()}
    assert script.endswith(f"mc mb --ignore-existing store/{env['MIRROR_S3_BUCKET']}")
    assert _interpolate(bucket["environment"]["MINIO_ROOT_PASSWORD"]) == _interpolate(
        services["minio"]["environment"]["MINIO_ROOT_PASSWORD"]
    )
    assert env["MIRROR_S3_ENDPOINT"] == "http://minio:9000"
    assert env["MIRROR_REDIS_URL"].startswith("redis://redis:")
    peer_urls, caches, secrets = set(), set(), set()
    for name in replicas:
        service = services[name]
        assert service["profiles"] == ["ha"]
        env = {k: _interpolate(str(v)) for k, v in service["environment"].items()}
        assert unknown_environment(env) == []  # every MIRROR_* name is a setting
        assert env["MIRROR_PEER_URL"] == f"http://{name}:5000"  # its own, by service name
        peer_urls.add(env["MIRROR_PEER_URL"])
        secrets.add(env["MIRROR_PEER_SECRET_FILE"])
        mounts = dict(v.split(":")[1::-1] for v in service["volumes"])  # target -> source
        caches.add(mounts["/var/cache/mirror"])
        assert service["depends_on"]["bucket"]["condition"] == "service_completed_successfully"
        assert service["depends_on"]["peer-secret"]["condition"] == (
            "service_completed_successfully"
        )
        assert service["depends_on"]["redis"]["condition"] == "service_healthy"
        # The settings load: the compose settings file, this environment, and the
        # peer secret file (made by the one-shot) in place.
        secret_dir = mounts[str(Path(env["MIRROR_PEER_SECRET_FILE"]).parent)]
        assert services["peer-secret"]["volumes"] == [f"{secret_dir}:/secrets"]
        peer_secret = tmp_path / "peer-secret"
        peer_secret.write_text("0123456789abcdef\n")
        env["MIRROR_PEER_SECRET_FILE"] = str(peer_secret)
        config = DEPLOY / mounts.pop("/etc/mirror/mirror.yaml").removeprefix("./")
        del env["MIRROR_CONFIG"]
        with monkeypatch.context() as m:
            for key, value in env.items():
                m.setenv(key, value)
            settings = load_settings(config)
        assert settings.store == "s3" and settings.s3_path_style
        assert settings.shared_secrets().peer_secret == "0123456789abcdef"
        assert settings.max_size is not None and settings.l1_max_size < settings.max_size
    assert len(peer_urls) == len(caches) == 3  # each its own address and L1
    assert len(secrets) == 1  # one secret, shared
    # The one-shot writes the secret only if it is not there yet (kept across restarts).
    [make_secret] = services["peer-secret"]["command"]
    assert make_secret.startswith("test -s /secrets/peer-secret ||")
    # Prometheus finds the replicas by name while they run.
    prometheus = yaml.safe_load((DEPLOY / "prometheus" / "prometheus.yml").read_text())
    [dns] = prometheus["scrape_configs"][0]["dns_sd_configs"]
    assert sorted(dns["names"]) == replicas


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


@pytest.mark.usefixtures("no_mirror_env")
def test_example_config_tls_block_loads_uncommented(tmp_path: Path) -> None:
    """The commented TLS and admin_listen lines in deploy/mirror.yaml are valid as written."""
    lines = (DEPLOY / "mirror.yaml").read_text().splitlines()
    keys = ("tls_", "admin_listen")
    lines = [line.removeprefix("# ") if line.startswith(tuple(f"# {k}" for k in keys)) else line
             for line in lines]  # fmt: skip
    config = tmp_path / "mirror.yaml"
    config.write_text("\n".join(lines) + "\n")
    settings = load_settings(config)
    assert settings.tls_cert_file == Path("/etc/mirror/tls/tls.crt")
    assert settings.tls_client_ca is not None and settings.tls_client_auth == "require"
    assert (settings.tls_reload_interval, settings.admin_listen) == (10, "127.0.0.1:9090")


@pytest.mark.usefixtures("no_mirror_env")
def test_readme_worked_example_of_tags_that_never_wait_loads(tmp_path: Path) -> None:
    """The README's worked example means what its table says: `latest` trusted a minute,
    then answered at once for an hour; other tags an hour; 10% of the limit kept."""
    text = (DEPLOY.parent / "README.md").read_text()
    start = text.index("\n## Tags that never wait, and the rate limit\n")
    section = text[start : text.index("\n## ", start + 1)]
    [block] = re.findall(r"^```yaml\n(.*?)^```$", section, re.M | re.S)
    config = tmp_path / "mirror.yaml"
    config.write_text(block)
    settings = load_settings(config)
    freshness = settings.freshness()
    assert freshness.of("library/alpine", "latest") == TagFreshness(60, 3600)
    assert freshness.of("library/alpine", "3.20") == TagFreshness(3600, 0)
    assert Reserve.parse(settings.ratelimit_reserve).of(100) == 10
    assert settings.refresh_ahead_pulls == 20


@pytest.mark.usefixtures("no_mirror_env")
def test_example_config_tag_windows_and_budget() -> None:
    settings = load_settings(DEPLOY / "mirror.yaml")
    hub = settings.resolved_upstreams()[0].freshness(settings.freshness())
    assert hub.of("library/alpine", "latest") == TagFreshness(60, 3600)
    assert settings.ratelimit_reserve == "10%"
