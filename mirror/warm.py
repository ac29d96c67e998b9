"""`mirror warm`: pre-pull images through a running mirror, so the first real pull is a hit.

It is an ordinary client of the mirror's registry API (like docker or containerd): the
mirror fetches, verifies and caches as for any pull, and its coalescing applies.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Collection
from dataclasses import dataclass, field

import httpx

from mirror import errors
from mirror.errors import RegistryError
from mirror.mediatypes import INDEX_TYPES, MANIFEST_TYPES
from mirror.reference import Reference, validate_name, validate_tag

ACCEPT = ", ".join(sorted(MANIFEST_TYPES))


@dataclass
class Plan:
    """What warming one image fetches: manifests now, then these blobs."""

    image: str
    manifests: list[str] = field(default_factory=list)  # digests fetched
    blobs: dict[str, int] = field(default_factory=dict)  # digest -> size
    platforms: list[str] = field(default_factory=list)
    referrers: list[str] = field(default_factory=list)  # referrer manifests fetched
    cosign_tags: list[str] = field(default_factory=list)  # `sha256-<hex>.sig` etc. found


def parse_image(image: str) -> tuple[str | None, str, str]:
    """`[registry/]name[:tag]` or `...@digest` -> (registry, name, reference).

    The first component is a registry when it looks like a host (a dot, a port, or
    `localhost`), as Docker decides; the mirror is then asked with `?ns=<registry>`,
    as containerd does. The tag defaults to latest.
    """
    registry = None
    first, sep, rest = image.partition("/")
    if sep and ("." in first or ":" in first or first == "localhost"):
        registry, image = first.lower(), rest
    if "@" in image:
        name, ref = image.split("@", 1)
    else:
        head, _, last = image.rpartition("/")
        name, sep, tag = last.partition(":")
        name = f"{head}/{name}" if head else name
        ref = tag if sep else "latest"
    validate_name(name)
    if ":" not in ref:
        try:
            validate_tag(ref)
        except RegistryError:
            raise ValueError(f"{ref!r} is not a valid tag") from None
    Reference.parse(ref)
    return registry, name, ref


def ns_params(registry: str | None) -> dict[str, str]:
    return {"ns": registry} if registry else {}


def _platform(entry: dict[str, object]) -> str:
    p = entry.get("platform")
    if not isinstance(p, dict):
        return "unknown"
    text = f"{p.get('os')}/{p.get('architecture')}"
    return f"{text}/{p['variant']}" if p.get("variant") else text


def platform_wanted(platform: str, wanted: Collection[str] | None) -> bool:
    """`linux/arm64/v8` is wanted by `linux/arm64` too; None wants every platform."""
    if wanted is None:
        return True
    return platform in wanted or (platform.count("/") == 2 and platform.rsplit("/", 1)[0] in wanted)


class WarmError(Exception):
    """Why an image could not be warmed, in the mirror's own words."""


def _check(r: httpx.Response) -> None:
    """The mirror's OCI error (code, message, detail) rather than httpx's generic text."""
    if r.status_code < 400:
        return
    told = errors.told(r.content, detail=True)
    if told is None:
        told = f"{r.reason_phrase}, and not a registry's error: is {r.url.host} the mirror?"
    if r.status_code == 401:
        told += "; give credentials with --token-file, or --user and --password-file"
    raise WarmError(f"the mirror answered {r.status_code} for {r.url.path}: {told}")


def _config_platform(
    client: httpx.Client, name: str, registry: str | None, image: dict[str, object]
) -> str | None:
    config = image.get("config")
    if not isinstance(config, dict) or "digest" not in config:
        return None
    r = client.get(f"/v2/{name}/blobs/{config['digest']}", params=ns_params(registry))
    _check(r)
    try:
        document = json.loads(r.content)
    except ValueError:
        return None
    if not isinstance(document, dict) or "os" not in document:
        return None
    return _platform({"platform": {**document, "architecture": document.get("architecture")}})


