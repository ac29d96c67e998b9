"""`mirror admin ...`: the admin API (mirror.admin) from a terminal, as tables.

A client of a running mirror over HTTP, like `mirror warm`: it works the same against
one process, a group of workers, or a replica of a cluster. Credentials come from
files or the environment, never from the command line.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import click
import httpx

from mirror import errors
from mirror.units import human_bytes
from mirror.warm import parse_image

ADMIN_URL_ENV = "MIRROR_ADMIN_URL"
PASSWORD_ENV = "MIRROR_ADMIN_PASSWORD"  # noqa: S105 (a variable's name)


class AdminError(click.ClickException):
    """One line: what the mirror answered, in its own words."""


def _connection(f: Any) -> Any:
    f = click.option(
        "--admin",
        "admin_url",
        envvar=ADMIN_URL_ENV,
        default="http://127.0.0.1:5000",
        show_default=True,
        help=f"The mirror's admin listener (or its listener without one); env {ADMIN_URL_ENV}.",
    )(f)
    f = click.option("--user", envvar="MIRROR_ADMIN_USER", help="A user of the mirror.")(f)
    return click.option(
        "--password-file",
        type=click.Path(path_type=Path, dir_okay=False, exists=True),
        help=f"The --user's password (or env {PASSWORD_ENV}).",
    )(f)


@contextmanager
def _client(admin_url: str, user: str | None, password_file: Path | None) -> Iterator[httpx.Client]:
    if not admin_url.startswith(("http://", "https://")):
        raise click.UsageError(f"--admin must be a URL such as http://{admin_url}")
    auth = None
    if user is not None:
        if password_file is not None:
            password = password_file.read_text(encoding="utf-8").rstrip("\n")
        elif (env := os.environ.get(PASSWORD_ENV)) is not None:
            password = env
        else:
            raise click.UsageError(f"--user needs --password-file or {PASSWORD_ENV}")
        auth = (user, password)
    with httpx.Client(base_url=admin_url.rstrip("/"), auth=auth, timeout=60) as c:
        yield c


def _call(c: httpx.Client, method: str, path: str, **kwargs: Any) -> Any:
    try:
        r = c.request(method, "/admin/v1" + path, **kwargs)
    except httpx.HTTPError as exc:
        raise AdminError(f"cannot reach the mirror at {c.base_url}: {exc}") from None
    if r.status_code >= 400:
        told = errors.told(r.content)
        if told is None:
            told = (
                f"{r.status_code} {r.reason_phrase}: is {c.base_url} the mirror's admin listener?"
            )
        if r.status_code == 401:
            told += " (give --user and --password-file)"
        raise AdminError(told)
    return r.json()


def table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """Columns padded to their widest cell; the last column is not padded."""
    widths = [
        max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(headers)
    ]
    lines = []
    for row in [headers, *rows]:
        cells = [cell.ljust(widths[i]) for i, cell in enumerate(row[:-1])] + [row[-1]]
        lines.append("  ".join(cells).rstrip())
    return "\n".join(lines)


def ago(when: float | None, now: float | None = None) -> str:
    if when is None:
        return "-"
    seconds = max(0, int((now or time.time()) - when))
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds // size}{unit} ago"
    return f"{seconds}s ago"


def counted(n: int, noun: str) -> str:
    """`1 tag`, `2 tags`, `0 blobs`."""
    return f"{n} {noun}" if n == 1 else f"{n} {noun}s"


def _short(digest: str) -> str:
    return digest.split(":", 1)[-1][:12]


def _default_upstream(c: httpx.Client) -> str:
    for upstream in _call(c, "GET", "/summary")["upstreams"]:
        if upstream.get("default"):
            return str(upstream["name"])
    raise AdminError("the mirror names no default upstream")


def _image(c: httpx.Client, image: str) -> dict[str, str]:
    """`[registry/]name[:tag|@digest]` -> the API's upstream, repository, reference."""
    try:
        registry, name, ref = parse_image(image)
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="IMAGE") from None
    except Exception as exc:  # RegistryError: a name that is not a repository name
        raise click.BadParameter(f"{image!r} is not an image name", param_hint="IMAGE") from exc
    return {"upstream": registry or _default_upstream(c), "repository": name, "reference": ref}


