"""Settings: defaults < YAML file (`--config`) < `MIRROR_*` environment < command line.

Credentials come only from the environment or the file, never from the command line
(they would show in `ps` and shell history), and are `SecretStr` so they never print.
"""

from __future__ import annotations

import dataclasses
import os
import re
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal, Self

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    SecretStr,
    field_validator,
    model_validator,
)
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    YamlConfigSettingsSource,
)

from mirror import dockerhub
from mirror.budget import Reserve
from mirror.freshness import Freshness, TTLRule
from mirror.units import parse_duration, parse_size

MiB = 1 << 20
ENV_PREFIX = "MIRROR_"


def default_cache_dir() -> Path:
    # A system service (root) caches under /var/cache, a user under XDG's cache dir.
    if hasattr(os, "geteuid") and os.geteuid() == 0:
        return Path("/var/cache/mirror")
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "mirror"


# A number of seconds, or `300`, `5m`, `7d` in the YAML file and MIRROR_* variables.
Duration = Annotated[float, BeforeValidator(parse_duration)]


class TTLRuleSetting(BaseModel):
    model_config = ConfigDict(extra="forbid")

    pattern: str
    ttl: Duration
    # None: the upstream's (or the global) stale_while_revalidate.
    stale_while_revalidate: Duration | None = Field(default=None, ge=0)


def _rules(settings: list[TTLRuleSetting]) -> tuple[TTLRule, ...]:
    return tuple(TTLRule(r.pattern, r.ttl, r.stale_while_revalidate) for r in settings)


def _reserve(value: object) -> str:
    """`20` (pulls) or `10%` (of the upstream's limit), kept as written once valid."""
    if isinstance(value, bool) or not isinstance(value, str | int):
        raise ValueError("ratelimit_reserve is a number of pulls (20) or a share (10%)")
    return str(Reserve.parse(value))


# Pulls of an upstream's rate limit kept for misses (mirror.budget).
RateReserve = Annotated[str, BeforeValidator(_reserve)]


_REGISTRY_NAME_RE = re.compile(r"[a-z0-9]([a-z0-9.-]*[a-z0-9])?(:[0-9]{1,5})?")
_URL_RE = re.compile(r"https?://[^/\s@]+/?")


def _url(value: str) -> str:
    if not _URL_RE.fullmatch(value):
        raise ValueError(
            "an upstream URL is http(s)://host[:port], without a path or credentials "
            "(e.g. https://ghcr.io; credentials go in username/password)"
        )
    return value.rstrip("/")


class Endpoint(BaseModel):
    """What reaching a registry or a mirror tier needs: credentials and TLS trust."""

    model_config = ConfigDict(extra="forbid")

    name: str
    # Credentials: the password (a token for ghcr.io, quay.io robots, ...) inline in the
    # YAML, from a file (a mounted Secret), or from a named environment variable.
    username: str | None = None
    password: SecretStr | None = None
    password_file: Path | None = None
    password_env: str | None = None
    ca_bundle: Path | None = None  # PEM file of CAs to trust for this endpoint
    insecure_skip_verify: bool = False  # no TLS verification: test registries only

    KIND: ClassVar[str] = "upstream"  # how messages name it

    @property
    def label(self) -> str:
        return f"{self.KIND} {self.name}"

    @model_validator(mode="after")
    def _one_password_source(self) -> Self:
        sources = [self.password, self.password_file, self.password_env]
        if sum(s is not None for s in sources) > 1:
            raise ValueError(f"{self.label}: give one of password, password_file, password_env")
        if any(s is not None for s in sources) and not self.username:
            raise ValueError(f"{self.label}: a password needs a username")
        return self

    def secret(self) -> str | None:
        """The password, read now from wherever it is configured; never logged."""
        if self.password is not None:
            return self.password.get_secret_value()
        if self.password_file is not None:
            where = f"{self.label}: password_file {self.password_file}"
            try:
                secret = self.password_file.read_text(encoding="utf-8").strip()
            except OSError as exc:
                raise ValueError(
                    f"{self.label}: cannot read password_file {self.password_file}: {exc.strerror}"
                ) from None
            except UnicodeDecodeError:
                raise ValueError(f"{where} is not UTF-8 text") from None
            if not secret:
                raise ValueError(f"{where} is empty")
            return secret
        if self.password_env is not None:
            value = os.environ.get(self.password_env)
            if not value:
                raise ValueError(
                    f"{self.label}: environment variable {self.password_env} is not set"
                )
            return value
        return None


