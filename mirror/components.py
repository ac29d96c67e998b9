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
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field

from mirror import dockerhub
from mirror.access import Access
from mirror.budget import Budget, Reserve
from mirror.catalog import Catalog
from mirror.clientauth import ClientAuth, token_key
from mirror.cluster import Cluster
from mirror.config import Endpoint, Settings
from mirror.diskstore import DiskStore
from mirror.events import Events
from mirror.eviction import Evictor, SharedRounds
from mirror.fairness import Fairness
from mirror.inventory import Inventory, Protected
from mirror.jobs import Jobs
from mirror.metrics import Metrics
from mirror.objects import Objects, ObjectStoreError
from mirror.pins import Pins
from mirror.policy import RepoPolicy
from mirror.proxy import Proxy
from mirror.redisindex import IndexUnavailable, RedisIndex
from mirror.routing import Router
from mirror.sharedstore import SharedStore
from mirror.sharing import Sharing, proc_fd_usable
from mirror.store import Store
from mirror.tiers import Tier, Tiers
from mirror.upstream import Credentials, RemoteStore, Upstream, make_client

log = logging.getLogger(__name__)

# Seconds without a byte after which a tier's blob body is given up on (the next tier,
# or the registry, goes on with Range).
TIER_STALL = 10.0


def open_store(
    settings: Settings, clock: Callable[[], float] = time.time, metrics: Metrics | None = None
) -> DiskStore | SharedStore:
    """The local disk store, or (store: s3) the shared store with it as L1. Opening
    makes no network request: a dependency that is down is found at first use."""
    l1 = DiskStore(settings.cache_dir, clock)
    if settings.store == "disk":
        return l1
    try:
        secrets = settings.shared_secrets()
        metrics = metrics or Metrics()
        metrics.add_shared_store()
        assert settings.s3_bucket is not None and settings.redis_url is not None
        objects = Objects.connect(
            bucket=settings.s3_bucket,
            prefix=settings.s3_prefix,
            endpoint=settings.s3_endpoint,
            region=settings.s3_region,
            path_style=settings.s3_path_style,
            ca_bundle=settings.s3_ca_bundle,
            access_key_id=settings.s3_access_key_id,
            secret_access_key=secrets.s3_secret_access_key,
            connect_timeout=settings.connect_timeout,
            read_timeout=settings.read_timeout,
            metrics=metrics,
        )
        index = RedisIndex(
            settings.redis_url.get_secret_value(),
            metrics,
            password=secrets.redis_password,
            ca_bundle=settings.redis_ca_bundle,
            prefix=settings.redis_prefix,
        )
    except BaseException:
        l1.close()
        raise
    return SharedStore(
        l1,
        objects,
        index,
        metrics,
        l1_enabled=settings.l1_max_size > 0,
        redirect_ttl=settings.s3_redirect_ttl if settings.s3_redirect else None,
        clock=clock,
    )


def evictor(
    settings: Settings,
    store: DiskStore | SharedStore,
    metrics: Metrics | None,
    clock: Callable[[], float] = time.time,
    *,
    wait: bool = False,
    events: Events | None = None,
    protected: Callable[[], Protected] = Protected,
) -> Evictor | SharedRounds:
    """The eviction rounds; one process at a time per cache directory (the others skip
    a round, or with `wait`, as `mirror cache prune`, wait for it)."""
    freshness = settings.freshness()

    def one(target: Store, max_size: int | None, counted: Metrics | None) -> Evictor:
        return Evictor(
            target,
            counted,
            content_ttl=settings.content_ttl,
            max_size=max_size,
            # A tag is kept as long as any upstream may still serve it stale.
            max_stale=max(u.freshness(freshness).max_stale for u in settings.resolved_upstreams()),
            clock=clock,
            # A disk's rounds lock its directory; the shared content's round has its
            # lock in Redis (SharedRounds).
            lock=target.evicting if isinstance(target, DiskStore) else None,
            wait=wait,
            # What goes from the cache, not from a replica's local copy of it.
            events=events if counted is not None else None,
            protected=protected,
        )

    if isinstance(store, DiskStore):
        return one(store, settings.max_size, metrics)
    owner = f"{settings.peer_url} {uuid.uuid4().hex[:8]}"
    return SharedRounds(
        one(store, settings.max_size, metrics),
        # L1 evictions are not counted: the metrics are the shared content's.
        one(store.l1, settings.l1_max_size, None),
        store,
        lambda ttl: store.index.try_lock("evict", owner, ttl),
        (IndexUnavailable, ObjectStoreError),
        store.reconcile_bucket,
    )


