"""Manifest media types and Accept-header negotiation.

Docker and skopeo send six separate Accept lines (docker in random order);
containerd sends one comma-joined line ending in `*/*`. Reading only the first
line loses media types, so every line is merged here.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass

DOCKER_MANIFEST_V2 = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_MANIFEST_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
DOCKER_MANIFEST_V1 = "application/vnd.docker.distribution.manifest.v1+json"
DOCKER_MANIFEST_V1_SIGNED = "application/vnd.docker.distribution.manifest.v1+prettyjws"
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"

INDEX_TYPES = frozenset({DOCKER_MANIFEST_LIST, OCI_INDEX})
SCHEMA1_TYPES = frozenset({DOCKER_MANIFEST_V1, DOCKER_MANIFEST_V1_SIGNED})
# What "any manifest" means upstream: everything but schema1, indexes first.
DEFAULT_TYPES = (OCI_INDEX, DOCKER_MANIFEST_LIST, OCI_MANIFEST, DOCKER_MANIFEST_V2)
MANIFEST_TYPES = (
    frozenset({DOCKER_MANIFEST_V2, DOCKER_MANIFEST_V1, DOCKER_MANIFEST_V1_SIGNED, OCI_MANIFEST})
    | INDEX_TYPES
)


# type/subtype (RFC 6838 restricted names, lower-cased, ASCII): what is forwarded in an
# Accept, and what a cached manifest's Content-Type may be.
_NAME = r"[a-z0-9][a-z0-9!#$&^_.+-]{0,126}"
MEDIA_TYPE_RE = re.compile(rf"{_NAME}/{_NAME}")
# What an Accept may also hold: `*/*`, `type/*`.
_MEDIA_RANGE_RE = re.compile(rf"\*/\*|{_NAME}/(?:\*|{_NAME})")


def _strip_params(value: str) -> tuple[str, float]:
    media_type, *params = (p.strip() for p in value.split(";"))
    q = 1.0
    for p in params:
        key, _, val = p.partition("=")
        if key.strip().lower() == "q":
            try:
                q = float(val)
            except ValueError:
                q = 1.0
    return media_type.lower(), q


@dataclass(frozen=True, slots=True)
class AcceptSet:
    """What a client accepts, merged from every Accept header line."""

    types: tuple[str, ...]  # in first-seen order, without parameters, deduplicated
    wildcard: bool  # `*/*` (or no Accept at all): anything goes

    @classmethod
    def from_headers(cls, lines: Iterable[str]) -> AcceptSet:
        seen: dict[str, None] = {}
        wildcard = False
        any_line = False
        for line in lines:
            for part in line.split(","):
                if not part.strip():
                    continue
                any_line = True
                media_type, q = _strip_params(part)
                if _MEDIA_RANGE_RE.fullmatch(media_type) is None:
                    continue  # not a media type: never forwarded (nor a non-ASCII header)
                if q <= 0:  # q=0 means "not acceptable" (RFC 9110)
                    continue
                if media_type in ("*/*", "application/*"):
                    wildcard = True
                seen.setdefault(media_type, None)
        # No Accept header at all: HTTP says the client accepts anything.
        return cls(tuple(seen), wildcard or not any_line)

    def header(self) -> str:
        """The merged value to forward upstream.

        Never schema1: an upstream asked with no Accept (curl, a bare `*/*`) answers
        with a signed schema1 manifest whose digest is not the body's. So schema1 types
        are dropped, and a client that names no other manifest type is asked for as
        accepting the v2 and OCI types.
        """
        forwarded = [t for t in self.types if t not in SCHEMA1_TYPES]
        if not any(t in MANIFEST_TYPES for t in forwarded):
            forwarded += [t for t in DEFAULT_TYPES if t not in forwarded]
        return ", ".join(forwarded)

    def accepts(self, media_type: str) -> bool:
        return self.wildcard or media_type.lower() in self.types

    @property
    def cache_key(self) -> str:
        """Clients that would get the same negotiated answer share a key.

        Only manifest media types influence the upstream's choice; order and
        unrelated types do not.
        """
        listed = ",".join(sorted(t for t in self.types if t in MANIFEST_TYPES))
        # The wildcard is part of the key: an upstream may answer a bare `*/*` with one
        # platform's manifest, which an index-capable client must not be handed.
        return ("*" if self.wildcard else "") + (listed or "-")