class TierSettings(Endpoint):
    """A mirror to try before the registry (another `mirror`, or any registry mirror).
    It is asked with `?ns=<registry>`, and gets only its own credentials, if any."""

    KIND: ClassVar[str] = "mirror tier"

    name: str = ""  # default: the URL's host:port
    url: str

    @field_validator("url")
    @classmethod
    def _tier_url(cls, value: str) -> str:
        return _url(value)

    @model_validator(mode="before")
    @classmethod
    def _default_name(cls, data: Any) -> Any:
        if isinstance(data, dict) and not data.get("name") and isinstance(data.get("url"), str):
            data = {**data, "name": data["url"].split("://", 1)[-1].rstrip("/")}
        return data


class UpstreamSettings(Endpoint):
    """One upstream registry, as clients name it (`docker.io`, `ghcr.io`, `host:5000`)."""

    # Other names clients use for this registry (what containerd sends as `ns`), e.g.
    # docker.io for a registry that is a pull-through cache of Docker Hub.
    aliases: list[str] = Field(default_factory=list)
    # Default: https://<name>; docker.io -> https://registry-1.docker.io.
    url: str | None = None
    # Mirror tiers tried first, in order, then the registry (docs/deploy.md, "Tiers").
    mirrors: list[TierSettings] = Field(default_factory=list)
    # fnmatch patterns on the upstream repository name (`library/alpine`, `org/*`);
    # empty `allow` means everything not denied.
    allow: list[str] = Field(default_factory=list)
    deny: list[str] = Field(default_factory=list)
    # Hosts besides the upstream's own host and registrable domain where a token realm
    # may live (e.g. a separate auth host).
    token_hosts: list[str] = Field(default_factory=list)
    # `/v2/<path_prefix>/<repo>/...` reaches this upstream, for clients that send no ns.
    path_prefix: str | None = None
    tag_ttl: Duration | None = None
    tag_ttl_rules: list[TTLRuleSetting] | None = None
    max_stale: Duration | None = None
    stale_while_revalidate: Duration | None = Field(default=None, ge=0)
    ratelimit_reserve: RateReserve | None = None

    @field_validator("name")
    @classmethod
    def _name_field(cls, value: str) -> str:
        return cls._name(value)

    @staticmethod
    def _name(value: str) -> str:
        value = dockerhub.canonical(value)
        if not _REGISTRY_NAME_RE.fullmatch(value):
            raise ValueError(f"{value!r} is not a registry host name (e.g. ghcr.io, host:5000)")
        return value

    @field_validator("aliases")
    @classmethod
    def _aliases(cls, values: list[str]) -> list[str]:
        return [cls._name(v) for v in values]

    @field_validator("allow", "deny")
    @classmethod
    def _patterns(cls, values: list[str]) -> list[str]:
        for pattern in values:
            first = pattern.split("/", 1)[0]
            if pattern != pattern.lower() or "." in first or ":" in first:
                raise ValueError(
                    f"repository pattern {pattern!r} can never match: patterns are lower "
                    "case repository names without the registry (e.g. myorg/*)"
                )
        return values

    @field_validator("url")
    @classmethod
    def _url(cls, value: str | None) -> str | None:
        return None if value is None else _url(value)

    @field_validator("path_prefix")
    @classmethod
    def _prefix(cls, value: str | None) -> str | None:
        if value is None:
            return None
        value = value.strip("/")
        if not re.fullmatch(r"[a-z0-9]+(?:[._-][a-z0-9]+)*", value):
            raise ValueError(f"path_prefix {value!r} must be one path component, e.g. ghcr")
        return value

    @property
    def base_url(self) -> str:
        if self.url is not None:
            return self.url
        return dockerhub.API_URL if self.name == dockerhub.NAME else f"https://{self.name}"

    def freshness(self, default: Freshness) -> Freshness:
        rules = default.rules
        if self.tag_ttl_rules is not None:
            rules = _rules(self.tag_ttl_rules)
        return dataclasses.replace(
            default,
            default_ttl=default.default_ttl if self.tag_ttl is None else self.tag_ttl,
            max_stale=default.max_stale if self.max_stale is None else self.max_stale,
            rules=rules,
            stale_while_revalidate=default.stale_while_revalidate
            if self.stale_while_revalidate is None
            else self.stale_while_revalidate,
        )


