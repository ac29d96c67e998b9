"""Command line: `mirror serve`."""

from __future__ import annotations

import logging
from pathlib import Path

import click
import pydantic

from mirror.config import host_port, load_settings


@click.group()
@click.version_option(package_name="mirror")
def main() -> None:
    """A pull-through caching mirror for container registries."""


@main.command()
@click.option(
    "--config",
    "config_file",
    type=click.Path(path_type=Path, dir_okay=False),
    help="YAML settings file (keys as in MIRROR_* variables, lower case).",
)
@click.option("--listen", help="HOST:PORT to listen on [default: 0.0.0.0:5000].")
@click.option("--upstream", help="Upstream registry URL [default: https://registry-1.docker.io].")
@click.option(
    "--cache-dir",
    type=click.Path(path_type=Path, file_okay=False),
    help="Cache directory [default: /var/cache/mirror as root, else ~/.cache/mirror].",
)
@click.option("--log-level", type=click.Choice(["debug", "info", "warning", "error"]))
def serve(
    config_file: Path | None,
    listen: str | None,
    upstream: str | None,
    cache_dir: Path | None,
    log_level: str | None,
) -> None:
    """Run the mirror. Credentials: MIRROR_UPSTREAM_USERNAME / MIRROR_UPSTREAM_PASSWORD."""
    import uvicorn

    from mirror.app import create_app
    from mirror.tuning import tune_malloc

    try:
        settings = load_settings(
            config_file, listen=listen, upstream=upstream, cache_dir=cache_dir, log_level=log_level
        )
    except (pydantic.ValidationError, FileNotFoundError) as exc:
        raise click.UsageError(str(exc)) from exc
    logging.basicConfig(
        level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    # httpx logs every request at INFO: one line per blob chunk source is noise.
    logging.getLogger("httpx").setLevel(logging.WARNING)
    tune_malloc()
    host, port = host_port(settings.listen)
    uvicorn.run(
        create_app(settings),
        host=host,
        port=port,
        log_level=settings.log_level,
        access_log=settings.access_log,
        server_header=False,
        timeout_graceful_shutdown=10,
    )
