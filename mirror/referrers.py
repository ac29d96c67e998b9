"""The OCI referrers API (distribution-spec 1.1): which manifests name a digest as
their `subject` (signatures, attestations, SBOMs).

The answer is an OCI image index listing them. It comes from the upstream's own
referrers endpoint, or, where the upstream has none (Distribution 2.x answers 404),
from the spec's referrers tag schema: the tag `<alg>-<hex>` holding such an index,
which clients pushing to such registries maintain. The mirror keeps the whole list
per (upstream, repository, digest), like a tag, and filters by `artifactType` itself,
so one cached answer serves every filter.
"""

from __future__ import annotations

import json

from mirror.errors import RegistryError, UpstreamError
from mirror.mediatypes import OCI_INDEX
from mirror.reference import Digest

# TagKey.accept for a cached referrers list: no AcceptSet.cache_key takes this value, so
# the entry never answers a pull of the tag of the same name.
CACHE_KEY = "referrers"
# Filters the mirror applies (the `OCI-Filters-Applied` header names them).
FILTERS_HEADER = "OCI-Filters-Applied"


def fallback_tag(digest: Digest) -> str:
    """The referrers tag schema's tag for `digest` (also the cache entry's tag, so TTL
    rules match it as `<repo>:sha256-*`)."""
    return f"{digest.algorithm}-{digest.hex}"


def descriptors(body: bytes) -> list[dict[str, object]]:
    """The descriptors of an upstream's referrers index; refused unless it is one."""
    try:
        document = json.loads(body)
    except (ValueError, RecursionError):
        raise UpstreamError(
            "MANIFEST_INVALID", "upstream referrers answer is not JSON", status=502
        ) from None
    listed = document.get("manifests") if isinstance(document, dict) else None
    if not isinstance(listed, list):
        raise UpstreamError(
            "MANIFEST_INVALID", "upstream referrers answer is not an image index", status=502
        )
    # Only well-formed descriptors: what a client can then fetch by digest.
    return [d for d in listed if _descriptor(d)]


def _descriptor(value: object) -> bool:
    # The digest must be one the mirror serves by: verifiers and `mirror warm` put it
    # in a URL path as is, so an upstream's "../.." or "md5:..." must not reach them.
    return (
        isinstance(value, dict)
        and isinstance(value.get("mediaType"), str)
        and _digest(value.get("digest"))
        and type(value.get("size")) is int
        and value["size"] >= 0
    )


def _digest(value: object) -> bool:
    if not isinstance(value, str):
        return False
    try:
        return str(Digest.parse(value)) == value
    except RegistryError:
        return False


def index(listed: list[dict[str, object]]) -> bytes:
    return json.dumps(
        {"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": listed},
        separators=(",", ":"),
    ).encode()


EMPTY = index([])


def only(body: bytes, artifact_type: str) -> bytes:
    """The cached index, keeping the descriptors of one `artifactType`."""
    listed = descriptors(body)
    return index([d for d in listed if d.get("artifactType") == artifact_type])
