"""Command line: `mirror serve`, `mirror cache ...`, `mirror warm`, and helpers.

Every command that needs settings loads them through `_settings`, so a bad setting
reads the same everywhere (a usage error, exit 2), and builds what it needs through
`mirror.components`, as the server does.
"""

from __future__ import annotations

import errno
import socket
import sqlite3
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import click

from mirror import admincli, components
from mirror.config import Settings
from mirror.diskstore import DiskStore
from mirror.loading import SettingsError, check_usable, load_settings, unknown_environment
from mirror.objects import ObjectStoreError
from mirror.redisindex import IndexUnavailable
from mirror.sharedstore import SharedStore
from mirror.store import Stats


def _bind_problem(exc: OSError, option: str = "--listen") -> str:
    if exc.errno == errno.EADDRINUSE:
        return (
            "address already in use; is another mirror running? Choose another address "
            f"with {option} HOST:PORT"
        )
    if exc.errno == errno.EADDRNOTAVAIL:
        return "no interface of this machine has that address (0.0.0.0 means all)"
    if isinstance(exc, socket.gaierror):
        return "cannot resolve that host name"
    return str(exc.strerror or exc).lower()


class BadSettings(click.ClickException):
    """Settings that cannot be used: the problems, one a line, and exit 2."""

    exit_code = 2

    def __init__(self, message: str) -> None:
        problems = message.splitlines()
        if len(problems) > 1:
            message = "\n".join([f"{len(problems)} problems:", *(f"  {p}" for p in problems)])
        super().__init__(message)


def _settings(config_file: Path | None, **overrides: Any) -> Settings:
    for warning in unknown_environment():
        click.echo(f"warning: {warning}", err=True)
    try:
        return load_settings(config_file, **overrides)
    except SettingsError as exc:
        raise BadSettings(str(exc)) from None


@click.group()
@click.version_option(package_name="mirror")
def main() -> None:
    """A pull-through caching mirror for container registries."""


@main.command()
@click.option(
    "--config",
    "config_file",
    type=click.Path(path_type=Path, dir_okay=False),
    envvar="MIRROR_CONFIG",
    help="YAML settings file (keys as in MIRROR_* variables, lower case) [env: MIRROR_CONFIG].",
)
@click.option("--listen", help="HOST:PORT to listen on [default: 0.0.0.0:5000].")
@click.option("--upstream", help="Upstream registry URL [default: https://registry-1.docker.io].")
@click.option(
    "--cache-dir",
    type=click.Path(path_type=Path, file_okay=False),
    help="Cache directory [default: /var/cache/mirror as root, else ~/.cache/mirror].",
)
@click.option("--log-level", type=click.Choice(["debug", "info", "warning", "error"]))
@click.option(
    "--tls-cert-file",
    type=click.Path(path_type=Path, dir_okay=False),
    help="PEM certificate (and chain): serve HTTPS (with --tls-key-file).",
)
@click.option("--tls-key-file", type=click.Path(path_type=Path, dir_okay=False))
@click.option("--admin-listen", help="HOST:PORT for /metrics and probes (plain HTTP).")
@click.option(
    "--workers",
    help="Processes serving the listener: a number, or auto (the CPUs this process may "
    "use) [default: 1].",
)
def serve(
    config_file: Path | None,
    listen: str | None,
    upstream: str | None,
    cache_dir: Path | None,
    log_level: str | None,
    tls_cert_file: Path | None,
    tls_key_file: Path | None,
    admin_listen: str | None,
    workers: str | None,
) -> None:
    """Run the mirror. Credentials: MIRROR_UPSTREAM_USERNAME / MIRROR_UPSTREAM_PASSWORD."""
    from mirror.app import create_app
    from mirror.logs import configure as configure_logging
    from mirror.server import serve_app
    from mirror.tls import TLSError, server_tls
    from mirror.tuning import tune_malloc

    settings = _settings(
        config_file,
        listen=listen,
        upstream=upstream,
        cache_dir=cache_dir,
        log_level=log_level,
        tls_cert_file=tls_cert_file,
        tls_key_file=tls_key_file,
        admin_listen=admin_listen,
        workers=workers,
    )
    try:
        check_usable(settings)
        tls = server_tls(settings)
    except (SettingsError, TLSError) as exc:
        raise BadSettings(str(exc)) from None
    # Bound before anything says "ready": a port in use is the first thing to know.
    sock = _bind(settings.listen, "--listen")
    admin_sock = None
    if settings.admin_listen is not None:
        try:
            admin_sock = _bind(settings.admin_listen, "--admin-listen")
        except BadSettings:
            sock.close()
            raise
    configure_logging(settings.log_level, settings.log_format)
    count = _worker_count(settings)
    if count > 1:
        from mirror.supervisor import Supervisor

        raise SystemExit(Supervisor(settings, count, sock, admin_sock).run())
    tune_malloc()
    serve_app(create_app(settings), settings, sock, admin_sock=admin_sock, tls=tls)


