"""Every Prometheus metric of the mirror, in one place.

Names carry the `mirror_` prefix and unit suffixes; labels are route templates and
small closed sets, never raw paths or repository names (unbounded cardinality).
Each app gets its own CollectorRegistry so tests and embedded apps never collide.

With `workers` > 1 (mirror.supervisor), every worker writes its values to files in a
shared directory (prometheus_client's multiprocess mode, chosen by the environment
before prometheus_client is first imported) and /metrics, answered by any worker,
renders the whole group from those files: counters and histograms summed, each gauge
by its `multiprocess_mode`. What is not a per-process value (the build, the cache's
size read from the store at scrape time) is rendered once, by the worker answering.
"""

from __future__ import annotations

import math
import os
import platform
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, get_args

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    Info,
    disable_created_metrics,
    generate_latest,
    values,
)
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.registry import Collector

from mirror import __version__

ROUTES = (
    "/v2/",
    "/v2/{name}/manifests/{reference}",
    "/v2/{name}/blobs/{digest}",
    "/v2/{name}/tags/list",
    "/v2/{name}/referrers/{digest}",
    "/v2/_catalog",
    "/metrics",
    "/healthz",
    "/readyz",
    "/_mirror/peer/blobs/{digest}",
    "other",
)
# The closed label sets, as types: a typo is a type error, not a new time series.
Kind = Literal["manifest", "blob"]
# How a request was answered; also the X-Cache header, upper-cased.
# updating: a tag past its TTL served at once while a revalidation runs in the
# background (stale-while-revalidate; nginx's $upstream_cache_status says the same).
CacheResult = Literal["hit", "miss", "revalidated", "stale", "updating"]
# An upstream's rate-limit budget (mirror.budget), as the gauge's value indexes it.
BudgetMode = Literal["normal", "reserve", "exhausted"]
BUDGET_MODES: tuple[BudgetMode, ...] = get_args(BudgetMode)
# How a background revalidation ended: the tag unchanged, moved (new body fetched),
# failed (upstream trouble or error: the entry stays), deferred (the rate-limit
# budget kept the GET a moved tag needs).
BackgroundResult = Literal["unchanged", "moved", "failed", "deferred"]
Source = Literal["cache", "upstream"]  # where served bytes came from
UpstreamKind = Literal["manifest", "blob", "tags", "token", "ping"]
EvictionReason = Literal["ttl", "size"]
RefusalReason = Literal["limit", "header_timeout", "headers_too_large", "tls_on_plain_port"]
# The shared store (store: s3): where a blob hit was found, and what S3 was asked.
Tier = Literal["l1", "shared"]
S3Operation = Literal["get", "head", "put", "upload", "delete", "sign", "list"]
LeaseEvent = Literal["acquired", "followed", "taken_over", "lost"]
# A digest asked for through an (upstream, repository) pair not known to hold it.
ScopeResult = Literal["confirmed", "refused", "error"]
# Client authentication outcomes initialised at zero (mirror.clientauth).
AUTH_SERIES = (
    ("basic", "ok"),
    ("basic", "invalid"),
    ("bearer", "ok"),
    ("bearer", "invalid"),
    ("realm", "ok"),
    ("realm", "invalid"),
    ("anonymous", "denied"),
    ("user", "denied"),
)
# What became of an event for a webhook endpoint (mirror.events).
EventResult = Literal["delivered", "dropped"]
# A per-client limit that refused a request (mirror.fairness).
Throttle = Literal["cold_fetch", "manifest"]
KINDS: tuple[Kind, ...] = get_args(Kind)
CACHE_RESULTS: tuple[CacheResult, ...] = get_args(CacheResult)
SOURCES: tuple[Source, ...] = get_args(Source)
UPSTREAM_KINDS: tuple[UpstreamKind, ...] = get_args(UpstreamKind)
EVICTION_REASONS: tuple[EvictionReason, ...] = get_args(EvictionReason)
REFUSAL_REASONS: tuple[RefusalReason, ...] = get_args(RefusalReason)