def plan(client: httpx.Client, image: str, platforms: set[str] | None) -> Plan:
    """Fetch the image's manifests (through the mirror) and list the blobs to warm."""
    registry, name, ref = parse_image(image)
    result = Plan(image)

    def manifest(reference: str) -> tuple[str, dict[str, object]]:
        r = client.get(
            f"/v2/{name}/manifests/{reference}",
            headers={"Accept": ACCEPT},
            params=ns_params(registry),
        )
        _check(r)
        digest = r.headers.get("docker-content-digest")
        if digest is None:
            raise WarmError(
                f"{client.base_url} answered {r.url.path} without Docker-Content-Digest: "
                "is it the mirror?"
            )
        result.manifests.append(digest)
        return r.headers["content-type"].split(";")[0], json.loads(r.content)

    media_type, top = manifest(ref)
    images: list[dict[str, object]] = []
    if media_type in INDEX_TYPES:
        children = top.get("manifests")
        for entry in children if isinstance(children, list) else []:
            platform = _platform(entry)
            if platform_wanted(platform, platforms):
                result.platforms.append(platform)
                images.append(manifest(str(entry["digest"]))[1])
        if platforms is not None and not images:
            available = (
                ", ".join(_platform(e) for e in children) if isinstance(children, list) else ""
            )
            raise WarmError(
                f"no platform matches {', '.join(sorted(platforms))} (the image has: {available})"
            )
    else:
        if platforms is not None:
            # A single-platform image names its platform in its config blob only.
            own = _config_platform(client, name, registry, top)
            if own is not None and own not in platforms and own.rsplit("/", 1)[0] not in platforms:
                raise WarmError(
                    f"the image is {own}, which matches none of {', '.join(sorted(platforms))}"
                )
        images.append(top)
    for img in images:
        config = img.get("config")
        layers = img.get("layers")
        for desc in [config, *(layers if isinstance(layers, list) else [])]:
            if isinstance(desc, dict) and "digest" in desc and not desc.get("urls"):
                result.blobs[str(desc["digest"])] = int(desc.get("size", 0))
    return result


def fetch_blobs(
    client: httpx.Client,
    image: str,
    blobs: dict[str, int],
    on_bytes: Callable[[int], None],
) -> None:
    registry, name, _ = parse_image(image)
    for digest in blobs:
        with client.stream("GET", f"/v2/{name}/blobs/{digest}", params=ns_params(registry)) as r:
            if r.status_code >= 400:
                r.read()
                _check(r)
            for chunk in r.iter_raw(1 << 20):
                on_bytes(len(chunk))


# cosign's own tags next to an image (`sha256-<hex>.sig`): ordinary tags, which
# verifiers ask for where the registry has no referrers API.
COSIGN_SUFFIXES = (".sig", ".att", ".sbom")


def add_referrers(client: httpx.Client, result: Plan) -> None:
    """Add what refers to the image's manifests (signatures, attestations, SBOMs) to
    `result`: each referrer's manifest is fetched through the mirror now (cached there,
    with the referrers index of each digest) and its blobs join the plan. cosign's tags
    for the image's own digest are fetched too, where they exist."""
    registry, name, _ = parse_image(result.image)
    params = ns_params(registry)

    def fetch(reference: str, accept: str = ACCEPT) -> dict[str, object] | None:
        r = client.get(
            f"/v2/{name}/manifests/{reference}", headers={"Accept": accept}, params=params
        )
        if r.status_code == 404:
            return None
        _check(r)
        document = json.loads(r.content)
        _collect_blobs(document, result.blobs)
        return document if isinstance(document, dict) else None

    seen = set(result.manifests)
    for digest in list(result.manifests):
        r = client.get(f"/v2/{name}/referrers/{digest}", params=params)
        _check(r)
        listed = r.json().get("manifests")
        for desc in listed if isinstance(listed, list) else []:
            referrer = desc.get("digest") if isinstance(desc, dict) else None
            if not isinstance(referrer, str) or referrer in seen:
                continue
            seen.add(referrer)
            media_type = str(desc.get("mediaType") or "")
            types = [media_type] if media_type else []
            accept = ", ".join(dict.fromkeys([*types, *sorted(MANIFEST_TYPES)]))
            if fetch(referrer, accept) is not None:  # listed, but gone since: skipped
                result.referrers.append(referrer)
    top = result.manifests[0]
    for suffix in COSIGN_SUFFIXES:
        tag = top.replace(":", "-") + suffix
        if fetch(tag) is not None:
            result.cosign_tags.append(tag)


def _collect_blobs(document: object, blobs: dict[str, int]) -> None:
    if not isinstance(document, dict):
        return
    config, layers = document.get("config"), document.get("layers")
    for desc in [config, *(layers if isinstance(layers, list) else [])]:
        if isinstance(desc, dict) and "digest" in desc and not desc.get("urls"):
            blobs[str(desc["digest"])] = int(desc.get("size", 0))
