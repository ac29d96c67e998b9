"""Settings loaded for people: every mistake is one `SettingsError` that reads well.

pydantic's own messages name a generated class (`FileSettings`), link to its docs and
echo the input value back, which may be a password (`--upstream http://user:pw@host`).
Here each problem becomes one line naming the setting, where it came from (the file,
a `MIRROR_*` variable, the command line) and what is wrong, with a "did you mean" for
unknown keys; input values are never printed.
"""

from __future__ import annotations

import difflib
import os
import re
import ssl
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pydantic
import pydantic_settings
import yaml
from pydantic_settings import SettingsConfigDict

from mirror.clientauth import Htpasswd, token_key
from mirror.config import (
    ENV_PREFIX,
    AccessRule,
    Endpoint,
    NotificationEndpoint,
    NotificationEvents,
    NotificationIgnore,
    NotificationSettings,
    Settings,
    StaticToken,
    TTLRuleSetting,
    UpstreamSettings,
)


class SettingsError(Exception):
    """Settings that cannot be used; the message is for the user, one problem a line."""


def load_settings(config_file: Path | None = None, **overrides: Any) -> Settings:
    """Settings from the file, the environment and explicit overrides (in rising order)."""
    given = {k: v for k, v in overrides.items() if v is not None}
    cls: type[Settings] = Settings
    if config_file is not None:
        _check_file(config_file)
        # The YAML path is only known at run time; a subclass carries it to the source.
        config = SettingsConfigDict(**{**Settings.model_config, "yaml_file": config_file})
        cls = type("FileSettings", (Settings,), {"model_config": config})
    try:
        return cls(**given)
    except pydantic_settings.SettingsError as exc:
        # The one thing pydantic-settings itself rejects: JSON in a MIRROR_* variable.
        field = re.search(r'field "(\w+)"', str(exc))
        name = f"{ENV_PREFIX}{field[1]}".upper() if field else "a MIRROR_* variable"
        raise SettingsError(f"{name}: not valid JSON") from None
    except pydantic.ValidationError as exc:
        lines = [_problem(e, config_file, given) for e in exc.errors(include_input=False)]
        raise SettingsError("\n".join(lines)) from None


def _check_file(config_file: Path) -> None:
    """Read and parse the file once here, so every way it can be wrong is one line."""
    if not config_file.is_file():
        raise SettingsError(f"config file not found: {config_file}")
    try:
        document = yaml.safe_load(config_file.read_text(encoding="utf-8"))
    except UnicodeDecodeError:
        raise SettingsError(f"{config_file}: not UTF-8 text") from None
    except OSError as exc:
        raise SettingsError(f"{config_file}: cannot be read: {exc.strerror}") from None
    except yaml.YAMLError as exc:
        raise SettingsError(_yaml_problem(config_file, exc)) from None
    if document is not None and not isinstance(document, dict):
        raise SettingsError(f"{config_file}: must be a mapping of settings (key: value)")


def unknown_environment(environ: Mapping[str, str] = os.environ) -> list[str]:
    """Warnings for `MIRROR_*` variables that name no setting (a typo is otherwise
    silently ignored)."""
    known = {f"{ENV_PREFIX}{name}".upper() for name in Settings.model_fields}
    known.add(f"{ENV_PREFIX}CONFIG")
    warnings = []
    for name in sorted(environ):
        if name.startswith(ENV_PREFIX) and name not in known:
            hint = _did_you_mean(name, known)
            warnings.append(f"ignoring unknown environment variable {name}{hint}")
    return warnings


def _problem(error: Any, config_file: Path | None, given: Mapping[str, Any]) -> str:
    loc = [str(part) for part in error["loc"]]
    name = _dotted(loc)
    where = _source(loc[0] if loc else "", config_file, given)
    if error["type"] == "extra_forbidden":
        model = _model_at(loc)
        return f"unknown setting {name}{where}{_did_you_mean(loc[-1], set(model.model_fields))}"
    message = _FRIENDLY.get(error["type"]) or str(error["msg"]).removeprefix("Value error, ")
    if not name:  # a check across settings: its message names them
        return f"invalid settings: {message}"
    return f"setting {name}{where}: {message}"