# Manifests answer in milliseconds; GB blobs take seconds to minutes.
REQUEST_BUCKETS = (
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1,
    2.5,
    5,
    10,
    30,
    60,
    120,
    300,
    600,
)


# Rate-limit gauges -> their place in Totals.rate_limits' [limit, remaining].
_RATE_LIMIT_SAMPLES = {
    "mirror_upstream_ratelimit_limit": 0,
    "mirror_upstream_ratelimit_remaining": 1,
}


@dataclass
class Totals:
    hits: int = 0  # cache lookups answered from the cache (hit, stale, revalidated, updating)
    misses: int = 0
    served: dict[str, int] = field(default_factory=lambda: {"cache": 0, "upstream": 0})
    from_upstream: int = 0  # blob bytes received from upstreams
    rate_limits: dict[str, list[int | None]] = field(default_factory=dict)  # [limit, left]
    budgets: dict[str, str] = field(default_factory=dict)  # upstream -> budget mode


class Metrics:
    def __init__(self, multiprocess_dir: Path | None = None) -> None:
        # No `*_created` series: they double the series count for a timestamp that
        # `process_start_time_seconds` already gives (process-wide in the library).
        disable_created_metrics()  # type: ignore[no-untyped-call]
        # Where the metric objects live; `exposition` is what /metrics renders: the same
        # registry in one process, the group's files plus the once-only collectors in a
        # worker of several.
        self.registry = CollectorRegistry(auto_describe=True)
        self.exposition = self.registry
        if multiprocess_dir is not None:
            if values.ValueClass.__name__ != "MmapedValue":
                # Values kept in memory would make /metrics show a random worker's share.
                raise RuntimeError(
                    "PROMETHEUS_MULTIPROC_DIR must be set before prometheus_client is imported"
                )
            self.exposition = CollectorRegistry(auto_describe=True)
            MultiProcessCollector(self.exposition, str(multiprocess_dir))  # type: ignore[no-untyped-call]
        r = self.registry
        self.requests = Counter(
            "mirror_http_requests",
            "HTTP requests answered, by route template and status.",
            ["route", "method", "status"],
            registry=r,
        )
        self.request_duration = Histogram(
            "mirror_http_request_duration_seconds",
            "Time from request to the end of the response body, by route template.",
            ["route"],
            buckets=REQUEST_BUCKETS,
            registry=r,
        )
        self.cache = Counter(
            "mirror_cache_requests",
            "Cache lookups by kind and result.",
            ["kind", "result"],
            registry=r,
        )
        self.served_bytes = Counter(
            "mirror_served_bytes",
            "Body bytes sent to clients, by where they came from.",
            ["source"],
            registry=r,
        )
        self.client_auth = Counter(
            "mirror_client_auth",
            "Client authentication and authorization decisions, by method (basic, bearer "
            "for the realm's tokens, robot, certificate, anonymous, realm for tokens "
            "issued) and result (ok, invalid credentials, denied by the access rules).",
            ["method", "result"],
            registry=r,
        )
        self.upstream_requests = Counter(
            "mirror_upstream_requests",
            "Requests sent upstream, by upstream, kind and status.",
            ["upstream", "kind", "status"],
            registry=r,
        )
        self.upstream_duration = Histogram(
            "mirror_upstream_request_duration_seconds",
            "Time until upstream response headers, by upstream and kind.",
            ["upstream", "kind"],
            buckets=REQUEST_BUCKETS,
            registry=r,
        )
        self.upstream_bytes = Counter(
            "mirror_upstream_bytes",
            "Blob body bytes received from upstream, by upstream.",
            ["upstream"],
            registry=r,
        )
        self.token_fetches = Counter(
            "mirror_upstream_token_fetches",
            "Bearer tokens fetched from upstream token services, by upstream and result "
            "(ok, refused, error).",
            ["upstream", "result"],
            registry=r,
        )
        self.downloads_in_flight = Gauge(
            "mirror_downloads_in_flight",
            "Blob downloads from upstream in progress.",
            multiprocess_mode="livesum",
            registry=r,
        )
        self.digest_mismatches = Counter(
            "mirror_digest_mismatches",
            "Upstream content whose digest did not verify.",
            ["kind"],
            registry=r,
        )
        self.coalesced = Counter(
            "mirror_coalesced_requests",
            "Requests that joined an upstream fetch already in flight, by kind.",
            ["kind"],
            registry=r,
        )
        self.downloads_followed = Counter(
            "mirror_downloads_followed",
            "Blob downloads read from another process's download of the same digest "
            "(processes sharing one cache directory), instead of from the upstream.",
            registry=r,
        )
        self.eviction_rounds = Counter(
            "mirror_eviction_rounds",
            "Eviction rounds, by result: ran, or skipped (another process sharing the "
            "cache directory was running one).",
            ["result"],
            registry=r,
        )
        self.scope_checks = Counter(
            "mirror_scope_checks",
            "Cached content requested through an upstream and repository not known to "
            "hold it, by upstream and what that upstream said (confirmed: served; "
            "refused: 404; error: not served).",
            ["upstream", "result"],
            registry=r,
        )
        self.refused_connections = Counter(
            "mirror_client_connections_refused",
            "Client connections closed by the listener's guard, by reason (limit: over "
            "max_connections; header_timeout: no request head in time; "
            "headers_too_large: a request head over max_header_bytes; tls_on_plain_port: "
            "a TLS handshake on the plain-HTTP listener).",
            ["reason"],
            registry=r,
        )
        # Only with TLS on (mirror.tls): no series at all on a plain-HTTP listener, so an
        # expiry alert never fires for a certificate that does not exist.
        self.tls_reloads = Counter(
            "mirror_tls_reloads",
            "Reloads of the listener's TLS files after they changed, by result (error: "
            "unusable, the previous certificate is still served).",
            ["result"],
            registry=r,
        )
        self.tls_certificate_expiry = Gauge(
            "mirror_tls_certificate_expiry_seconds",
            "notAfter of the certificate the listener serves, as Unix time.",
            ["listener"],
            multiprocess_mode="livemin",
            registry=r,
        )
        self.client_throttled = Counter(
            "mirror_client_throttled",
            "Requests refused (429) by a per-client limit, by kind (cold_fetch: too many "
            "blob downloads from upstream at once; manifest: too many upstream manifest "
            "requests per minute; a tag then served stale counts too).",
            ["kind"],
            registry=r,
        )
        self.resumes = Counter(
            "mirror_upstream_resumes",
            "Blob downloads resumed with Range after a failure.",
            registry=r,
        )
        self.cache_write_failures = Counter(
            "mirror_cache_write_failures",
            "Content served but not cached because the cache refused the write "
            "(ENOSPC, read-only file system), by kind.",
            ["kind"],
            registry=r,
        )
        self.evictions = Counter(
            "mirror_evictions",
            "Cache entries evicted, by kind and reason (ttl, size).",
            ["kind", "reason"],
            registry=r,
        )
        self.evicted_bytes = Counter(
            "mirror_evicted_bytes",
            "Blob bytes evicted, by reason.",
            ["reason"],
            registry=r,
        )
        self.ratelimit_limit = Gauge(
            "mirror_upstream_ratelimit_limit",
            "Pull rate limit the upstream announced (Docker Hub ratelimit-limit).",
            ["upstream"],
            multiprocess_mode="livemostrecent",
            registry=r,
        )
        self.ratelimit_remaining = Gauge(
            "mirror_upstream_ratelimit_remaining",
            "Pulls left in the upstream's window (Docker Hub ratelimit-remaining).",
            ["upstream"],
            multiprocess_mode="livemostrecent",
            registry=r,
        )
        self.ratelimit_window = Gauge(
            "mirror_upstream_ratelimit_window_seconds",
            "Length of the upstream's rate-limit window.",
            ["upstream"],
            multiprocess_mode="livemostrecent",
            registry=r,
        )
        self.budget_mode = Gauge(
            "mirror_upstream_budget_mode",
            "Rate-limit budget mode: 0 normal, 1 reserve (revalidations spend no pulls), "
            "2 exhausted (misses answered 429 without asking).",
            ["upstream"],
            multiprocess_mode="livemax",
            registry=r,
        )
        self.budget_changes = Counter(
            "mirror_upstream_budget_changes",
            "Times the rate-limit budget entered each mode.",
            ["upstream", "mode"],
            registry=r,
        )
        self.budget_saved = Counter(
            "mirror_upstream_budget_saved",
            "Manifest GETs the budget kept from the upstream (deferred: a moved tag "
            "served stale; refused: a miss answered 429).",
            ["upstream", "action"],
            registry=r,
        )
        self.background_revalidations = Counter(
            "mirror_background_revalidations",
            "Tag revalidations run in the background (stale-while-revalidate, refresh "
            "ahead), by result.",
            ["upstream", "result"],
            registry=r,
        )
        self.tier_hits = Counter(
            "mirror_shared_cache_hits",
            "Blob hits with the shared store, by tier (l1: local disk; shared: the bucket).",
            ["tier"],
            registry=r,
        )
        self.s3_requests = Counter(
            "mirror_s3_requests",
            "Requests to the S3 store, by operation and result (ok, missing, error).",
            ["operation", "result"],
            registry=r,
        )
        self.s3_duration = Histogram(
            "mirror_s3_request_duration_seconds",
            "Time of S3 requests (until the first byte for get), by operation.",
            ["operation"],
            buckets=REQUEST_BUCKETS,
            registry=r,
        )
        self.redis_errors = Counter(
            "mirror_redis_errors",
            "Redis commands that failed (the replica then works alone until it is back).",
            registry=r,
        )
        self.shared_degraded = Gauge(
            "mirror_shared_degraded",
            "1 while a shared dependency is unreachable, by dependency (redis, s3).",
            ["dependency"],
            multiprocess_mode="livemax",
            registry=r,
        )
        self.leases = Counter(
            "mirror_download_leases",
            "Cluster download leases: acquired (this replica leads), followed (another "
            "leads), taken_over (from a leader that went away), lost (renewal failed).",
            ["event"],
            registry=r,
        )
        self.leases_held = Gauge(
            "mirror_download_leases_held",
            "Cluster download leases this replica holds now.",
            multiprocess_mode="livesum",
            registry=r,
        )
        self.peer_bytes = Counter(
            "mirror_peer_bytes",
            "Blob bytes streamed between replicas, by direction (sent, received).",
            ["direction"],
            registry=r,
        )
        self.tier_requests = Counter(
            "mirror_tier_requests",
            "Requests to an upstream's mirror tiers and its registry, by upstream, tier "
            "and result (ok; error: failed, the next tier was tried; skipped: the tier's "
            "circuit was open).",
            ["upstream", "tier", "result"],
            registry=r,
        )
        self.tier_bytes = Counter(
            "mirror_tier_bytes",
            "Blob bytes received from each tier, by upstream and tier.",
            ["upstream", "tier"],
            registry=r,
        )
        self.tier_state = Gauge(
            "mirror_tier_state",
            "A tier's circuit: 0 closed (used), 1 open (skipped), 2 half-open (one trial).",
            ["upstream", "tier"],
            multiprocess_mode="livemax",
            registry=r,
        )
        # Webhook events (mirror.events), per endpoint: each process sends its own.
        self.events = Counter(
            "mirror_events",
            "Events for webhook endpoints, by endpoint and result (delivered; dropped: "
            "the endpoint's queue was full, or the process stopped before delivering).",
            ["endpoint", "result"],
            registry=r,
        )
        self.event_posts = Counter(
            "mirror_event_posts",
            "POSTs of event batches to webhook endpoints, by endpoint and result (ok: "
            "2xx or 3xx; error: another status, a timeout, unreachable).",
            ["endpoint", "result"],
            registry=r,
        )
        self.events_queued = Gauge(
            "mirror_events_queued",
            "Events waiting for a webhook endpoint (in its bounded queue).",
            ["endpoint"],
            multiprocess_mode="livesum",
            registry=r,
        )
        self.event_post_duration = Histogram(
            "mirror_event_post_duration_seconds",
            "Time of POSTs of event batches to webhook endpoints, by endpoint.",
            ["endpoint"],
            buckets=REQUEST_BUCKETS,
            registry=r,
        )
        # An Info has no multiprocess form: it is the same in every worker, so it is
        # rendered once, by the worker answering the scrape.
        self.build_info = Info(
            "mirror_build", "Version of mirror and Python.", registry=self.exposition
        )
        self.build_info.info({"version": __version__, "python": platform.python_version()})
        # Initialise label values so dashboards see zeros instead of gaps.
        for route in ROUTES:
            self.request_duration.labels(route)
        for kind in KINDS:
            self.digest_mismatches.labels(kind)
            self.coalesced.labels(kind)
            self.cache_write_failures.labels(kind)
            for result in CACHE_RESULTS:
                self.cache.labels(kind, result)
        for throttle in get_args(Throttle):
            self.client_throttled.labels(throttle)
        # The outcomes a panel or an alert reads: 0, not "no data", while all is well
        # (and on a mirror without authentication).
        for method, outcome in AUTH_SERIES:
            self.client_auth.labels(method, outcome)
        for refusal in REFUSAL_REASONS:
            self.refused_connections.labels(refusal)
        for ran in ("ran", "skipped"):
            self.eviction_rounds.labels(ran)
        for reason in EVICTION_REASONS:
            self.evicted_bytes.labels(reason)
            for kind in KINDS:
                self.evictions.labels(kind, reason)
        for source in SOURCES:
            self.served_bytes.labels(source)

    def add_tier(self, upstream: str, tier: str) -> None:
        for result in ("ok", "error", "skipped"):
            self.tier_requests.labels(upstream, tier, result)
        self.tier_bytes.labels(upstream, tier)
        self.tier_state.labels(upstream, tier).set(0)

    def add_event_endpoint(self, endpoint: str) -> None:
        """Initialise a webhook endpoint's series, so a drop alert reads 0, not no data."""
        for result in get_args(EventResult):
            self.events.labels(endpoint, result)
        for posted in ("ok", "error"):
            self.event_posts.labels(endpoint, posted)
        self.events_queued.labels(endpoint).set(0)
        self.event_post_duration.labels(endpoint)

    def add_shared_store(self) -> None:
        """Initialise the shared store's series (only a mirror with store s3 has them)."""
        for tier in get_args(Tier):
            self.tier_hits.labels(tier)
        for op in get_args(S3Operation):
            self.s3_duration.labels(op)
            self.s3_requests.labels(op, "error")
        for event in get_args(LeaseEvent):
            self.leases.labels(event)
        for direction in ("sent", "received"):
            self.peer_bytes.labels(direction)
        for dependency in ("redis", "s3"):
            self.shared_degraded.labels(dependency).set(0)

    def add_upstream(self, upstream: str) -> None:
        """Initialise an upstream's label values, so its panels start at zero."""
        for kind in UPSTREAM_KINDS:
            self.upstream_duration.labels(upstream, kind)
            # Transport failures have a fixed status value: the error panels and alerts
            # then read 0, not "no data", while all is well.
            self.upstream_requests.labels(upstream, kind, "error")
        self.upstream_bytes.labels(upstream)
        for result in ("ok", "refused", "error"):
            self.token_fetches.labels(upstream, result)
        for scope_result in get_args(ScopeResult):
            self.scope_checks.labels(upstream, scope_result)
        # Unknown until the upstream sends ratelimit-* headers (Docker Hub does): NaN,
        # never 0, which would read as "exhausted".
        for gauge in (self.ratelimit_limit, self.ratelimit_remaining):
            gauge.labels(upstream).set(float("nan"))

    def add_registry(self, upstream: str) -> None:
        """What only an upstream's registry has (not its mirror tiers): the pull budget,
        and the proxy's background revalidations."""
        self.budget_mode.labels(upstream).set(0)
        for mode in BUDGET_MODES:
            self.budget_changes.labels(upstream, mode)
        for action in ("deferred", "refused"):
            self.budget_saved.labels(upstream, action)
        for background in get_args(BackgroundResult):
            self.background_revalidations.labels(upstream, background)

    def watch_cache(
        self, usage: Callable[[], CacheUsage], limit: int | None, root: Path
    ) -> Collector:
        """Export the cache's size and its file system's space, read at scrape time."""
        collector = _CacheCollector(usage, limit, root)
        # Once per scrape, not once per worker: every worker reads the same store.
        self.exposition.register(collector)
        return collector

    def unwatch(self, collector: Collector) -> None:
        self.exposition.unregister(collector)

    def upstream_request(
        self, upstream: str, kind: UpstreamKind, status: str, seconds: float
    ) -> None:
        self.upstream_requests.labels(upstream, kind, status).inc()
        self.upstream_duration.labels(upstream, kind).observe(seconds)

    def rate_limit(
        self, upstream: str, limit: int | None, remaining: int | None, window: int | None
    ) -> None:
        """Export what Docker Hub's `ratelimit-*` headers said (mirror.budget reads them);
        None: not said this time."""
        for value, gauge in (
            (limit, self.ratelimit_limit),
            (remaining, self.ratelimit_remaining),
            (window, self.ratelimit_window),
        ):
            if value is not None:
                gauge.labels(upstream).set(value)

    def totals(self) -> Totals:
        """Whole-group figures for the status page, read from what /metrics would
        render: in a worker of several, the group's, not this process's."""
        out = Totals()
        for family in self.exposition.collect():
            for sample in family.samples:
                name, labels, value = sample.name, sample.labels, sample.value
                if name == "mirror_cache_requests_total":
                    if labels.get("result") in ("hit", "stale", "revalidated", "updating"):
                        out.hits += int(value)
                    elif labels.get("result") == "miss":
                        out.misses += int(value)
                elif name == "mirror_served_bytes_total":
                    out.served[labels.get("source", "cache")] += int(value)
                elif name == "mirror_upstream_bytes_total":
                    out.from_upstream += int(value)
                elif name == "mirror_upstream_budget_mode" and 0 <= value < len(BUDGET_MODES):
                    out.budgets[labels["upstream"]] = BUDGET_MODES[int(value)]
                elif name in _RATE_LIMIT_SAMPLES and not math.isnan(value):  # NaN: not told
                    seen = out.rate_limits.setdefault(labels["upstream"], [None, None])
                    seen[_RATE_LIMIT_SAMPLES[name]] = int(value)
        return out

    def render(self) -> bytes:
        return generate_latest(self.exposition)


