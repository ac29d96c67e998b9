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
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pydantic
import yaml
from pydantic_settings import SettingsConfigDict

from mirror.config import ENV_PREFIX, Settings, UpstreamSettings


class SettingsError(Exception):
    """Settings that cannot be used; the message is for the user, one problem a line."""


def load_settings(config_file: Path | None = None, **overrides: Any) -> Settings:
    """Settings from the file, the environment and explicit overrides (in rising order)."""
    given = {k: v for k, v in overrides.items() if v is not None}
    cls: type[Settings] = Settings
    if config_file is not None:
        if not config_file.is_file():
            raise SettingsError(f"config file not found: {config_file}")
        # The YAML path is only known at run time; a subclass carries it to the source.
        config = SettingsConfigDict(**{**Settings.model_config, "yaml_file": config_file})
        cls = type("FileSettings", (Settings,), {"model_config": config})
    try:
        return cls(**given)
    except yaml.YAMLError as exc:
        raise SettingsError(_yaml_problem(config_file, exc)) from None
    except pydantic.ValidationError as exc:
        lines = [_problem(e, config_file, given) for e in exc.errors(include_input=False)]
        raise SettingsError("\n".join(lines)) from None


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
    if error["type"] == "extra_forbidden":
        # Unknown MIRROR_* variables never get this far (see unknown_environment).
        where = " (command line)" if loc[0] in given else f" (in {config_file})"
        model = UpstreamSettings if loc[:1] == ["upstreams"] else Settings
        return f"unknown setting {name}{where}{_did_you_mean(loc[-1], set(model.model_fields))}"
    where = _source(loc[0] if loc else "", config_file, given)
    message = str(error["msg"]).removeprefix("Value error, ")
    if not name:  # a check across settings (model validator)
        return f"invalid settings{where}: {message}"
    return f"setting {name}{where}: {message}"


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
    for upstream in settings.resolved_upstreams():
        if upstream.ca_bundle is not None and not upstream.ca_bundle.is_file():
            problems.append(
                f"upstream {upstream.name}: ca_bundle {upstream.ca_bundle} is not a readable file"
            )
        try:
            upstream.secret()
        except ValueError as exc:
            problems.append(str(exc))
    problem = _cache_dir_problem(settings.cache_dir)
    if problem is not None:
        problems.append(problem)
    if problems:
        raise SettingsError("\n".join(problems))


def _cache_dir_problem(path: Path) -> str | None:
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / f".mirror-probe-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        return f"cache_dir {path} cannot be used: {exc.strerror or exc}"
    return None
