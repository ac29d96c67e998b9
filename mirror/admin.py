"""The admin API (/admin/v1): what is cached, purge, pins, warm jobs, downloads.

Served on the admin listener, and on the registry listener when there is none (as
/metrics is). Who may do what:

- with client credentials configured (htpasswd, tokens), every call needs a login;
  reads take any user, writes (purge, pins, warm) a user in `admin_users` or a group
  in `admin_groups`. A 401 challenges with Basic, so a browser on the status page
  asks for the login itself;
- without credentials, reads are open; writes are open on the admin listener (a
  private address by contract: README, "Admin listener") and refused on the registry
  listener, which anyone who can pull reaches.

Handlers parse, delegate to mirror.inventory / mirror.jobs, and render JSON; errors
are the registry's own envelope (mirror.errors).
"""

from __future__ import annotations

import json
import time
from typing import Any
from urllib.parse import urlsplit

from fastapi import APIRouter, Request
from starlette.responses import Response

from mirror import identity
from mirror.auth import is_address
from mirror.clientauth import AuthFailed
from mirror.components import Components
from mirror.errors import RegistryError
from mirror.identity import Principal
from mirror.inventory import Image, Target
from mirror.reference import Digest, validate_name, validate_tag
from mirror.store import ImageKey
from mirror.tls import client_common_name

PREFIX = "/admin/v1"
MAX_BODY = 64 << 10
MAX_IMAGES = 256  # per warm job
MAX_RUNNING_JOBS = 8  # each fetches 2 blobs at a time
CHALLENGE = 'Basic realm="mirror", charset="UTF-8"'


def _components(request: Request) -> Components:
    built: Components | None = getattr(request.app.state, "components", None)
    if built is None:
        raise RegistryError("UNAVAILABLE", "the mirror is starting")
    return built


def _json(value: Any, status: int = 200) -> Response:
    return Response(
        json.dumps(value, separators=(",", ":")).encode(),
        status_code=status,
        media_type="application/json",
        headers={"Cache-Control": "no-store"},
    )


class Caller:
    def __init__(self, principal: Principal, auth: bool, can_write: bool) -> None:
        self.principal = principal
        self.auth = auth
        self.can_write = can_write