def _worker_count(settings: Settings) -> int:
    if settings.workers != "auto":
        return settings.workers
    from mirror.cpus import available_cpus

    count = available_cpus()
    click.echo(f"workers: auto = {count} (CPUs this process may use)", err=True)
    return count


def _bind(listen: str, option: str) -> socket.socket:
    from mirror.server import bind

    try:
        return bind(listen)
    except OSError as exc:
        raise BadSettings(f"cannot listen on {listen}: {_bind_problem(exc, option)}") from None


@main.group()
def auth() -> None:
    """Credentials for clients of the mirror (README, "Authentication")."""


@auth.command("token")
@click.argument("name")
@click.option("--group", "groups", multiple=True, help="A group for access rules (repeatable).")
def auth_token(name: str, groups: tuple[str, ...]) -> None:
    """Make a robot's bearer token: the token for the robot, the entry for the config."""
    import hashlib
    import secrets

    import yaml

    token = secrets.token_urlsafe(32)
    entry: dict[str, Any] = {"name": name, "sha256": hashlib.sha256(token.encode()).hexdigest()}
    if groups:
        entry["groups"] = list(groups)
    click.echo(f"token for {name} (shown once; the mirror keeps only its hash):", err=True)
    click.echo(token)
    click.echo("add to the settings file:", err=True)
    click.echo(yaml.safe_dump({"auth_tokens": [entry]}, sort_keys=False).rstrip(), err=True)


@auth.command("htpasswd")
@click.argument("user")
@click.option(
    "--file",
    "path",
    type=click.Path(path_type=Path, dir_okay=False),
    help="Add or replace USER in this htpasswd file (else print the line).",
)
@click.option("--cost", type=click.IntRange(4, 16), default=10, show_default=True)
def auth_htpasswd(user: str, path: Path | None, cost: int) -> None:
    """A bcrypt htpasswd entry; the password is prompted for, or read from stdin."""
    import re

    import bcrypt

    if not re.fullmatch(r"[^:\s]{1,256}", user):
        raise click.BadParameter("a user name has no ':' and no spaces", param_hint="USER")
    if sys.stdin.isatty():
        password = click.prompt("password", hide_input=True, confirmation_prompt=True)
    else:
        password = sys.stdin.readline().rstrip("\n")
    if not password:
        raise click.ClickException("empty password")
    hashed = bcrypt.hashpw(password.encode(), bcrypt.gensalt(rounds=cost)).decode()
    line = f"{user}:{hashed}"
    if path is None:
        click.echo(line)
        return
    lines = path.read_text(encoding="utf-8").splitlines() if path.exists() else []
    kept = [entry for entry in lines if entry.partition(":")[0] != user]
    replaced = len(kept) != len(lines)
    # Written aside and renamed: the running mirror never reads a half-written file.
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text("\n".join([*kept, line]) + "\n", encoding="utf-8")
    tmp.chmod(0o600)
    tmp.replace(path)
    click.echo(f"{'updated' if replaced else 'added'} {user} in {path}")


