"""Components built from settings, one way, for `mirror serve` and every CLI command.

The server and `mirror cache ...` must agree on what the cache holds and how long:
a `mirror cache prune` that computed tag lifetimes differently from the server would
delete tags the server still serves stale. So both build the store and the evictor
here, and only here.
"""

from __future__ import annotations

import logging
import ssl
import time
from collections.abc import Callable
from dataclasses import dataclass

from mirror import dockerhub
from mirror.config import Settings, UpstreamSettings
from mirror.diskstore import DiskStore
from mirror.eviction import Evictor
from mirror.metrics import Metrics
from mirror.policy import RepoPolicy
from mirror.proxy import Proxy
from mirror.routing import Router
from mirror.upstream import Credentials, Upstream, make_client

log = logging.getLogger(__name__)


def open_store(settings: Settings, clock: Callable[[], float] = time.time) -> DiskStore:
    return DiskStore(settings.cache_dir, clock)


def evictor(
    settings: Settings,
    store: DiskStore,
    metrics: Metrics | None,
    clock: Callable[[], float] = time.time,
) -> Evictor:
    freshness = settings.freshness()
    return Evictor(
        store,
        metrics,
        content_ttl=settings.content_ttl,
        max_size=settings.max_size,
        # A tag is kept as long as any upstream may still serve it stale.
        max_stale=max(u.freshness(freshness).max_stale for u in settings.resolved_upstreams()),
        clock=clock,
    )


@dataclass
class Components:
    """Everything a running mirror holds; `aclose()` releases it in order."""

    settings: Settings
    metrics: Metrics
    store: DiskStore
    router: Router
    evictor: Evictor
    upstreams: list[Upstream]

    async def aclose(self) -> None:
        await self.router.aclose()  # downloads and flights first: they use the upstreams
        for upstream in self.upstreams:
            await upstream.aclose()
        self.store.close()


def build(settings: Settings, metrics: Metrics, clock: Callable[[], float]) -> Components:
    """The store, one proxy per configured upstream (each with its own client,
    credentials and downloads; the store and eviction are shared), and the router."""
    store = open_store(settings, clock)
    configured = settings.resolved_upstreams()
    urls = [c.base_url for c in configured]
    freshness = settings.freshness()
    # Every secret is read before any client is opened: a missing one fails the start
    # with nothing to clean up.
    secrets = [config.secret() for config in configured]
    upstreams = []
    proxies: dict[str, Proxy] = {}
    for config, secret in zip(configured, secrets, strict=True):
        upstream = Upstream(
            config.base_url,
            make_client(settings.connect_timeout, settings.read_timeout, verify=_tls(config)),
            metrics,
            name=config.name,
            credentials=Credentials(config.username, secret)
            if config.username and secret
            else None,
            token_hosts=tuple(config.token_hosts),
            other_upstreams=tuple(u for u in urls if u != config.base_url),
            resume_attempts=settings.resume_attempts,
            fetch_timeout=settings.fetch_timeout,
            stall_timeout=settings.read_timeout,
        )
        upstreams.append(upstream)
        metrics.add_upstream(config.name)
        proxies[config.name] = Proxy(
            store,
            upstream,
            metrics,
            freshness=config.freshness(freshness),
            policy=RepoPolicy(
                dockerhub.patterns(config.name, config.allow),
                dockerhub.patterns(config.name, config.deny),
            ),
            manifest_max_bytes=settings.manifest_max_bytes,
            # Commits run during uvicorn's graceful wait (up to shutdown_timeout); what
            # is still committing after it gets a fifth more, so the whole stop stays
            # within an orchestrator's grace (Kubernetes: 30 s, the default 25 + 5).
            commit_grace=max(1.0, settings.shutdown_timeout / 5),
            max_blob_size=settings.max_blob_size,
            clock=clock,
        )
    router = Router(
        proxies,
        settings.default_upstream_name(),
        {c.path_prefix: c.name for c in configured if c.path_prefix},
        {alias: c.name for c in configured for alias in c.aliases},
    )
    return Components(
        settings, metrics, store, router, evictor(settings, store, metrics, clock), upstreams
    )


def _tls(config: UpstreamSettings) -> ssl.SSLContext | bool:
    if config.insecure_skip_verify:
        log.warning("TLS verification is off for upstream %s", config.name)
        return False
    if config.ca_bundle is not None:
        return ssl.create_default_context(cafile=str(config.ca_bundle))
    return True