@dataclass(frozen=True, slots=True)
class CacheUsage:
    blobs: int
    blob_bytes: int
    manifests: int
    tags: int


class _CacheCollector(Collector):
    def __init__(self, usage: Callable[[], CacheUsage], limit: int | None, root: Path) -> None:
        self._usage = usage
        self._limit = limit
        self._root = root

    def collect(self) -> Iterator[GaugeMetricFamily]:
        usage = self._usage()
        yield GaugeMetricFamily(
            "mirror_cache_size_bytes", "Bytes of cached blobs.", value=usage.blob_bytes
        )
        entries = GaugeMetricFamily(
            "mirror_cache_entries", "Cached entries, by kind.", labels=["kind"]
        )
        entries.add_metric(["blob"], usage.blobs)
        entries.add_metric(["manifest"], usage.manifests)
        entries.add_metric(["tag"], usage.tags)
        yield entries
        yield GaugeMetricFamily(
            "mirror_cache_limit_bytes",
            "The configured max_size (NaN: no cap).",
            value=float("nan") if self._limit is None else self._limit,
        )
        # The disk itself: the cap is the mirror's own; this is what can really fill.
        try:
            st = os.statvfs(self._root)
        except OSError:
            return
        yield GaugeMetricFamily(
            "mirror_cache_filesystem_size_bytes",
            "Size of the file system holding the cache.",
            value=st.f_blocks * st.f_frsize,
        )
        yield GaugeMetricFamily(
            "mirror_cache_filesystem_avail_bytes",
            "Bytes available to the mirror on the cache's file system.",
            value=st.f_bavail * st.f_frsize,
        )