@main.group()
def cache() -> None:
    """Inspect and check the cache directory (safe while the mirror runs)."""


@contextmanager
def _store(settings: Settings) -> Iterator[DiskStore | SharedStore]:
    """The cache, named first, so nobody wonders which directory was meant. A
    directory that is not one is refused, never turned into an empty cache."""
    where = settings.cache_dir
    click.echo(f"cache:      {where}")
    if settings.store == "s3":
        click.echo(f"shared:     s3://{settings.s3_bucket}/{settings.s3_prefix} (index in redis)")
    if not where.is_dir():
        raise BadSettings(f"no cache at {where}")
    if not (where / "index").is_dir():
        raise BadSettings(f"{where} is not a mirror cache (it has no index/)")
    try:
        store = components.open_store(settings)
    except (OSError, sqlite3.Error, ValueError) as exc:
        raise BadSettings(f"cannot open the cache at {where}: {exc}") from None
    try:
        yield store
    except (IndexUnavailable, ObjectStoreError) as exc:
        raise BadSettings(f"the shared store is unavailable: {exc}") from None
    finally:
        store.close()


_config_option = click.option(
    "--config",
    "config_file",
    type=click.Path(path_type=Path, dir_okay=False),
    envvar="MIRROR_CONFIG",
    help="YAML settings file [env: MIRROR_CONFIG].",
)
_cache_dir_option = click.option(
    "--cache-dir",
    type=click.Path(path_type=Path, file_okay=False),
    help="Cache directory.",
)


@cache.command()
@_config_option
@_cache_dir_option
def stats(config_file: Path | None, cache_dir: Path | None) -> None:
    """Entries, bytes, oldest and newest blob."""
    with _store(_settings(config_file, cache_dir=cache_dir)) as store:
        s = Stats.of(store.scan())

    def when(t: float | None) -> str:
        if t is None:
            return "-"
        return datetime.fromtimestamp(t, tz=UTC).strftime("%Y-%m-%d %H:%M:%S UTC")

    click.echo(f"blobs:      {s.blobs}")
    click.echo(f"blob bytes: {s.blob_bytes} ({s.blob_bytes / 2**30:.2f} GiB)")
    click.echo(f"manifests:  {s.manifests}")
    click.echo(f"tags:       {s.tags}")
    click.echo(f"oldest:     {when(s.oldest)}")
    click.echo(f"newest:     {when(s.newest)}")


@cache.command()
@_config_option
@_cache_dir_option
def verify(config_file: Path | None, cache_dir: Path | None) -> None:
    """Re-hash every blob; remove any that does not match its digest (exit 1 if any)."""
    with _store(_settings(config_file, cache_dir=cache_dir)) as store:
        entries = store.scan().blobs
        bad = []
        with click.progressbar(entries, label="verifying", file=sys.stderr) as bar:
            for entry in bar:
                if not store.verify_blob(entry):
                    bad.append(str(entry.digest))
    for digest in bad:
        click.echo(f"removed {digest}: content did not match its digest")
    click.echo(f"verified {len(entries)} blobs: {len(entries) - len(bad)} ok, {len(bad)} removed")
    if bad:
        raise SystemExit(1)


@cache.command()
@_config_option
@_cache_dir_option
def prune(config_file: Path | None, cache_dir: Path | None) -> None:
    """Apply content_ttl, tag lifetimes and max_size now (the server also does this
    every eviction_interval)."""
    settings = _settings(config_file, cache_dir=cache_dir)
    with _store(settings) as store:
        # What pins protect, read from the index as the server does before a round.
        import asyncio

        from mirror.inventory import Inventory

        protected = asyncio.run(Inventory(store).refresh_protected())
        r = components.evictor(
            settings, store, None, wait=True, protected=lambda: protected
        ).evict()
    click.echo(
        f"evicted {r.ttl_blobs + r.size_blobs} blobs ({r.ttl_blobs} unused for "
        f"{settings.content_ttl:.0f} s, {r.size_blobs} over max_size), "
        f"{r.ttl_manifests} manifests, {r.ttl_tags} tags; freed {r.bytes_freed} bytes; "
        f"{r.blob_bytes} bytes cached"
    )