@click.group()
def admin() -> None:
    """What the mirror holds and does: images, purge, pins, warm jobs, downloads."""


@admin.command()
@click.argument("search", required=False)
@click.option("--upstream", help="Only this upstream's images.")
@click.option("--repository", help="Only this repository's images.")
@click.option("--json", "as_json", is_flag=True, help="The API's rows as JSON, for scripts.")
@_connection
def images(
    search: str | None,
    upstream: str | None,
    repository: str | None,
    as_json: bool,
    admin_url: str,
    user: str | None,
    password_file: Path | None,
) -> None:
    """Cached images (tags, and digests pulled by digest); SEARCH: a substring or glob."""
    params = {
        k: v for k, v in {"q": search, "upstream": upstream, "repository": repository}.items() if v
    }
    with _client(admin_url, user, password_file) as c:
        found = _call(c, "GET", "/images", params=params)["images"]
    if as_json:  # table cells hold spaces ("3 min ago"): scripts read this instead
        click.echo(json.dumps(found, indent=2))
        return
    now = time.time()
    rows = [
        [
            i["upstream"],
            i["repository"],
            i["reference"] if i["kind"] == "tag" else "@" + _short(i["reference"]),
            _short(i["digest"]),
            ",".join(i["platforms"]) or "-",
            human_bytes(i["size"]),
            "all" if i["cached_bytes"] >= i["size"] else human_bytes(i["cached_bytes"]),
            str(i["pulls"]),
            ago(i["last_pull"], now),
            "pinned" if i["pinned"] else "",
        ]
        for i in found
    ]
    headers = [
        "UPSTREAM",
        "REPOSITORY",
        "TAG",
        "DIGEST",
        "PLATFORMS",
        "SIZE",
        "CACHED",
        "PULLS",
        "LAST PULL",
        "PIN",
    ]
    click.echo(table(headers, rows))
    click.echo(counted(len(rows), "image"))


@admin.command()
@click.argument("image", required=False)
@click.option("--upstream", help="Purge this whole upstream (with --repository: one repository).")
@click.option(
    "--repository", help="Purge this repository of --upstream (default: the default upstream)."
)
@click.option("--digest", help="Purge this digest (a manifest or a blob) wherever it is cached.")
@_connection
def purge(
    image: str | None,
    upstream: str | None,
    repository: str | None,
    digest: str | None,
    admin_url: str,
    user: str | None,
    password_file: Path | None,
) -> None:
    """Remove IMAGE ([registry/]name:tag or name@digest) from the cache, or a repository,
    an upstream or a digest. Blobs another cached image still uses stay."""
    chosen = sum(x is not None for x in (image, digest)) + (
        repository is not None or upstream is not None
    )
    if chosen != 1:
        raise click.UsageError("give one of IMAGE, --digest, or --upstream [--repository]")
    with _client(admin_url, user, password_file) as c:
        if image is not None:
            named = _image(c, image)
            body: dict[str, str] = {
                "upstream": named["upstream"],
                "repository": named["repository"],
            }
            body["digest" if ":" in named["reference"] else "tag"] = named["reference"]
        elif digest is not None:
            body = {"digest": digest}
        else:
            body = {"upstream": upstream or _default_upstream(c)}
            if repository is not None:
                body["repository"] = repository
        done = _call(c, "POST", "/purge", json=body)
    click.echo(
        f"purged {done['target']}: {counted(done['tags'], 'tag')}, "
        f"{counted(done['manifests'], 'manifest')}, {counted(done['blobs'], 'blob')} "
        f"({human_bytes(done['bytes_freed'])} freed); "
        f"{counted(done['blobs_kept'], 'blob')} kept (used by other images)"
    )


@admin.command()
@click.argument("image")
@_connection
def pin(image: str, admin_url: str, user: str | None, password_file: Path | None) -> None:
    """Keep IMAGE cached: never evicted, refreshed when its tag's TTL passes."""
    with _client(admin_url, user, password_file) as c:
        body = _image(c, image)
        done = _call(c, "PUT", "/pins", json=body)
    job = f" (caching it: job {done['job']})" if done.get("job") else ""
    click.echo(f"pinned {body['upstream']}/{body['repository']}:{body['reference']}{job}")