def router(admin_listener: bool) -> APIRouter:
    """The API's routes; `admin_listener`: served on the admin listener."""
    api = APIRouter(prefix=PREFIX)

    async def caller(request: Request, route: str, write: bool = False) -> Caller:
        request.state.route = PREFIX + route
        built = _components(request)
        if write:
            _same_origin(request)
        auth = built.auth
        settings = built.settings
        address = request.client.host if request.client is not None else "unknown"
        if not auth.enabled:
            who = Principal(None, address)
            identity.current.set(who)
            host = request.headers.get("host", "")
            trusted = _trusted_host(host, settings.admin_hosts)
            result = Caller(who, False, admin_listener and trusted)
            if write and not admin_listener:
                raise RegistryError(
                    "DENIED",
                    "purge, pins and warm jobs are on the admin listener (admin_listen), "
                    "or need client authentication and admin_users",
                )
            if write and not trusted:
                raise RegistryError(
                    "DENIED",
                    f"without credentials, writes need the admin listener reached by its IP "
                    f"address or localhost, not {host[:100]!r}: add the name to admin_hosts",
                )
            return result
        try:
            who = await auth.authenticate(
                request.headers.get("authorization"), address, client_common_name(request.scope)
            )
        except AuthFailed as exc:
            raise RegistryError(
                "UNAUTHORIZED", exc.message, headers={"WWW-Authenticate": CHALLENGE}
            ) from None
        if who.anonymous:
            raise RegistryError(
                "UNAUTHORIZED",
                "log in to use the admin API",
                headers={"WWW-Authenticate": CHALLENGE},
            )
        identity.current.set(who)
        admin = who.user in settings.admin_users or bool(who.groups & set(settings.admin_groups))
        if write and not admin:
            raise RegistryError("DENIED", f"{who.user} is not in admin_users or admin_groups")
        return Caller(who, True, admin)

    async def body(request: Request) -> dict[str, Any]:
        # Only application/json: a page elsewhere can post a form or text/plain to a
        # loopback listener without asking, but not JSON (the browser's preflight,
        # which this API never answers, stops it).
        if request.headers.get("content-type", "").split(";")[0].strip() != "application/json":
            raise RegistryError(
                "UNSUPPORTED", "send the body as Content-Type: application/json", status=415
            )
        declared = request.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > MAX_BODY:
            raise RegistryError("SIZE_INVALID", "request body too large", status=413)
        raw = bytearray()
        async for chunk in request.stream():
            raw += chunk
            if len(raw) > MAX_BODY:
                raise RegistryError("SIZE_INVALID", "request body too large", status=413)
        try:
            value = json.loads(raw or b"{}")
        except (ValueError, RecursionError):
            raise RegistryError("UNSUPPORTED", "the body is not JSON", status=400) from None
        if not isinstance(value, dict):
            raise RegistryError("UNSUPPORTED", "the body is not a JSON object", status=400)
        return value

    @api.get("/whoami")
    async def whoami(request: Request) -> Response:
        c = await caller(request, "/whoami")
        return _json({"user": c.principal.user, "auth": c.auth, "can_write": c.can_write})

    @api.get("/summary")
    async def summary(request: Request) -> Response:
        await caller(request, "/summary")
        built = _components(request)
        usage = built.store.usage()
        totals = built.metrics.totals()
        hits, misses = totals.hits, totals.misses
        upstreams = []
        for config in built.settings.resolved_upstreams():
            trouble = built.registries[config.name].trouble
            limit, remaining = totals.rate_limits.get(config.name, [None, None])
            upstreams.append(
                {
                    "name": config.name,
                    "default": config.name == built.settings.default_upstream_name(),
                    "url": config.base_url,
                    "healthy": trouble is None,
                    "last_error": trouble,
                    "ratelimit": {
                        "limit": limit,
                        "remaining": remaining,
                        "budget": totals.budgets.get(config.name, "normal"),
                    },
                }
            )
        downloads = sum(len(d.listing()) for d in built.router.downloads())
        pins = await built.inventory.pins()
        return _json(
            {
                "cache": {
                    "blobs": usage.blobs,
                    "blob_bytes": usage.blob_bytes,
                    "manifests": usage.manifests,
                    "tags": usage.tags,
                    "max_size": built.settings.max_size,
                },
                "traffic": {
                    "hits": hits,
                    "misses": misses,
                    "hit_ratio": hits / (hits + misses) if hits + misses else None,
                    "bytes_served": sum(totals.served.values()),
                    "bytes_from_upstream": totals.from_upstream,
                    # Bytes served from the cache: what the upstream did not have to send.
                    "bytes_saved": totals.served["cache"],
                },
                "upstreams": upstreams,
                "downloads": downloads,
                "pins": len(pins),
                "jobs_running": sum(r["state"] == "running" for r in await built.jobs.records()),
            }
        )

    @api.get("/images")
    async def images(request: Request) -> Response:
        await caller(request, "/images")
        q = request.query_params
        found = await _components(request).inventory.images(
            q.get("upstream") or None, q.get("repository") or None, q.get("q") or None
        )
        return _json({"images": [i.as_json() for i in _visible(request, found)]})

    @api.get("/upstreams")
    async def upstreams(request: Request) -> Response:
        await caller(request, "/upstreams")
        found = _visible(request, await _components(request).inventory.images())
        by: dict[str, dict[str, Any]] = {
            c.name: {"name": c.name, "repositories": set(), "images": 0, "pulls": 0}
            for c in _components(request).settings.resolved_upstreams()
        }
        for image in found:
            row = by.setdefault(
                image.key.upstream,
                {"name": image.key.upstream, "repositories": set(), "images": 0, "pulls": 0},
            )
            row["repositories"].add(image.key.repo)
            row["images"] += 1
            row["pulls"] += image.pulls
        rows = [dict(r, repositories=len(r["repositories"])) for r in by.values()]
        return _json({"upstreams": rows})

    @api.get("/upstreams/{upstream}/repositories")
    async def repositories(request: Request, upstream: str) -> Response:
        await caller(request, "/upstreams/{upstream}/repositories")
        found = _visible(request, await _components(request).inventory.images(upstream))
        by: dict[str, dict[str, Any]] = {}
        for image in found:
            row = by.setdefault(
                image.key.repo,
                {"name": image.key.repo, "tags": 0, "digests": 0, "pulls": 0, "last_pull": None},
            )
            row["tags" if image.kind == "tag" else "digests"] += 1
            row["pulls"] += image.pulls
            if image.last_pull is not None:
                row["last_pull"] = max(row["last_pull"] or 0, image.last_pull)
        return _json({"repositories": sorted(by.values(), key=lambda r: r["name"])})

    @api.post("/purge")
    async def purge(request: Request) -> Response:
        await caller(request, "/purge", write=True)
        built = _components(request)
        target = _target(await body(request), built)
        purged = await built.inventory.purge(target)
        upstream = target.upstream or "*"
        for digest in purged.manifests_gone:
            built.events.deleted(
                "manifest",
                upstream=upstream,
                repository=target.repo,
                digest=str(digest),
                tag=target.tag,
            )
        for digest, size in purged.blobs_freed:
            built.events.deleted(
                "blob", upstream=upstream, repository=target.repo, digest=str(digest), size=size
            )
        return _json({"target": str(target), **purged.as_json()})

    @api.get("/pins")
    async def pins(request: Request) -> Response:
        await caller(request, "/pins")
        found = await _components(request).inventory.pins()
        return _json(
            {
                "pins": [
                    {
                        "upstream": k.upstream,
                        "repository": k.repo,
                        "reference": k.ref,
                        "pinned_at": t,
                    }
                    for k, t in sorted(found.items(), key=lambda kv: str(kv[0]))
                ]
            }
        )

    @api.put("/pins")
    async def pin(request: Request) -> Response:
        await caller(request, "/pins", write=True)
        built = _components(request)
        key = _image(await body(request), built)
        await built.inventory.pin(key)
        job = await built.pins.refresh_once()  # cache it now, not at the next round
        return _json(
            {
                "upstream": key.upstream,
                "repository": key.repo,
                "reference": key.ref,
                "job": None if job is None else job.id,
            },
            201,
        )

    @api.delete("/pins")
    async def unpin(request: Request) -> Response:
        await caller(request, "/pins", write=True)
        built = _components(request)
        key = _image(dict(request.query_params), built)
        if not await built.inventory.unpin(key):
            raise RegistryError("MANIFEST_UNKNOWN", f"{key} is not pinned")
        return _json({"upstream": key.upstream, "repository": key.repo, "reference": key.ref})

    @api.post("/warm")
    async def warm(request: Request) -> Response:
        await caller(request, "/warm", write=True)
        value = await body(request)
        images, platforms = value.get("images"), value.get("platforms")
        if (
            not isinstance(images, list)
            or not images
            or len(images) > MAX_IMAGES
            or not all(isinstance(i, str) for i in images)
        ):
            raise RegistryError(
                "UNSUPPORTED", f"images: a list of 1 to {MAX_IMAGES} image names", status=400
            )
        if platforms is not None and (
            not isinstance(platforms, list) or not all(isinstance(p, str) for p in platforms)
        ):
            raise RegistryError("UNSUPPORTED", "platforms: a list of os/arch", status=400)
        jobs = _components(request).jobs
        if jobs.running >= MAX_RUNNING_JOBS:
            raise RegistryError(
                "TOOMANYREQUESTS", f"{jobs.running} jobs are running; wait for one to end"
            )
        job = await jobs.start(images, platforms, "warm")
        return _json(job.as_json(), 202)

    @api.get("/jobs")
    async def jobs(request: Request) -> Response:
        await caller(request, "/jobs")
        return _json({"jobs": await _components(request).jobs.records()})

    @api.get("/jobs/{job_id}")
    async def job(request: Request, job_id: str) -> Response:
        await caller(request, "/jobs/{id}")
        found = await _components(request).jobs.record(job_id)
        if found is None:
            raise RegistryError("NAME_UNKNOWN", "no such job", detail={"id": job_id[:64]})
        return _json(found)

    @api.get("/downloads")
    async def downloads(request: Request) -> Response:
        await caller(request, "/downloads")
        now = time.time()
        rows = []
        for table in _components(request).router.downloads():
            for dl in table.listing():
                elapsed = max(now - dl.started, 1e-3)
                rows.append(
                    {
                        "upstream": table.upstream_name,
                        "repository": dl.repo,
                        "digest": str(dl.digest),
                        "bytes": dl.written,
                        "size": dl.size,
                        "readers": dl.readers,
                        "started": dl.started,
                        "bytes_per_second": dl.written / elapsed,
                    }
                )
        return _json({"downloads": sorted(rows, key=lambda r: r["started"])})

    return api