@main.command()
@click.argument("images", nargs=-1, required=True)
@click.option(
    "--mirror",
    "mirror_url",
    default="http://127.0.0.1:5000",
    show_default=True,
    help="The running mirror to warm.",
)
@click.option(
    "--platform",
    "platforms",
    multiple=True,
    help="os/arch[/variant] to warm from multi-platform images (repeatable); "
    "default: all platforms.",
)
@click.option(
    "--token-file",
    type=click.Path(path_type=Path, dir_okay=False, exists=True),
    help="A robot token for a mirror with authentication (sent as a bearer token).",
)
@click.option("--user", help="A user of the mirror's htpasswd file (with --password-file).")
@click.option(
    "--password-file",
    type=click.Path(path_type=Path, dir_okay=False, exists=True),
    help="The --user's password.",
)
@click.option(
    "--ca-bundle",
    type=click.Path(path_type=Path, dir_okay=False, exists=True),
    help="PEM CAs to trust for an https:// mirror.",
)
@click.option(
    "--with-referrers",
    is_flag=True,
    help="Also warm what refers to each image (signatures, attestations, SBOMs: the "
    "referrers API and cosign's .sig/.att/.sbom tags), for admission checks.",
)
def warm(
    images: tuple[str, ...],
    mirror_url: str,
    platforms: tuple[str, ...],
    token_file: Path | None,
    user: str | None,
    password_file: Path | None,
    ca_bundle: Path | None,
    with_referrers: bool,
) -> None:
    """Pre-pull IMAGES ([registry/]name[:tag] or ...@digest) through the mirror's cache.

    A registry other than the default is named to the mirror with `?ns=`, as
    containerd does, e.g. `mirror warm ghcr.io/myorg/app:1.2`. Credentials come from
    files, never from the command line.
    """
    import ssl

    import httpx

    from mirror.errors import RegistryError
    from mirror.warm import WarmError, add_referrers, fetch_blobs, plan

    if not mirror_url.startswith(("http://", "https://")):
        raise click.UsageError(f"--mirror must be a URL such as http://{mirror_url}")
    if (user is None) != (password_file is None):
        raise click.UsageError("--user and --password-file go together")
    if token_file is not None and user is not None:
        raise click.UsageError("give --token-file or --user, not both")
    headers = {}
    auth: tuple[str, str] | None = None
    if token_file is not None:
        headers["Authorization"] = f"Bearer {token_file.read_text(encoding='utf-8').strip()}"
    if user is not None and password_file is not None:
        auth = (user, password_file.read_text(encoding="utf-8").rstrip("\n"))
    verify: ssl.SSLContext | bool = True
    if ca_bundle is not None:
        verify = ssl.create_default_context(cafile=str(ca_bundle))
    wanted = set(platforms) if platforms and "all" not in platforms else None
    failed = False
    with httpx.Client(
        base_url=mirror_url.rstrip("/"),
        timeout=httpx.Timeout(30, read=300),
        headers=headers,
        auth=auth,
        verify=verify,
    ) as c:
        for image in images:
            try:
                p = plan(c, image, wanted)
                if with_referrers:
                    add_referrers(c, p)
                total = sum(p.blobs.values())
                with click.progressbar(length=total, label=image, file=sys.stderr) as bar:
                    fetch_blobs(c, image, p.blobs, bar.update)
            except httpx.TransportError as exc:
                # Said once, with where it tried: the next images would fail the same way.
                raise click.ClickException(
                    f"cannot reach the mirror at {mirror_url}: {exc} (is it running? --mirror URL)"
                ) from None
            except (WarmError, RegistryError, ValueError, KeyError) as exc:
                click.echo(f"{image}: failed: {exc}", err=True)
                failed = True
                continue
            chosen = f" ({', '.join(p.platforms)})" if p.platforms else ""
            click.echo(
                f"{image}{chosen}: {len(p.manifests)} manifests, {len(p.blobs)} blobs, "
                f"{total} bytes warm"
            )
            if with_referrers:
                found = [*p.referrers, *p.cosign_tags]
                click.echo(
                    f"{image}: {len(p.referrers)} referrers, {len(p.cosign_tags)} cosign tags"
                    + (f": {', '.join(found)}" if found else "")
                )
    if failed:
        raise SystemExit(1)


