"""Which upstream a request is for: `?ns=<registry>`, a path prefix, or the default.

containerd appends `?ns=<registry host>` to every request it sends to a mirror; the
Docker daemon uses mirrors only for docker.io and sends no `ns`; clients that can send
neither may use a configured path prefix (`/v2/ghcr/<repo>/...`). An `ns` that is not
configured is refused before anything is sent anywhere: the mirror is not an open proxy.
"""

from __future__ import annotations

from dataclasses import dataclass

from mirror import dockerhub
from mirror.downloads import Downloads
from mirror.errors import RegistryError
from mirror.proxy import Proxy


@dataclass(frozen=True, slots=True)
class Route:
    proxy: Proxy
    name: str  # the repository name as that upstream's clients write it
    prefix: str  # the path prefix the client used ("ghcr/"), or ""


class Router:
    """Routes each request to the proxy of its upstream."""

    def __init__(
        self,
        proxies: dict[str, Proxy],
        default: str,
        prefixes: dict[str, str],
        aliases: dict[str, str] | None = None,
    ) -> None:
        self._proxies = proxies
        self._default = proxies[default]
        self._prefixes = {prefix: proxies[name] for prefix, name in prefixes.items()}
        # Every name a client may send as ns: the upstreams' names and their aliases.
        self._by_ns = dict(proxies) | {a: proxies[n] for a, n in (aliases or {}).items()}

    @property
    def names(self) -> list[str]:
        return list(self._proxies)

    def for_ns(self, ns: str) -> Proxy:
        """The upstream a client names with `ns`; DENIED (no request made) if none."""
        key = dockerhub.canonical(ns)
        proxy = self._by_ns.get(key)
        if proxy is None:
            raise RegistryError(
                "DENIED",
                "this mirror does not serve that registry",
                detail={"ns": ns[:255], "configured": sorted(self._proxies)},
            )
        return proxy

    def route(self, ns: str | None, name: str) -> Route:
        if ns is not None:
            return Route(self.for_ns(ns), name, "")
        first, sep, rest = name.partition("/")
        if sep and first in self._prefixes:
            return Route(self._prefixes[first], rest, first + "/")
        return Route(self._default, name, "")

    def proxy(self, upstream: str) -> Proxy | None:
        """The proxy of a configured upstream, by its name."""
        return self._proxies.get(upstream)

    def address(self, upstream: str, repo: str) -> str | None:
        """How a client sending no `ns` names `repo` of `upstream` (the inverse of
        `route`): the default's repositories plainly, another's under its path prefix;
        None where no such name reaches it (no prefix, or a name a prefix shadows)."""
        if self._default.name == upstream:
            first, sep, _ = repo.partition("/")
            return None if sep and first in self._prefixes else repo
        for prefix, proxy in self._prefixes.items():
            if proxy.name == upstream:
                return f"{prefix}/{repo}"
        return None

    def downloads(self) -> list[Downloads]:
        """Every upstream's download table."""
        return [proxy.downloads for proxy in self._proxies.values()]

    async def aclose(self) -> None:
        for proxy in self._proxies.values():
            await proxy.aclose()
