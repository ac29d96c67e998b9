"""What a manifest from upstream must be before the mirror caches it.

A cached manifest is served to every client until it expires, so a bad one is not one
failed pull but a poisoned name. Checked before anything is stored, in this order:

- the media type: a known manifest type, or a well-formed JSON media type
  (`type/subtype+json`) for artifacts; ASCII only, since it becomes a response header.
  Never schema1: its signed body has no stable digest, and the mirror never asks for it;
- the body: a bounded number of JSON objects and arrays, counted before parsing (a
  hostile body would cost seconds of parsing on every request), then a JSON object
  (nesting too deep for the parser is refused, not a crash);
- its `mediaType` field, when present, agreeing with the content type;
- the upstream's `Docker-Content-Digest`, when present, well-formed (the proxy then
  checks that the body matches it).

Anything else is refused with a clear 502 and never cached.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from mirror.errors import RegistryError, UpstreamError
from mirror.mediatypes import MANIFEST_TYPES, MEDIA_TYPE_RE, OCI_INDEX, OCI_MANIFEST, SCHEMA1_TYPES
from mirror.reference import Digest

# An index of a thousand platforms, or a manifest of a thousand layers, holds a few
# thousand; brackets inside strings count too, which only errs on the safe side.
MAX_CONTAINERS = 50_000

SCHEMA1 = "upstream answered with a schema1 manifest, which this mirror does not serve"
_GENERIC_JSON = frozenset(
    {"application/json", "application/octet-stream", "binary/octet-stream", "text/plain", ""}
)


def _refuse(message: str) -> UpstreamError:
    return UpstreamError("MANIFEST_INVALID", message, status=502)


def expected_digest(header: str | None) -> Digest | None:
    """The digest the upstream names; a malformed one is refused, never ignored (the
    body would then be cached unverified)."""
    if header is None:
        return None
    try:
        return Digest.parse(header.strip())
    except RegistryError:
        raise _refuse("upstream named a malformed manifest digest") from None


@dataclass(frozen=True, slots=True)
class Checked:
    media_type: str
    # Sizes its descriptors give (config, layers, child manifests): what a blob
    # fetched by one of these digests may weigh at most.
    sizes: dict[Digest, int]
    # What a registry must hold in the same repository before it serves this manifest
    # (config, layers, child manifests): known to be there once the manifest came.
    # Never the `subject` (OCI 1.1 lets a manifest name one that does not exist) nor
    # a descriptor with `urls` (non-distributable layers are not checked on push).
    references: frozenset[Digest] = frozenset()


def check(content_type: str | None, body: bytes) -> Checked:
    """The manifest's media type and descriptor sizes, once it passed every check."""
    announced = (content_type or "").split(";")[0].strip().lower()
    if announced in SCHEMA1_TYPES:
        raise _refuse(SCHEMA1)
    if announced not in _GENERIC_JSON and not _json_type(announced):
        raise _refuse("upstream answered with something that is not a manifest")
    # Counted at C speed before parsing: real manifests hold a few hundred objects
    # and arrays, a hostile one millions (seconds of parsing, on every request).
    if body.count(b"[") + body.count(b"{") > MAX_CONTAINERS:
        raise _refuse(f"upstream manifest holds more than {MAX_CONTAINERS} objects and arrays")
    try:
        document = json.loads(body)
    except RecursionError:
        raise _refuse("upstream manifest nests too deep") from None
    except (ValueError, UnicodeDecodeError):
        raise _refuse("upstream manifest is not JSON") from None
    if not isinstance(document, dict):
        raise _refuse("upstream manifest is not a JSON object")
    declared = document.get("mediaType")
    if declared is not None and (not isinstance(declared, str) or not _json_type(declared)):
        raise _refuse("upstream manifest declares a malformed mediaType")
    if announced in _GENERIC_JSON:
        # Some registries answer application/json: the manifest names its own type.
        resolved = declared or _implied(document)
        if resolved is None:
            raise _refuse("upstream manifest names no media type")
        if resolved in SCHEMA1_TYPES:
            raise _refuse(SCHEMA1)
        return Checked(resolved, descriptor_sizes(document), references(document))
    if declared is not None and declared != announced:
        raise _refuse("upstream manifest's mediaType contradicts its Content-Type")
    return Checked(announced, descriptor_sizes(document), references(document))


def descriptor_sizes(document: dict[str, object]) -> dict[Digest, int]:
    descriptors: list[object] = [document.get("config"), document.get("subject")]
    for key in ("layers", "manifests", "blobs"):
        listed = document.get(key)
        if isinstance(listed, list):
            descriptors += listed
    sizes = {}
    for d in descriptors:
        if not isinstance(d, dict):
            continue
        digest, size = d.get("digest"), d.get("size")
        if isinstance(digest, str) and type(size) is int and size >= 0:  # not bool
            try:
                sizes[Digest.parse(digest)] = size
            except RegistryError:
                continue  # a descriptor the client cannot fetch through us anyway
    return sizes


def references(document: dict[str, object]) -> frozenset[Digest]:
    descriptors: list[object] = [document.get("config")]
    for key in ("layers", "manifests", "blobs"):
        listed = document.get(key)
        if isinstance(listed, list):
            descriptors += listed
    found = set()
    for d in descriptors:
        if not isinstance(d, dict) or "urls" in d or not isinstance(d.get("digest"), str):
            continue
        try:
            found.add(Digest.parse(d["digest"]))
        except RegistryError:
            continue
    return frozenset(found)


def servable(media_type: str) -> bool:
    """Could this have passed `check`? (Entries cached before it existed may not.)"""
    return media_type == "application/json" or _json_type(media_type)


def _json_type(value: str) -> bool:
    return value in MANIFEST_TYPES or (
        MEDIA_TYPE_RE.fullmatch(value) is not None and value.endswith("+json")
    )


def _implied(document: dict[str, object]) -> str | None:
    """OCI makes `mediaType` optional: an index lists manifests, a manifest a config."""
    if document.get("schemaVersion") != 2:
        return None
    if isinstance(document.get("manifests"), list):
        return OCI_INDEX
    if isinstance(document.get("config"), dict):
        return OCI_MANIFEST
    return None