@main.command("containerd-hosts")
@_config_option
@click.option("--upstream", help="As `mirror serve --upstream URL` (the one-upstream shorthand).")
@click.option("--mirror-url", help="The mirror as containerd reaches it: http://10.0.0.7:5000.")
@click.option(
    "--mirror-host",
    help="Instead of --mirror-url: the host or IP (IPv6 too, e.g. from the downward API).",
)
@click.option("--mirror-port", type=click.IntRange(1, 65535), default=5000, show_default=True)
@click.option(
    "--dir",
    "hosts_dir",
    type=click.Path(path_type=Path, file_okay=False),
    default=Path("/etc/containerd/certs.d"),
    show_default=True,
    help="containerd's config_path (hosts directory).",
)
@click.option(
    "--default/--no-default",
    "write_default",
    default=False,
    help="Also write _default/hosts.toml: every other registry tries the mirror first.",
)
def containerd_hosts(
    config_file: Path | None,
    upstream: str | None,
    mirror_url: str | None,
    mirror_host: str | None,
    mirror_port: int,
    hosts_dir: Path,
    write_default: bool,
) -> None:
    """Write containerd hosts.toml files sending pulls of every configured upstream
    to the mirror (with the upstream itself as fallback). For a node-local DaemonSet's
    init container: the same settings as the mirror, so the two never disagree."""
    from mirror.hosts import mirror_url_for, write_hosts

    if (mirror_url is None) == (mirror_host is None):
        raise click.UsageError("give --mirror-url, or --mirror-host (and --mirror-port)")
    if mirror_host is not None:
        mirror_url = mirror_url_for(mirror_host, mirror_port)
    assert mirror_url is not None
    settings = _settings(config_file, upstream=upstream)
    try:
        written = write_hosts(hosts_dir, mirror_url, settings.resolved_upstreams(), write_default)
    except ValueError as exc:
        raise click.UsageError(str(exc)) from exc
    except OSError as exc:
        raise click.ClickException(f"cannot write to {hosts_dir}: {exc.strerror or exc}") from None
    for path in written:
        click.echo(f"wrote {path}")


@main.command()
@click.option(
    "--url",
    default="http://127.0.0.1:5000",
    show_default=True,
    help="The mirror to check.",
)
@click.option("--ready", is_flag=True, help="Check /readyz instead of /healthz.")
def probe(url: str, ready: bool) -> None:
    """Exit 0 if the mirror answers /healthz (or /readyz), else 1: for exec probes
    and HEALTHCHECKs, where an HTTP probe cannot reach a loopback-only listener."""
    import httpx

    target = url.rstrip("/") + ("/readyz" if ready else "/healthz")
    try:
        status = httpx.get(target, timeout=4).status_code
    except httpx.HTTPError as exc:
        click.echo(f"{target}: {exc}", err=True)
        raise SystemExit(1) from None
    if status != 200:
        click.echo(f"{target}: {status}", err=True)
    raise SystemExit(0 if status == 200 else 1)


main.add_command(admincli.admin)