def _upstream(value: object, built: Components) -> str:
    if not isinstance(value, str) or value not in built.router.names:
        names = ", ".join(built.router.names)
        raise RegistryError(
            "NAME_UNKNOWN",
            f"upstream: one of {names}",
            detail={"upstream": str(value)[:256]},
        )
    return value


def _repo(value: object, upstream: str, built: Components) -> str:
    """The upstream's own name for it (Docker Hub's `alpine` is `library/alpine`)."""
    if not isinstance(value, str):
        raise RegistryError("NAME_INVALID", "repository: a repository name")
    validate_name(value)
    proxy = built.router.proxy(upstream)
    assert proxy is not None  # _upstream checked it
    return proxy.repo(value)


TARGET_KEYS = frozenset({"upstream", "repository", "tag", "digest"})


def _visible(request: Request, images: list[Image]) -> list[Image]:
    """Only what the caller may pull, where access rules exist (a listing must not name
    repositories the rules hide)."""
    built = _components(request)
    who = identity.current.get()
    if who is None or not built.auth.enabled or not built.auth.access.restricted:
        return images
    allows = built.auth.access.allows
    return [i for i in images if allows(who, i.key.upstream, i.key.repo)]


def _trusted_host(host_header: str, allowed: list[str]) -> bool:
    """An address, `localhost`, or a configured name: no name an attacker's DNS could
    point at this listener (DNS rebinding) unless the operator listed it."""
    host = urlsplit("//" + host_header.strip()).hostname or ""
    return is_address(host) or host in (a.lower() for a in allowed)