@dataclass
class Components:
    """Everything a running mirror holds; `aclose()` releases it in order."""

    settings: Settings
    metrics: Metrics
    store: DiskStore | SharedStore
    router: Router
    evictor: Evictor | SharedRounds
    upstreams: list[RemoteStore]
    auth: ClientAuth
    inventory: Inventory
    registries: dict[str, Upstream]  # each upstream's registry client (its health)
    cluster: Cluster | None = None
    events: Events = field(default_factory=Events)
    catalog: Catalog = field(init=False)
    jobs: Jobs = field(init=False)
    pins: Pins = field(init=False)

    def __post_init__(self) -> None:
        self.catalog = Catalog(self.store)
        self.jobs = Jobs(self.router, self.store)
        self.pins = Pins(self.inventory, self.jobs, self.router)
        # Before each eviction round: what pins protect, as of now.
        self.evictor.prepare = self.inventory.refresh_protected

    async def aclose(self) -> None:
        self.events.stopping()  # its flush runs alongside the rest of the stop
        await self.jobs.aclose()
        await self.router.aclose()  # downloads and flights first: they use the upstreams
        for upstream in self.upstreams:
            await upstream.aclose()
        if self.cluster is not None:
            await self.cluster.aclose()
        if isinstance(self.store, SharedStore):
            await self.store.aclose()
        self.store.close()
        await self.events.aclose()  # last: stopping downloads may still report fills


def build(settings: Settings, metrics: Metrics, clock: Callable[[], float]) -> Components:
    """The store, one proxy per configured upstream (each with its own client,
    credentials and downloads; the store and eviction are shared), and the router."""
    # Before the store: a bad htpasswd or key file fails the start with nothing open.
    auth = client_auth(settings, metrics, clock)
    store = open_store(settings, clock, metrics)
    # Started by the app's lifespan (its senders are tasks of the running loop).
    events = Events(settings.notifications, metrics, listen=settings.listen)
    cluster = None
    if isinstance(store, SharedStore):
        assert settings.peer_url is not None
        cluster = Cluster(
            store.index,
            store,
            metrics,
            make_client(settings.connect_timeout, settings.read_timeout),
            peer_url=settings.peer_url,
            secret=settings.shared_secrets().peer_secret,
            lease_ttl=settings.lease_ttl,
        )
    configured = settings.resolved_upstreams()
    # Every registry's and tier's origin: a token realm on any other one than an
    # upstream's own is refused (credentials never cross between them).
    urls = [c.base_url for c in configured] + [t.url for c in configured for t in c.mirrors]
    freshness = settings.freshness()
    # One set of per-client limits for all upstreams: a client's share of the mirror.
    fairness = Fairness(
        max_cold_fetches=settings.client_max_cold_fetches,
        manifests_per_minute=settings.client_manifest_requests_per_minute,
        metrics=metrics,
    )
    # Every secret is read before any client is opened: a missing one fails the start
    # with nothing to clean up.
    secrets = [config.secret() for config in configured]
    # Replicas (store: s3) share downloads through their cluster leases instead.
    disk = store if isinstance(store, DiskStore) and proc_fd_usable() else None
    upstreams = []
    registries: dict[str, Upstream] = {}
    proxies: dict[str, Proxy] = {}
    tier_secrets = [[tier.secret() for tier in config.mirrors] for config in configured]
    for config, secret, mirror_secrets in zip(configured, secrets, tier_secrets, strict=True):
        registry = _upstream(
            settings,
            metrics,
            config,
            config.base_url,
            secret,
            name=config.name,
            token_hosts=tuple(config.token_hosts),
            others=tuple(u for u in urls if u != config.base_url),
            budget=Budget(
                config.name,
                Reserve.parse(config.ratelimit_reserve or settings.ratelimit_reserve),
                metrics,
                clock,
            ),
        )
        metrics.add_registry(config.name)
        registries[config.name] = registry
        upstream: RemoteStore = registry
        if config.mirrors:
            # Each tier gets only its own credentials (never the registry's), and asks
            # for the registry it stands in for with ?ns=.
            chain = [
                Tier(
                    tier.name,
                    _upstream(
                        settings,
                        metrics,
                        tier,
                        tier.url,
                        tier_secret,
                        name=tier.name,
                        others=tuple(u for u in urls if u != tier.url),
                        ns=config.name,
                    ),
                    registry=False,
                )
                for tier, tier_secret in zip(config.mirrors, mirror_secrets, strict=True)
            ]
            chain.append(Tier(config.name, registry, registry=True))
            upstream = Tiers(
                chain,
                metrics,
                backoff=settings.tier_backoff,
                ttl=config.freshness(freshness).ttl,
            )
        upstreams.append(upstream)
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
            source=None if cluster is None else cluster.source(upstream),
            cluster=cluster,
            revalidate_wait=settings.fetch_timeout + 1,
            stale_after=settings.fetch_timeout / 2,
            fairness=fairness,
            # Single flight across the processes sharing the cache directory.
            sharing=None if disk is None else Sharing(disk, config.name),
            events=events,
        )
    router = Router(
        proxies,
        settings.default_upstream_name(),
        {c.path_prefix: c.name for c in configured if c.path_prefix},
        {alias: c.name for c in configured for alias in c.aliases},
    )
    inventory = Inventory(store, clock)
    return Components(
        settings,
        metrics,
        store,
        router,
        evictor(
            settings, store, metrics, clock, events=events, protected=lambda: inventory.protected
        ),
        upstreams,
        auth,
        inventory,
        registries,
        cluster,
        events,
    )


