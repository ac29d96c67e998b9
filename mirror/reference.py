"""Request paths as values: repository names, tags, digests (OCI distribution grammar).

Everything a client puts in a path is validated here before it reaches the cache or
the upstream, so no other module handles raw path text.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal

from mirror.errors import RegistryError

# distribution-spec: <name> components, separated by "/".
_COMPONENT = r"[a-z0-9]+(?:(?:\.|_|__|-+)[a-z0-9]+)*"
_NAME_RE = re.compile(rf"{_COMPONENT}(?:/{_COMPONENT})*")
_TAG_RE = re.compile(r"[a-zA-Z0-9_][a-zA-Z0-9._-]{0,127}")
_DIGEST_RE = re.compile(r"([a-z0-9]+(?:[+._-][a-z0-9]+)*):([a-zA-Z0-9=_-]+)")
# Distribution limits a name to 255 characters; longer paths are abuse, not images.
NAME_MAX = 255
# Only algorithms we can verify; the hex length is fixed per algorithm.
ALGORITHMS = {"sha256": 64, "sha512": 128}

Kind = Literal["manifests", "blobs", "tags", "referrers"]


@dataclass(frozen=True, slots=True)
class Digest:
    algorithm: str
    hex: str

    def __str__(self) -> str:
        return f"{self.algorithm}:{self.hex}"

    @classmethod
    def parse(cls, text: str) -> Digest:
        m = _DIGEST_RE.fullmatch(text)
        if m is None:
            raise RegistryError("DIGEST_INVALID", "invalid digest", detail={"digest": text[:200]})
        algorithm, encoded = m.groups()
        length = ALGORITHMS.get(algorithm)
        if length is None:
            raise RegistryError(
                "DIGEST_INVALID",
                f"unsupported digest algorithm {algorithm!r}",
                detail={"digest": text[:200]},
            )
        if len(encoded) != length or not re.fullmatch(r"[0-9a-f]+", encoded):
            raise RegistryError(
                "DIGEST_INVALID",
                f"{algorithm} digest must be {length} lowercase hex characters",
                detail={"digest": text[:200]},
            )
        return cls(algorithm, encoded)


def looks_like_digest(text: str) -> bool:
    return ":" in text


def validate_name(name: str) -> str:
    if len(name) > NAME_MAX or _NAME_RE.fullmatch(name) is None:
        raise RegistryError("NAME_INVALID", "invalid repository name", detail={"name": name[:300]})
    return name


def validate_tag(tag: str) -> str:
    if _TAG_RE.fullmatch(tag) is None:
        raise RegistryError("TAG_INVALID", "invalid tag", detail={"tag": tag[:200]})
    return tag


@dataclass(frozen=True, slots=True)
class Reference:
    """A manifest reference: exactly one of tag or digest."""

    tag: str | None = None
    digest: Digest | None = None

    @classmethod
    def parse(cls, text: str) -> Reference:
        """A tag or a digest. Text that is neither names no manifest: 404, as
        Distribution answers (no route matches) and the OCI conformance suite expects;
        a malformed digest stays 400 DIGEST_INVALID."""
        if looks_like_digest(text):
            return cls(digest=Digest.parse(text))
        if _TAG_RE.fullmatch(text) is None:
            raise RegistryError(
                "MANIFEST_UNKNOWN", "no such manifest reference", detail={"reference": text[:200]}
            )
        return cls(tag=text)

    def __str__(self) -> str:
        return str(self.digest) if self.digest is not None else str(self.tag)


@dataclass(frozen=True, slots=True)
class RegistryPath:
    """A parsed `/v2/<name>/(manifests|blobs|referrers)/<ref>` or `/v2/<name>/tags/list` path."""

    name: str
    kind: Kind
    reference: str  # validated per kind: Reference text, digest text, or "list"

    @property
    def route(self) -> str:
        """Route template, used as a metrics label instead of the raw path."""
        if self.kind == "tags":
            return "/v2/{name}/tags/list"
        if self.kind == "blobs":
            return "/v2/{name}/blobs/{digest}"
        if self.kind == "referrers":
            return "/v2/{name}/referrers/{digest}"
        return "/v2/{name}/manifests/{reference}"


_PATH_RE = re.compile(r"(?P<name>.+)/(?P<kind>manifests|blobs|referrers)/(?P<ref>[^/]+)")


def parse_path(rest: str) -> RegistryPath:
    """Parse what follows `/v2/`; raise RegistryError for anything malformed.

    Names are checked against the grammar, which admits no "..", no NUL, no
    percent-escapes and nothing longer than NAME_MAX, so a parsed path can never
    address a file outside the cache.
    """
    if len(rest) > NAME_MAX + 256:
        raise RegistryError("NAME_INVALID", "path too long")
    if rest.endswith("/tags/list"):
        return RegistryPath(validate_name(rest[: -len("/tags/list")]), "tags", "list")
    m = _PATH_RE.fullmatch(rest)
    if m is None:
        raise RegistryError("NAME_UNKNOWN", "no such API endpoint", status=404)
    name = validate_name(m["name"])
    kind: Kind = "blobs"
    if m["kind"] in ("manifests", "referrers"):
        kind = "manifests" if m["kind"] == "manifests" else "referrers"
    ref = m["ref"]
    if kind != "manifests":
        Digest.parse(ref)
    else:
        Reference.parse(ref)
    return RegistryPath(name, kind, ref)