@admin.command()
@click.argument("image")
@_connection
def unpin(image: str, admin_url: str, user: str | None, password_file: Path | None) -> None:
    """Let IMAGE be evicted again."""
    with _client(admin_url, user, password_file) as c:
        params = _image(c, image)
        _call(c, "DELETE", "/pins", params=params)
    click.echo(f"unpinned {params['upstream']}/{params['repository']}:{params['reference']}")


@admin.command()
@_connection
def pins(admin_url: str, user: str | None, password_file: Path | None) -> None:
    """Pinned images."""
    with _client(admin_url, user, password_file) as c:
        found = _call(c, "GET", "/pins")["pins"]
    rows = [[p["upstream"], p["repository"], p["reference"], ago(p["pinned_at"])] for p in found]
    click.echo(table(["UPSTREAM", "REPOSITORY", "REFERENCE", "PINNED"], rows))


@admin.command()
@click.argument("images", nargs=-1, required=True)
@click.option("--platform", "platforms", multiple=True, help="os/arch to warm (repeatable).")
@click.option("--wait/--no-wait", default=True, show_default=True, help="Show progress until done.")
@_connection
def warm(
    images: tuple[str, ...],
    platforms: tuple[str, ...],
    wait: bool,
    admin_url: str,
    user: str | None,
    password_file: Path | None,
) -> None:
    """Start a warm job in the mirror for IMAGES (exit 1 if any image fails)."""
    body: dict[str, Any] = {"images": list(images)}
    if platforms:
        body["platforms"] = list(platforms)
    with _client(admin_url, user, password_file) as c:
        job = _call(c, "POST", "/warm", json=body)
        click.echo(f"job {job['id']} started")
        while wait and job["state"] == "running":
            time.sleep(0.5)
            job = _call(c, "GET", f"/jobs/{job['id']}")
    if wait:
        click.echo(
            f"job {job['id']} {job['state']}: {job['blobs_done']}/{job['blobs_total']} blobs, "
            f"{human_bytes(job['bytes_done'])} of {human_bytes(job['bytes_total'])}"
        )
        for image, why in (job.get("failed_images") or {}).items():
            click.echo(f"  {image}: {why}", err=True)
        if job["state"] != "done":
            raise SystemExit(1)


@admin.command()
@_connection
def jobs(admin_url: str, user: str | None, password_file: Path | None) -> None:
    """Warm and refresh jobs, newest first."""
    with _client(admin_url, user, password_file) as c:
        found = _call(c, "GET", "/jobs")["jobs"]
    rows = [
        [
            j["id"],
            j["state"],
            f"{j['blobs_done']}/{j['blobs_total']}",
            f"{human_bytes(j['bytes_done'])}/{human_bytes(j['bytes_total'])}",
            ago(j["started"]),
            ", ".join(j["images"]),
        ]
        for j in found
    ]
    click.echo(table(["JOB", "STATE", "BLOBS", "BYTES", "STARTED", "IMAGES"], rows))


@admin.command()
@_connection
def downloads(admin_url: str, user: str | None, password_file: Path | None) -> None:
    """Blob downloads from upstreams in progress, with their progress."""
    with _client(admin_url, user, password_file) as c:
        found = _call(c, "GET", "/downloads")["downloads"]
    rows = []
    for d in found:
        size = d["size"]
        share = f"{100 * d['bytes'] / size:.0f}%" if size else "-"
        rows.append(
            [
                d["upstream"],
                d["repository"],
                _short(d["digest"]),
                f"{human_bytes(d['bytes'])}/{human_bytes(size) if size else '?'}",
                share,
                f"{human_bytes(int(d['bytes_per_second']))}/s",
                str(d["readers"]),
            ]
        )
    click.echo(
        table(["UPSTREAM", "REPOSITORY", "DIGEST", "BYTES", "DONE", "RATE", "READERS"], rows)
    )
