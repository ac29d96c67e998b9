"""Docker Hub's rules, in one place.

Docker Hub is a registry with three names and a hidden namespace: clients call it
`docker.io` (containerd's `ns=`), `index.docker.io` or `registry-1.docker.io` (its API
host), and its official images live under `library/` though clients write `alpine`.
The rules follow the registry's *name*, wherever it is reached from (a pull-through
cache of Hub answers to `docker.io` too), so they are keyed on names, not URLs.
"""

from __future__ import annotations

from urllib.parse import urlsplit

NAME = "docker.io"
API_URL = "https://registry-1.docker.io"  # the default upstream
ALIASES = frozenset({"docker.io", "registry-1.docker.io", "index.docker.io"})


def canonical(registry: str) -> str:
    """`registry-1.docker.io` and `index.docker.io` -> `docker.io`; others unchanged."""
    name = registry.strip().lower()
    return NAME if name in ALIASES else name


def name_of(url: str) -> str:
    """The name clients use for the registry behind `url`."""
    return canonical(urlsplit(url).netloc)


def is_hub(name: str, url: str) -> bool:
    """Does the upstream `name` at `url` follow Hub's naming (`alpine` is `library/alpine`)?"""
    return canonical(name) == NAME or (urlsplit(url).hostname or "") in ALIASES


def repository(name: str, *, hub: bool) -> str:
    """The upstream's repository for a client's name: Hub's official images are `library/`."""
    if hub and "/" not in name:
        return f"library/{name}"
    return name


def patterns(registry: str, patterns: list[str]) -> tuple[str, ...]:
    """Allow/deny patterns as the upstream names repositories, so `alpine` matches
    Hub's `library/alpine` the way clients write it."""
    if canonical(registry) != NAME:
        return tuple(patterns)
    return tuple(p if "/" in p else repository(p, hub=True) for p in patterns)
