"""containerd `hosts.toml` files that point pulls at the mirror (config_path layout).

One directory per registry name (`docker.io`, `ghcr.io`, `host:5000`), each with the
mirror as a pull/resolve host and the upstream as `server`, so containerd falls back to
the registry itself when the mirror is down. containerd adds `?ns=<registry>` to every
request it sends to a mirror, which is how the mirror picks the upstream.
"""

from __future__ import annotations

import ipaddress
import json
import os
import tempfile
from pathlib import Path
from urllib.parse import urlsplit

from mirror import dockerhub
from mirror.config import UpstreamSettings


def hosts_toml(mirror_url: str, server: str | None) -> str:
    lines = [
        "# Written by `mirror containerd-hosts`: pulls go to the mirror first.",
    ]
    if server is not None:
        lines.append(f"server = {json.dumps(server)}")  # a JSON string is a TOML string
    lines += [
        "",
        f"[host.{json.dumps(mirror_url.rstrip('/'))}]",
        '  capabilities = ["pull", "resolve"]',
        "",
    ]
    return "\n".join(lines)


def registry_url(name: str) -> str:
    return dockerhub.API_URL if dockerhub.canonical(name) == dockerhub.NAME else f"https://{name}"


def mirror_url_for(host: str, port: int) -> str:
    """`http://host:port`, with an IPv6 address in brackets (status.hostIP may be one)."""
    host = host.strip().strip("[]")
    try:
        if ipaddress.ip_address(host).version == 6:
            host = f"[{host}]"
    except ValueError:
        pass  # a name
    return f"http://{host}:{port}"


def write_hosts(
    hosts_dir: Path, mirror_url: str, upstreams: list[UpstreamSettings], write_default: bool
) -> list[Path]:
    parts = urlsplit(mirror_url)
    try:
        parts.port  # noqa: B018  (raises on an unbracketed IPv6 address)
    except ValueError:
        parts = urlsplit("")
    if parts.scheme not in ("http", "https") or not parts.hostname or parts.path not in ("", "/"):
        raise ValueError(
            f"--mirror-url must be http(s)://host:port (IPv6 in brackets), got {mirror_url!r}"
        )
    files: dict[str, str | None] = {}
    for upstream in upstreams:
        # The fallback for the upstream's own name is how the mirror reaches it (for
        # docker.io: registry-1.docker.io, as containerd's own default). An alias is
        # another registry's name that the upstream answers for (a private cache of
        # Docker Hub): containerd's fallback for it is that registry itself, never
        # the private upstream.
        files[upstream.name] = upstream.base_url
        for alias in upstream.aliases:
            files.setdefault(alias, registry_url(alias))
    if write_default:
        files["_default"] = None  # no server: the registry named in the image
    written = []
    for name, server in files.items():
        path = hosts_dir / name / "hosts.toml"
        _write_atomically(path, hosts_toml(mirror_url, server))
        written.append(path)
    return written


def _write_atomically(path: Path, text: str) -> None:
    # containerd reads these files at every pull: never let it see half of one.
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".hosts-")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
