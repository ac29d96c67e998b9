"""Settings: defaults < YAML file (`--config`) < `MIRROR_*` environment < command line.

Credentials come only from the environment or the file, never from the command line
(they would show in `ps` and shell history), and are `SecretStr` so they never print.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_validator
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    YamlConfigSettingsSource,
)

from mirror.freshness import Freshness, TTLRule

DEFAULT_UPSTREAM = "https://registry-1.docker.io"
MiB = 1 << 20

_DURATION_RE = re.compile(r"(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)?")
_UNITS = {"ms": 0.001, "s": 1, None: 1, "m": 60, "h": 3600, "d": 86400}


def default_cache_dir() -> Path:
    # A system service (root) caches under /var/cache, a user under XDG's cache dir.
    if hasattr(os, "geteuid") and os.geteuid() == 0:
        return Path("/var/cache/mirror")
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "mirror"


_SIZE_RE = re.compile(r"(\d+(?:\.\d+)?)\s*([KMGT]i?B|B)?", re.IGNORECASE)
_SIZE_UNITS = {
    "b": 1,
    "kb": 10**3,
    "mb": 10**6,
    "gb": 10**9,
    "tb": 10**12,
    "kib": 2**10,
    "mib": 2**20,
    "gib": 2**30,
    "tib": 2**40,
}


def parse_size(value: Any) -> int | None:
    """Bytes from a number or `50GiB`, `500MB`, `1.5TiB`; none/unlimited/0 -> no cap."""
    if value is None or value == 0:
        return None
    if isinstance(value, int):
        return value
    text = str(value).strip()
    if text.lower() in ("", "none", "unlimited", "0"):
        return None
    m = _SIZE_RE.fullmatch(text)
    if m is None:
        raise ValueError(f"invalid size {value!r}: use bytes or e.g. 50GiB, 500MB")
    return int(float(m[1]) * _SIZE_UNITS[(m[2] or "b").lower()])


def parse_duration(value: Any) -> float:
    """Seconds from a number or a string like `300`, `5m`, `7d`, `1.5h`."""
    if isinstance(value, int | float):
        return float(value)
    m = _DURATION_RE.fullmatch(str(value).strip())
    if m is None:
        raise ValueError(f"invalid duration {value!r}: use a number of seconds or e.g. 5m, 7d")
    return float(m[1]) * _UNITS[m[2]]


class TTLRuleSetting(BaseModel):
    model_config = ConfigDict(extra="forbid")

    pattern: str
    ttl: float

    @field_validator("ttl", mode="before")
    @classmethod
    def _duration(cls, value: Any) -> float:
        return parse_duration(value)


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="MIRROR_", extra="forbid", yaml_file=None)

    listen: str = Field(default="0.0.0.0:5000", description="HOST:PORT to listen on")
    upstream: str = Field(default=DEFAULT_UPSTREAM, description="Upstream registry URL")
    upstream_username: str | None = None
    upstream_password: SecretStr | None = None
    cache_dir: Path = Field(default_factory=default_cache_dir)
    tag_ttl: float = Field(default=300.0, description="Seconds a tag->digest answer is trusted")
    # First match wins, against "<repository>:<tag>", e.g. {pattern: "*:latest", ttl: 1m}.
    tag_ttl_rules: list[TTLRuleSetting] = Field(default_factory=list)
    max_stale: float = Field(default=7 * 86400.0, description="Serve a tag stale this long")
    content_ttl: float = Field(default=7 * 86400.0, description="Evict content unused this long")
    max_size: int | None = Field(default=50 * 2**30, description="Cap on cached blob bytes")
    eviction_interval: float = Field(default=60.0, description="Seconds between rounds")
    manifest_max_bytes: int = 4 * MiB  # larger manifests are refused, as Distribution does
    resume_attempts: int = Field(default=3, ge=0, le=100)
    connect_timeout: float = 10.0
    read_timeout: float = 60.0  # between two reads of a body, not for the whole body
    log_level: str = "info"
    access_log: bool = True

    @field_validator("max_size", mode="before")
    @classmethod
    def _size(cls, value: Any) -> int | None:
        return parse_size(value)

    @field_validator("tag_ttl", "max_stale", "content_ttl", "eviction_interval", mode="before")
    @classmethod
    def _duration(cls, value: Any) -> float:
        return parse_duration(value)

    @field_validator("listen")
    @classmethod
    def _listen(cls, value: str) -> str:
        host_port(value)
        return value

    @field_validator("upstream")
    @classmethod
    def _upstream(cls, value: str) -> str:
        if not re.fullmatch(r"https?://[^/\s]+/?", value):
            raise ValueError(
                "upstream must be an http(s) URL without a path, e.g. https://registry-1.docker.io"
            )
        return value.rstrip("/")

    def freshness(self) -> Freshness:
        rules = tuple(TTLRule(r.pattern, r.ttl) for r in self.tag_ttl_rules)
        return Freshness(self.tag_ttl, self.max_stale, rules)

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


def host_port(listen: str) -> tuple[str, int]:
    host, sep, port = listen.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError(f"listen must be HOST:PORT, got {listen!r}")
    return host.strip("[]") or "0.0.0.0", int(port)


def load_settings(config_file: Path | None = None, **overrides: Any) -> Settings:
    """Build settings from the file, the environment and explicit overrides."""
    cls: type[Settings] = Settings
    if config_file is not None:
        if not config_file.is_file():
            raise FileNotFoundError(f"config file not found: {config_file}")
        # The YAML path is only known at run time; a subclass carries it to the source.
        cls = type(
            "FileSettings",
            (Settings,),
            {
                "model_config": SettingsConfigDict(
                    **{**Settings.model_config, "yaml_file": config_file}
                ),
            },
        )
    return cls(**{k: v for k, v in overrides.items() if v is not None})