class StaticToken(BaseModel):
    """A bearer token for a robot (CI), kept as its SHA-256: the config never holds it.
    `mirror auth token NAME` makes one. Sent as `Authorization: Bearer <token>`, or as
    the password of a Basic login with the name as user (docker login, skopeo)."""

    model_config = ConfigDict(extra="forbid")

    name: str
    sha256: str
    groups: list[str] = Field(default_factory=list)

    @field_validator("sha256")
    @classmethod
    def _hex(cls, value: str) -> str:
        value = value.strip().lower().removeprefix("sha256:")
        if not re.fullmatch(r"[0-9a-f]{64}", value):
            raise ValueError("a static token's sha256 is 64 hex digits (mirror auth token NAME)")
        return value


class AccessRule(BaseModel):
    """Who may pull what. A rule applies to its users, its groups and (if set) anonymous
    clients; it allows pulls from its upstreams (names, `*` for all) of repositories
    matching its patterns (fnmatch on the upstream's repository name, `library/alpine`,
    `myorg/*`). Once any rule exists, whatever no rule allows is denied."""

    model_config = ConfigDict(extra="forbid")

    users: list[str] = Field(default_factory=list)  # "*": any authenticated client
    groups: list[str] = Field(default_factory=list)
    anonymous: bool = False
    upstreams: list[str] = Field(default_factory=lambda: ["*"])
    repositories: list[str] = Field(default_factory=lambda: ["*"])

    @model_validator(mode="after")
    def _someone(self) -> Self:
        if not (self.users or self.groups or self.anonymous):
            raise ValueError("an access rule names users, groups, or anonymous: true")
        return self

    @field_validator("upstreams")
    @classmethod
    def _upstream_names(cls, values: list[str]) -> list[str]:
        return [v if v == "*" else dockerhub.canonical(v) for v in values]


# What the mirror reports to webhooks (mirror.events); `ignore.actions` names these.
EVENT_ACTIONS = ("pull", "fill", "evict", "mismatch", "upstream_failure", "delete")
_HEADER_NAME_RE = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]{1,128}")
_ENDPOINT_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")


def _header_values(value: Any) -> Any:
    # Distribution writes `Authorization: [Bearer x]`; a single value is accepted too.
    return [value] if isinstance(value, str) else value


HeaderValues = Annotated[list[SecretStr], BeforeValidator(_header_values)]


class NotificationIgnore(BaseModel):
    model_config = ConfigDict(extra="forbid")

    mediatypes: list[str] = Field(default_factory=list)
    actions: list[str] = Field(default_factory=list)

    @field_validator("actions")
    @classmethod
    def _actions(cls, values: list[str]) -> list[str]:
        for action in values:
            if action not in EVENT_ACTIONS:
                raise ValueError(f"unknown action {action!r} (known: {', '.join(EVENT_ACTIONS)})")
        return values


class NotificationEndpoint(BaseModel):
    """A webhook that gets events, in Distribution's `notifications.endpoints` shape.
    Header values are secrets (an Authorization token): they never print."""

    model_config = ConfigDict(extra="forbid")

    name: str
    url: str
    headers: dict[str, HeaderValues] = Field(default_factory=dict)
    timeout: Duration = Field(default=1.0, gt=0, le=300)  # one POST, whole
    # After `threshold` failed POSTs in a row, the next waits `backoff` (Distribution's).
    threshold: int = Field(default=10, ge=1)
    backoff: Duration = Field(default=1.0, gt=0, le=3600)
    ignoredmediatypes: list[str] = Field(default_factory=list)
    ignore: NotificationIgnore = Field(default_factory=NotificationIgnore)
    disabled: bool = False
    # Events waiting for this endpoint, at most (ours; Distribution's queue has no
    # bound): a full queue drops new events, and counts them.
    queue: int = Field(default=1024, ge=1, le=1_000_000)

    @field_validator("name")
    @classmethod
    def _name(cls, value: str) -> str:
        if not _ENDPOINT_NAME_RE.fullmatch(value):
            raise ValueError(
                "an endpoint name is letters, digits, '.', '_' or '-' (it labels metrics)"
            )
        return value

    @field_validator("url")
    @classmethod
    def _url(cls, value: str) -> str:
        # Never echoed back: a webhook URL may carry a token in its path.
        if not re.fullmatch(r"https?://[^/\s@]+(/\S*)?", value):
            raise ValueError(
                "an endpoint url is http(s)://host[:port]/path, without credentials "
                "(put them in headers, e.g. Authorization)"
            )
        return value

    @field_validator("headers")
    @classmethod
    def _headers(cls, value: dict[str, list[SecretStr]]) -> dict[str, list[SecretStr]]:
        for name, values in value.items():
            if not _HEADER_NAME_RE.fullmatch(name):
                raise ValueError(f"header name {name!r} is not a valid HTTP header name")
            if any(re.search(r"[\r\n\x00]", v.get_secret_value()) for v in values):
                raise ValueError(f"header {name}: a value may not hold line breaks")
        return value

    def ignores(self, action: str, media_type: str | None) -> bool:
        if action in self.ignore.actions:
            return True
        return media_type is not None and (
            media_type in self.ignoredmediatypes or media_type in self.ignore.mediatypes
        )