def _same_origin(request: Request) -> None:
    """A browser names the page that sent a request: only the mirror's own may write."""
    origin = request.headers.get("origin")
    if origin is not None and urlsplit(origin).netloc != request.headers.get("host"):
        raise RegistryError("DENIED", "cross-origin writes are refused")


def _target(value: dict[str, Any], built: Components) -> Target:
    if unknown := sorted(set(value) - TARGET_KEYS):
        raise RegistryError(
            "UNSUPPORTED",
            f"unknown field {unknown[0]!r} (fields: upstream, repository, tag, digest)",
            status=400,
        )
    if any(v is None for v in value.values()):
        raise RegistryError("UNSUPPORTED", "leave out a field rather than send null", status=400)
    upstream = _upstream(value.get("upstream"), built) if "upstream" in value else None
    if value.get("repository") is not None and upstream is None:
        raise RegistryError("NAME_INVALID", "a repository is purged on a named upstream")
    repo = None
    if value.get("repository") is not None and upstream is not None:
        repo = _repo(value["repository"], upstream, built)
    tag = value.get("tag")
    digest = value.get("digest")
    if tag is not None:
        if not isinstance(tag, str) or repo is None:
            raise RegistryError("TAG_INVALID", "tag: a tag of a named repository")
        validate_tag(tag)
    parsed = None
    if digest is not None:
        if not isinstance(digest, str):
            raise RegistryError("DIGEST_INVALID", "digest: sha256:<hex>")
        parsed = Digest.parse(digest)
    if tag is not None and parsed is not None:
        raise RegistryError("UNSUPPORTED", "purge a tag or a digest, not both", status=400)
    if upstream is None and parsed is None:
        raise RegistryError("UNSUPPORTED", "name an upstream (and more), or a digest", status=400)
    return Target(upstream, repo, tag, parsed)


def _image(value: dict[str, Any], built: Components) -> ImageKey:
    upstream = _upstream(value.get("upstream"), built)
    repo = _repo(value.get("repository"), upstream, built)
    ref = value.get("reference")
    if not isinstance(ref, str):
        raise RegistryError("TAG_INVALID", "reference: a tag or a digest")
    if ":" in ref:
        ref = str(Digest.parse(ref))
    else:
        validate_tag(ref)
    return ImageKey(upstream, repo, ref)