def client_auth(
    settings: Settings, metrics: Metrics, clock: Callable[[], float] = time.time
) -> ClientAuth:
    peer_secret = settings.shared_secrets().peer_secret if settings.store == "s3" else None
    return ClientAuth(
        settings,
        Access(settings.access, settings.auth_groups),
        metrics,
        key=token_key(settings, peer_secret),
        clock=clock,
    )


def _upstream(
    settings: Settings,
    metrics: Metrics,
    endpoint: Endpoint,
    url: str,
    secret: str | None,
    *,
    name: str,
    token_hosts: tuple[str, ...] = (),
    others: tuple[str, ...] = (),
    ns: str | None = None,
    budget: Budget | None = None,
) -> Upstream:
    """A client of one registry or mirror tier, with its own pool and credentials."""
    metrics.add_upstream(name)
    return Upstream(
        url,
        make_client(settings.connect_timeout, settings.read_timeout, verify=_tls(endpoint)),
        metrics,
        name=name,
        credentials=Credentials(endpoint.username, secret)
        if endpoint.username and secret
        else None,
        token_hosts=token_hosts,
        other_upstreams=others,
        # A tier's broken or stalled body goes on from the next tier (TieredBlob), not
        # from the same tier again; and a tier that hangs is given up on sooner than a
        # registry (measured: a SIGSTOPped central held pulls ~80 s with the
        # registry's 60 s stall plus a same-tier resume; bench/fleet.py --cases stopped).
        resume_attempts=settings.resume_attempts if ns is None else 0,
        fetch_timeout=settings.fetch_timeout,
        stall_timeout=settings.read_timeout
        if ns is None
        else min(settings.read_timeout, TIER_STALL),
        ns=ns,
        budget=budget,
    )


def _tls(config: Endpoint) -> ssl.SSLContext | bool:
    if config.insecure_skip_verify:
        log.warning("TLS verification is off for %s", config.label)
        return False
    if config.ca_bundle is not None:
        return ssl.create_default_context(cafile=str(config.ca_bundle))
    return True