class NotificationEvents(BaseModel):
    model_config = ConfigDict(extra="forbid")

    # Manifest events list the manifest's descriptors (config, layers, children).
    includereferences: bool = False


class NotificationSettings(BaseModel):
    """Distribution's `notifications` section (README, "Events (webhooks)")."""

    model_config = ConfigDict(extra="forbid")

    endpoints: list[NotificationEndpoint] = Field(default_factory=list)
    events: NotificationEvents = Field(default_factory=NotificationEvents)

    @field_validator("endpoints")
    @classmethod
    def _unique(cls, values: list[NotificationEndpoint]) -> list[NotificationEndpoint]:
        names = [e.name for e in values]
        if len(set(names)) != len(names):
            raise ValueError(f"notification endpoint names must be unique: {names}")
        return values


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, extra="forbid", yaml_file=None)

    listen: str = Field(default="0.0.0.0:5000", description="HOST:PORT to listen on")
    # -- TLS on the listener, and the admin listener (mirror/tls.py) ----------------------
    # Both files or neither; they are re-read when they change (cert-manager rotation),
    # checked every tls_reload_interval: new handshakes get the new pair.
    tls_cert_file: Path | None = None  # PEM: the certificate, then its chain
    tls_key_file: Path | None = None
    # PEM CA bundle: client certificates are verified against it (mTLS). `optional` lets
    # clients without one in (to other credentials); one presented must still verify.
    tls_client_ca: Path | None = None
    tls_client_auth: Literal["require", "optional"] = "require"
    tls_reload_interval: Duration = Field(default=10.0, ge=0.1)
    # HOST:PORT for /metrics, /healthz, /readyz, then no /metrics on `listen`. Plain HTTP
    # without authentication: give it a private address (loopback, a pod IP).
    admin_listen: str | None = None
    # The single-upstream shorthand (`--upstream URL`); `upstreams` configures several.
    upstream: str | None = Field(default=None, description="Upstream registry URL")
    upstream_username: str | None = None
    upstream_password: SecretStr | None = None
    upstreams: list[UpstreamSettings] = Field(default_factory=list)
    # The upstream for requests without `ns` (Docker's); default docker.io if configured,
    # else the first upstream.
    default_upstream: str | None = None
    cache_dir: Path = Field(default_factory=default_cache_dir)
    tag_ttl: Duration = Field(
        default=300.0, ge=0, description="Seconds a tag->digest answer is trusted"
    )
    # First match wins, against "<repository>:<tag>", e.g. {pattern: "*:latest", ttl: 1m}.
    tag_ttl_rules: list[TTLRuleSetting] = Field(default_factory=list)
    max_stale: Duration = Field(
        default=7 * 86400.0, ge=0, description="Serve a tag stale this long"
    )
    # Past a tag's TTL, this long more it is answered at once from the cache while one
    # revalidation runs in the background (X-Cache: UPDATING); 0: clients wait for it.
    stale_while_revalidate: Duration = Field(default=0.0, ge=0)
    # Tags pulled more than this many times within their TTL are revalidated in the
    # background `refresh_ahead` before they expire; 0: off.
    refresh_ahead_pulls: int = Field(default=0, ge=0)
    refresh_ahead: Duration = Field(default=10.0, gt=0)
    # While an upstream's ratelimit-remaining is below this (pulls, or a share of
    # ratelimit-limit), revalidations spend no pulls: the rest is kept for misses.
    ratelimit_reserve: RateReserve = "0"
    content_ttl: Duration = Field(
        default=7 * 86400.0, gt=0, description="Evict content unused this long"
    )
    max_size: int | None = Field(default=50 * 2**30, description="Cap on cached blob bytes")
    eviction_interval: Duration = Field(default=60.0, ge=0.1, description="Seconds between rounds")
    # Larger manifests are refused, as Distribution does.
    manifest_max_bytes: int = Field(default=4 * MiB, ge=64 * 1024)
    resume_attempts: int = Field(default=3, ge=0, le=100)
    # On SIGTERM, responses in flight get this long to finish (keep it below the
    # orchestrator's grace period: Kubernetes' default is 30 s).
    shutdown_timeout: Duration = Field(default=25.0, ge=0)
    # Processes serving the one listener on the one cache directory (README, "Workers");
    # `auto`: the CPUs this process may use (affinity and cgroup quota). 1: one process,
    # no supervisor, as a laptop or a CPU-limited DaemonSet pod wants.
    workers: int | Literal["auto"] = 1
    # The listener's guard (mirror/listener.py): open client connections, the time a
    # client has to send a request head, and that head's size.
    max_connections: int = Field(default=4096, ge=1)
    header_timeout: Duration = Field(default=10.0, gt=0)
    max_header_bytes: int = Field(default=64 * 1024, ge=1024)
    connect_timeout: float = Field(default=10.0, gt=0)
    # Between two reads of a body, not for the whole body; a blob download that
    # receives nothing this long is also cut by its own watchdog (and resumed).
    read_timeout: float = Field(default=60.0, gt=0)
    # One deadline for a whole manifest, tag list or token exchange: an upstream that
    # trickles bytes under the read timeout cannot hold clients longer than this.
    fetch_timeout: Duration = Field(default=20.0, gt=0)
    # A blob larger than its manifest descriptor says is cut at that size; one that no
    # manifest fetched through this mirror describes, at this size.
    max_blob_size: int = Field(default=64 * 2**30, description="Largest blob fetched")
    # A mirror tier that failed (unreachable, 5xx, timeout, wrong bytes) is skipped this
    # long, then tried again with one request (a circuit breaker).
    tier_backoff: Duration = Field(default=30.0, gt=0)
    # -- the shared store for replicas (docs/deploy.md, "Replicas") ----------------------
    # `disk`: the embedded default, one process. `s3`: content in an S3-compatible
    # bucket, the index and coordination in Redis; cache_dir becomes a local L1.
    store: Literal["disk", "s3"] = "disk"
    s3_bucket: str | None = None
    s3_prefix: str = ""  # key prefix inside the bucket, e.g. mirror/
    s3_endpoint: str | None = None  # None: AWS; e.g. https://rgw.example:7480
    s3_region: str = "us-east-1"
    s3_path_style: bool = False  # bucket in the path (Ceph RGW, MinIO) instead of the host
    s3_ca_bundle: Path | None = None  # PEM file of CAs to trust for the endpoint
    # Static keys; without them the standard AWS chain applies (AWS_* environment, web
    # identity / IRSA, ECS container credentials, EC2 instance profile).
    s3_access_key_id: str | None = None
    s3_secret_access_key: SecretStr | None = None
    s3_secret_access_key_file: Path | None = None
    # Blob GETs answered with a 307 to a presigned URL of the object, valid this long
    # (Distribution's `redirect`), for clients that can reach the object store.
    s3_redirect: bool = False
    s3_redirect_ttl: Duration = Field(default=600.0, ge=10, le=7 * 86400)
    # redis://[:password@]host:6379/0, or rediss:// for TLS.
    redis_url: SecretStr | None = None
    redis_password_file: Path | None = None
    redis_ca_bundle: Path | None = None
    redis_prefix: str = "mirror:"
    # How peers reach this replica (http://POD_IP:5000) and the secret they share: the
    # peer endpoint streams in-flight downloads to other replicas, nothing else.
    peer_url: str | None = None
    peer_secret: SecretStr | None = None
    peer_secret_file: Path | None = None
    # A download's lease in Redis: renewed every third of this; a dead leader's expires
    # within it, and another replica takes over.
    lease_ttl: Duration = Field(default=6.0, ge=1, le=300)
    # With store s3: what the local disk (cache_dir) keeps, least recently used first.
    # max_size caps the shared bucket. 0: nothing kept locally past the download.
    l1_max_size: int = Field(default=10 * 2**30, description="Cap on the local L1 cache")
    # -- client authentication and authorization (README, "Authentication") -------------
    # An htpasswd file of bcrypt entries (htpasswd -B), re-read when it changes.
    auth_htpasswd: Path | None = None
    # Robots' bearer tokens, by SHA-256 (YAML only).
    auth_tokens: list[StaticToken] = Field(default_factory=list)
    # group -> members (htpasswd users, token names, certificate CNs), for access rules.
    auth_groups: dict[str, list[str]] = Field(default_factory=dict)
    # Clients without credentials are served (within the access rules). Default: only
    # when no credentials are configured at all, which is the open mirror of old.
    auth_anonymous: bool | None = None
    # The token realm's signing key (32+ bytes, shared by replicas). Default: a key
    # derived from peer_secret with store s3, else random per process.
    auth_token_key_file: Path | None = None
    auth_token_ttl: Duration = Field(default=300.0, ge=10, le=86400)
    # The realm URL clients are sent to; default: this listener's /auth/token as the
    # client addressed it (set it when a proxy in front changes scheme or host).
    auth_realm: str | None = None
    auth_service: str = "mirror"
    # Authorization rules (YAML only); none: every authenticated client may pull all.
    access: list[AccessRule] = Field(default_factory=list)
    # Who may purge, pin and warm through the admin API and the status page, once
    # credentials are configured (mirror/admin.py); any logged-in user may look.
    admin_users: list[str] = Field(default_factory=list)
    admin_groups: list[str] = Field(default_factory=list)
    # Without credentials, writes on the admin listener need it reached by an IP address
    # or `localhost`, or by one of these host names: a page that rebinds its own name to
    # 127.0.0.1 (DNS rebinding) is same-origin to the browser, but names itself in Host.
    admin_hosts: list[str] = Field(default_factory=list)
    # -- per-client limits (mirror/fairness.py; README, "Fairness"); 0: no limit ------
    # Counted per user, or per address for anonymous clients. Opt-in: many clients may
    # share one address (NAT), and a central tier sees each node's mirror as a client.
    # Blob downloads from upstream a client's requests may have in progress at once
    # (docker pulls 3 layers at a time, containerd and podman 5-7).
    client_max_cold_fetches: int = Field(default=0, ge=0)
    # Upstream manifest requests (GETs, tag revalidations, tag lists) a client may
    # cause per minute; cache hits and requests joining a fetch in flight are free.
    client_manifest_requests_per_minute: int = Field(default=0, ge=0)
    # -- events to webhooks (mirror.events; README, "Events (webhooks)") ----------------
    notifications: NotificationSettings = Field(default_factory=NotificationSettings)
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    log_format: Literal["text", "json"] = "text"  # json: one object per line, for Loki & co.
    access_log: bool = True  # one line per request (method, route, status, bytes, ...)

    @field_validator("max_size", mode="before")
    @classmethod
    def _size(cls, value: Any) -> int | None:
        size = parse_size(value)
        if size is not None and size < 0:
            raise ValueError("max_size cannot be negative (none: no cap)")
        return size

    @field_validator("l1_max_size", mode="before")
    @classmethod
    def _l1_size(cls, value: Any) -> int:
        if value in (0, "0"):
            return 0  # no local copies kept past their download (parse_size: "no cap")
        size = parse_size(value)
        if size is None or size < 0:
            raise ValueError("l1_max_size needs a size, e.g. 20GiB (0: no local copies)")
        return size

    @field_validator("workers", mode="before")
    @classmethod
    def _workers(cls, value: Any) -> int | str:
        if isinstance(value, str):
            value = value.strip().lower()
            if value == "auto":
                return "auto"
            if value.isascii() and value.isdigit():
                value = int(value)
        if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 1024:
            raise ValueError(
                f"workers is a number of processes from 1 to 1024, or auto; got {value!r}"
            )
        workers: int = value
        return workers

    @field_validator("s3_endpoint", "peer_url")
    @classmethod
    def _endpoint(cls, value: str | None) -> str | None:
        return None if value is None else _url(value)

    @model_validator(mode="after")
    def _shared_store(self) -> Settings:
        if self.store != "s3":
            return self
        if self.workers != 1:
            # A worker's peer endpoint would need an address of its own: on the shared
            # listener, a peer's request reaches any worker, not the one downloading.
            raise ValueError(
                "store s3 runs one worker per replica: set workers: 1 and run more replicas"
            )
        missing = [
            name
            for name, value in (
                ("s3_bucket", self.s3_bucket),
                ("redis_url", self.redis_url),
                ("peer_url", self.peer_url),
            )
            if not value
        ]
        if self.peer_secret is None and self.peer_secret_file is None:
            missing.append("peer_secret (or peer_secret_file)")
        if missing:
            raise ValueError(f"store s3 needs {', '.join(missing)}")
        if self.s3_secret_access_key is not None and self.s3_secret_access_key_file is not None:
            raise ValueError("give one of s3_secret_access_key, s3_secret_access_key_file")
        has_secret = self.s3_secret_access_key or self.s3_secret_access_key_file
        if bool(self.s3_access_key_id) != bool(has_secret):
            raise ValueError(
                "s3_access_key_id and s3_secret_access_key(_file) go together "
                "(neither: the standard AWS credential chain)"
            )
        if self.peer_secret is not None and self.peer_secret_file is not None:
            raise ValueError("give one of peer_secret, peer_secret_file")
        if self.peer_secret is not None:
            _check_peer_secret(self.peer_secret.get_secret_value())
        return self

    @model_validator(mode="after")
    def _auth(self) -> Settings:
        configured = [u.name for u in self.upstreams] or [
            dockerhub.name_of(self.upstream or dockerhub.API_URL)
        ]
        names = set(configured) | {"*"}
        for rule in self.access:
            if unknown := [u for u in rule.upstreams if u not in names]:
                raise ValueError(
                    f"access rule names upstream {unknown[0]!r}, which is not configured "
                    f"(configured: {', '.join(sorted(names - {'*'}))})"
                )
            if unknown_groups := [g for g in rule.groups if g not in self.auth_groups]:
                raise ValueError(
                    f"access rule names group {unknown_groups[0]!r}, not in auth_groups"
                )
        if unknown_groups := [g for g in self.admin_groups if g not in self.auth_groups]:
            raise ValueError(f"admin_groups names group {unknown_groups[0]!r}, not in auth_groups")
        tokens = [t.name for t in self.auth_tokens]
        if len(set(tokens)) != len(tokens):
            raise ValueError(f"auth_tokens names must be unique: {tokens}")
        if self.auth_realm is not None and not re.fullmatch(r"https?://\S+", self.auth_realm):
            raise ValueError("auth_realm is an http(s) URL, e.g. https://mirror.example/auth/token")
        return self

    def credentials_configured(self) -> bool:
        """Whether any way for a client to prove who it is is configured."""
        return bool(self.auth_htpasswd or self.auth_tokens or self.tls_client_ca)

    def anonymous_allowed(self) -> bool:
        if self.auth_anonymous is not None:
            return self.auth_anonymous
        return not self.credentials_configured()

    def shared_secrets(self) -> SharedSecrets:
        """The s3, Redis and peer secrets, read now from wherever they are configured."""
        peer = _secret(self.peer_secret, self.peer_secret_file, "peer secret") or ""
        if self.store == "s3":
            _check_peer_secret(peer)
        return SharedSecrets(
            _secret(self.s3_secret_access_key, self.s3_secret_access_key_file, "s3 secret key"),
            _secret(None, self.redis_password_file, "redis password"),
            peer,
        )

    @field_validator("log_level", mode="before")
    @classmethod
    def _level(cls, value: Any) -> Any:
        return value.strip().lower() if isinstance(value, str) else value

    @field_validator("max_blob_size", mode="before")
    @classmethod
    def _blob_size(cls, value: Any) -> int:
        size = parse_size(value)
        if size is None:
            raise ValueError("max_blob_size needs a size, e.g. 64GiB")
        return size

    @field_validator("listen", "admin_listen")
    @classmethod
    def _listen(cls, value: str | None) -> str | None:
        if value is not None:
            host_port(value)
        return value

    @model_validator(mode="after")
    def _tls(self) -> Settings:
        if (self.tls_cert_file is None) != (self.tls_key_file is None):
            raise ValueError("tls_cert_file and tls_key_file go together (neither: plain HTTP)")
        if self.tls_client_ca is not None and self.tls_cert_file is None:
            raise ValueError("tls_client_ca needs tls_cert_file and tls_key_file")
        if self.admin_listen is not None and host_port(self.admin_listen) == host_port(self.listen):
            raise ValueError("admin_listen must differ from listen")
        return self

    @property
    def scheme(self) -> str:
        return "https" if self.tls_cert_file is not None else "http"

    @field_validator("upstream")
    @classmethod
    def _upstream(cls, value: str | None) -> str | None:
        return None if value is None else _url(value)

    @model_validator(mode="after")
    def _upstream_set(self) -> Settings:
        if self.upstreams and (self.upstream or self.upstream_username or self.upstream_password):
            raise ValueError(
                "give either `upstream` (with upstream_username/password) or `upstreams`, not both"
            )
        names = [n for u in self.upstreams for n in (u.name, *u.aliases)]
        if len(set(names)) != len(names):
            raise ValueError(f"upstream names and aliases must be unique: {names}")
        # Tier names label metrics next to upstream names: a tier may serve several
        # upstreams (one central mirror), but never share a name with a registry, nor
        # appear twice in one upstream's list.
        for u in self.upstreams:
            tiers = [t.name for t in u.mirrors]
            if len(set(tiers)) != len(tiers):
                raise ValueError(f"upstream {u.name}: mirror tier names must be unique: {tiers}")
            if clash := set(tiers) & set(names):
                raise ValueError(
                    f"upstream {u.name}: mirror tier {sorted(clash)[0]} has a registry's name"
                )
        prefixes = [u.path_prefix for u in self.upstreams if u.path_prefix]
        if len(set(prefixes)) != len(prefixes):
            raise ValueError(f"upstream path prefixes must be unique: {prefixes}")
        if self.upstream_password is not None and not self.upstream_username:
            raise ValueError("upstream_password needs upstream_username (MIRROR_UPSTREAM_USERNAME)")
        resolved = self.resolved_upstreams()  # the shorthand's credentials validate here
        if self.default_upstream is not None:
            default = dockerhub.canonical(self.default_upstream)
            if default not in {u.name for u in resolved}:
                raise ValueError(f"default_upstream {default!r} is not a configured upstream")
            self.default_upstream = default
        return self

    def resolved_upstreams(self) -> list[UpstreamSettings]:
        """The configured upstreams, or the one the shorthand settings describe."""
        if self.upstreams:
            return list(self.upstreams)
        url = self.upstream or dockerhub.API_URL
        name = dockerhub.name_of(url)
        return [
            UpstreamSettings(
                name=name,
                # The one upstream is what Docker-style set-ups mean by "the mirror's
                # upstream": it also answers containerd's ns=docker.io (e.g. a Harbor
                # or mirror.gcr.io cache of Docker Hub).
                aliases=[] if name == dockerhub.NAME else [dockerhub.NAME],
                url=url,
                username=self.upstream_username,
                password=self.upstream_password,
            )
        ]

    def default_upstream_name(self) -> str:
        if self.default_upstream is not None:
            return self.default_upstream
        names = [u.name for u in self.resolved_upstreams()]
        return dockerhub.NAME if dockerhub.NAME in names else names[0]

    def freshness(self) -> Freshness:
        return Freshness(
            self.tag_ttl,
            self.max_stale,
            _rules(self.tag_ttl_rules),
            self.stale_while_revalidate,
            self.refresh_ahead_pulls,
            self.refresh_ahead,
        )

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # Command line (init) beats environment beats the YAML file.
        return (init_settings, env_settings, YamlConfigSettingsSource(settings_cls))