# pydantic's wording for a few common mistakes names internal classes; these do not.
_FRIENDLY = {
    "model_type": "should be a mapping (key: value)",
    "dict_type": "should be a mapping (key: value)",
    "list_type": "should be a list",
    "missing": "is required",
    "bool_parsing": "should be true or false",
    "bool_type": "should be true or false",
    "string_type": "should be text",
    "int_parsing": "should be a whole number",
    "float_parsing": "should be a number",
}


def _model_at(loc: list[str]) -> type[pydantic.BaseModel]:
    """The model whose fields a location names (for "did you mean")."""
    if "tag_ttl_rules" in loc[:-1]:
        return TTLRuleSetting
    if loc[:1] == ["access"] and len(loc) > 2:
        return AccessRule
    if loc[:1] == ["auth_tokens"] and len(loc) > 2:
        return StaticToken
    if loc[:1] == ["notifications"]:
        return _notifications_model(loc[1:-1])
    return UpstreamSettings if loc[:1] == ["upstreams"] else Settings


def _notifications_model(inner: list[str]) -> type[pydantic.BaseModel]:
    """notifications -> endpoints[i] -> ignore, or notifications -> events."""
    if inner[:1] == ["events"]:
        return NotificationEvents
    if inner[:1] == ["endpoints"] and len(inner) > 1:
        return NotificationIgnore if inner[2:3] == ["ignore"] else NotificationEndpoint
    return NotificationSettings


def _source(key: str, config_file: Path | None, given: Mapping[str, Any]) -> str:
    if key in given:
        return " (command line)"
    env = f"{ENV_PREFIX}{key}".upper()
    if key and env in os.environ:
        return f" ({env})"
    if config_file is not None:
        return f" (in {config_file})"
    return ""


def _dotted(loc: list[str]) -> str:
    parts: list[str] = []
    for part in loc:
        if part.isdigit() and parts:
            parts[-1] += f"[{part}]"
        else:
            parts.append(part)
    return ".".join(parts)


def _did_you_mean(name: str, candidates: set[str]) -> str:
    close = difflib.get_close_matches(name, sorted(candidates), n=1, cutoff=0.75)
    return f" (did you mean {close[0]}?)" if close else ""


def _yaml_problem(config_file: Path | None, exc: yaml.YAMLError) -> str:
    mark = getattr(exc, "problem_mark", None)
    problem = getattr(exc, "problem", None) or "cannot be parsed"
    at = f", line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
    return f"{config_file}{at}: not valid YAML: {problem}"


def check_usable(settings: Settings) -> None:
    """What a running server needs beyond well-formed settings, checked before it
    starts: files named in the settings, secrets, and a cache directory it can write."""
    problems = []
    endpoints: list[Endpoint] = []
    for upstream in settings.resolved_upstreams():
        endpoints += [upstream, *upstream.mirrors]
    for endpoint in endpoints:
        bundle = endpoint.ca_bundle
        if bundle is not None:
            try:
                ssl.create_default_context(cafile=str(bundle))
            except (OSError, ssl.SSLError) as exc:
                why = (
                    "is not a readable file"
                    if isinstance(exc, FileNotFoundError)
                    else (
                        f"holds no usable PEM certificate ({getattr(exc, 'reason', None) or exc})"
                    )
                )
                problems.append(f"{endpoint.label}: ca_bundle {bundle} {why}")
        try:
            endpoint.secret()
        except ValueError as exc:
            problems.append(str(exc))
    if settings.auth_htpasswd is not None:
        try:
            Htpasswd(settings.auth_htpasswd)
        except ValueError as exc:
            problems.append(str(exc))
    try:
        token_key(settings, None)
    except ValueError as exc:
        problems.append(str(exc))
    problem = _cache_dir_problem(settings.cache_dir)
    if problem is not None:
        problems.append(problem)
    if problems:
        raise SettingsError("\n".join(problems))


def _cache_dir_problem(path: Path) -> str | None:
    if path.exists() and not path.is_dir():
        return f"cache_dir {path} is a file, not a directory"
    foreign = [p for p in path.iterdir() if p.name != "lost+found"] if path.is_dir() else []
    if foreign and not (path / "index").is_dir():
        # Start-up recovery empties tmp/ and removes unknown files under blobs/: never
        # in a directory that holds something else (a home directory, /). A fresh file
        # system's lost+found (a volume mounted as the cache) is no sign of that.
        return f"cache_dir {path} is not empty and not a mirror cache: give a new or empty one"
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / f".mirror-probe-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        return f"cache_dir {path} cannot be used: {exc.strerror or exc}"
    return None