@dataclasses.dataclass(frozen=True)
class SharedSecrets:
    s3_secret_access_key: str | None
    redis_password: str | None
    peer_secret: str

    def __repr__(self) -> str:
        return "SharedSecrets(...)"


def _check_peer_secret(value: str) -> None:
    # It authenticates replicas to each other: an empty one would stop the cluster's
    # single flight (every peer refuses it), a short one is guessable.
    if len(value.strip()) < 16:
        raise ValueError("peer_secret must be at least 16 characters (e.g. openssl rand -hex 16)")


def _secret(inline: SecretStr | None, file: Path | None, what: str) -> str | None:
    if inline is not None:
        return inline.get_secret_value()
    if file is None:
        return None
    try:
        value = file.read_text(encoding="utf-8").strip()
    except OSError as exc:
        raise ValueError(f"cannot read the {what} file {file}: {exc.strerror}") from None
    except UnicodeDecodeError:
        raise ValueError(f"the {what} file {file} is not UTF-8 text") from None
    if not value:
        raise ValueError(f"the {what} file {file} is empty")
    return value


def host_port(listen: str) -> tuple[str, int]:
    host, sep, port = listen.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError(f"listen must be HOST:PORT, got {listen!r}")
    return host.strip("[]") or "0.0.0.0", int(port)
