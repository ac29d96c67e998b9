"""HTTP routes of the registry API (read side). Handlers parse, delegate, render."""

from __future__ import annotations

import base64
import hmac
import json
import re
from collections.abc import Callable
from urllib.parse import parse_qs, urlencode, urlsplit

from fastapi import APIRouter, Request
from starlette.responses import Response

from mirror import events, identity, logs, referrers
from mirror.catalog import next_link, parse_n
from mirror.clientauth import AuthFailed, ClientAuth, parse_scopes
from mirror.cluster import PEER_PATH, open_for_peer
from mirror.components import Components
from mirror.errors import RegistryError, UpstreamError
from mirror.identity import Principal
from mirror.mediatypes import OCI_INDEX, AcceptSet
from mirror.metrics import Kind, Metrics
from mirror.proxy import Blob, answer
from mirror.ranges import parse_length, parse_range
from mirror.reference import Digest, Reference, parse_path, validate_tag
from mirror.responses import BlobResponse
from mirror.routing import Route
from mirror.sharedstore import SharedStore
from mirror.store import ImageKey
from mirror.tls import client_common_name

router = APIRouter()
# Replicas' peer endpoint: on the registry listener, and on the admin listener too (plain
# HTTP inside the cluster), so peers need no TLS trust in a certificate that names the
# Service rather than pod addresses.
peer = APIRouter()

READ_METHODS = ("GET", "HEAD")
WRITE_METHODS = ("POST", "PUT", "PATCH", "DELETE")


def _route(request: Request, name: str) -> Route:
    built = _components(request)
    route = built.router.route(request.query_params.get("ns"), name)
    if (record := logs.current.get()) is not None:
        record.upstream = route.proxy.name
    principal = identity.current.get()
    if principal is not None and built.auth.required:
        _authorize(request, built.auth, principal, route, name)
    return route


# -- client authentication and authorization (mirror.clientauth, mirror.access) ---------

_HOST_RE = re.compile(r"[A-Za-z0-9.-]{1,253}(:[0-9]{1,5})?|\[[0-9A-Fa-f:.]{2,45}\](:[0-9]{1,5})?")
REALM_PATH = "/auth/token"
MAX_TOKEN_FORM = 64 << 10


def _realm(request: Request, auth: ClientAuth) -> str:
    """Where clients get tokens: configured, or this listener as the client reached it."""
    if auth.realm_url is not None:
        return auth.realm_url
    host = request.headers.get("host", "")
    if not _HOST_RE.fullmatch(host):  # a Host that cannot go into a challenge
        server = request.scope.get("server") or ("127.0.0.1", 80)
        host = f"[{server[0]}]:{server[1]}" if ":" in server[0] else f"{server[0]}:{server[1]}"
    return f"{request.url.scheme}://{host}{REALM_PATH}"


def _unauthorized(
    request: Request, auth: ClientAuth, name: str | None, message: str, error: str | None = None
) -> RegistryError:
    scope = f"repository:{name}:pull" if name else None
    challenge = auth.challenge(_realm(request, auth), scope, error)
    return RegistryError("UNAUTHORIZED", message, headers={"WWW-Authenticate": challenge})


def _cert_user(request: Request) -> str | None:
    # Set by the TLS listener for a verified client certificate only (ASGI TLS extension).
    return client_common_name(request.scope)


def _address(request: Request) -> str:
    return request.client.host if request.client is not None else "unknown"


async def _authenticate(request: Request, name: str | None) -> Principal:
    """Who sent a registry request (401 for bad credentials, or for none where
    anonymous access is off); the principal is then current for the request."""
    auth = _components(request).auth
    try:
        principal = await auth.authenticate(
            request.headers.get("authorization"), _address(request), _cert_user(request)
        )
    except AuthFailed as exc:
        raise _unauthorized(request, auth, name, exc.message, exc.error) from None
    if principal.anonymous and not auth.anonymous:
        auth.denied("anonymous")
        raise _unauthorized(request, auth, name, "authentication required")
    identity.current.set(principal)
    if principal.user is not None and (record := logs.current.get()) is not None:
        record.user = logs.printable(principal.user)
    return principal


def _authorize(request: Request, auth: ClientAuth, who: Principal, route: Route, name: str) -> None:
    if who.repositories is not None and name not in who.repositories:
        # A realm token for another repository: the client fetches one for this one.
        raise _unauthorized(
            request, auth, name, f"the token does not grant {name}", "insufficient_scope"
        )
    repo = route.proxy.repo(route.name)
    if auth.access.allows(who, route.proxy.name, repo):
        return
    auth.denied("anonymous" if who.anonymous else "user")
    if who.anonymous:
        # Anonymous clients are told to log in; a known user is told no.
        raise _unauthorized(request, auth, name, "authentication required")
    raise RegistryError(
        "DENIED",
        f"{who.user} may not pull {repo} from {route.proxy.name}",
        detail={"upstream": route.proxy.name, "repository": repo},
    )


@router.api_route(REALM_PATH, methods=["GET", "POST"])
async def token(request: Request) -> Response:
    """The mirror's token realm (Docker's token flow; OAuth2 password grant by POST,
    which containerd tries first)."""
    request.state.route = REALM_PATH
    auth = _components(request).auth
    authorization = request.headers.get("authorization")
    scopes = request.query_params.getlist("scope")
    if request.method == "POST":
        form = await _form(request)
        if form.get("grant_type", [""])[0] != "password":
            raise RegistryError("UNSUPPORTED", "only the password grant is supported", status=400)
        user, password = form.get("username", [""])[0], form.get("password", [""])[0]
        authorization = "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()
        scopes = form.get("scope", [])
    try:
        principal, source, cred = await auth.login(
            authorization, _address(request), _cert_user(request)
        )
    except AuthFailed as exc:
        raise RegistryError(
            "UNAUTHORIZED",
            exc.message,
            headers={"WWW-Authenticate": f'Basic realm="{auth.service}"'},
        ) from None
    if principal.user is not None and (record := logs.current.get()) is not None:
        record.user = logs.printable(principal.user)
    grant = auth.realm.issue(principal, source, cred, parse_scopes(scopes))
    body = {
        "token": grant.token,
        "access_token": grant.token,
        "expires_in": grant.expires_in,
        "issued_at": grant.issued_at,
    }
    return Response(
        json.dumps(body).encode(),
        media_type="application/json",
        headers={"Cache-Control": "no-store"},
    )


async def _form(request: Request) -> dict[str, list[str]]:
    length = parse_length(request.headers.get("content-length") or "0")
    if length is None or length > MAX_TOKEN_FORM:
        raise RegistryError("UNSUPPORTED", "token request body too large", status=413)
    body = b""
    async for chunk in request.stream():
        body += chunk
        if len(body) > MAX_TOKEN_FORM:
            raise RegistryError("UNSUPPORTED", "token request body too large", status=413)
    return parse_qs(body.decode("utf-8", "replace"))


def _components(request: Request) -> Components:
    built: Components = request.app.state.components
    return built


@router.api_route("/v2/", methods=["GET", "HEAD"])
@router.api_route("/v2", methods=["GET", "HEAD"], include_in_schema=False)
async def base(request: Request) -> Response:
    request.state.route = "/v2/"
    who = await _authenticate(request, None)
    auth = _components(request).auth
    if who.anonymous and not auth.access.may_pull_anything(who):
        # Nothing is open to anonymous clients: `docker login` must see a challenge.
        raise _unauthorized(request, auth, None, "authentication required")
    if "ns" in request.query_params and hasattr(request.app.state, "components"):
        # A client configured for a registry this mirror does not serve learns it at
        # its first request (403), like it would on any other endpoint.
        _components(request).router.for_ns(request.query_params["ns"])
    return Response(b"{}", media_type="application/json")


def _metrics(request: Request) -> Metrics:
    # Built with the app, before the lifespan: /metrics answers even while starting.
    metrics: Metrics = request.app.state.metrics
    return metrics


@peer.get(PEER_PATH + "{digest}")
async def peer_blob(request: Request, digest: str) -> Response:
    """Another replica following a download this one leads (mirror.cluster). Only
    with the shared secret; only what is in flight or cached here, never a fetch."""
    request.state.route = "/_mirror/peer/blobs/{digest}"
    built = _components(request)
    cluster = built.cluster
    given = request.headers.get("authorization", "")
    if cluster is None or not hmac.compare_digest(
        given.encode(), f"Bearer {cluster.secret}".encode()
    ):
        raise RegistryError("DENIED", "peer requests need the cluster's peer secret")
    wanted = Digest.parse(digest)
    spec = parse_range(request.headers.get("range"))
    store = built.store
    assert isinstance(store, SharedStore)
    opened = await open_for_peer(built.router.downloads(), store.l1, wanted)
    if opened is None:
        raise RegistryError("BLOB_UNKNOWN", "not in flight or cached on this replica")
    blob = await answer(opened, spec, False, "cache")
    headers = {"Docker-Content-Digest": str(wanted), "Content-Type": "application/octet-stream"}
    return _blob_response(blob, headers, cluster.metrics.peer_bytes.labels("sent").inc)


@router.api_route("/v2/_catalog", methods=["GET", "HEAD"])
async def catalog(request: Request) -> Response:
    """The cached repositories the caller may pull (mirror.catalog). Authorization is
    the access rules alone: a realm token's repository list is for pulls, and Docker
    asks the catalog with `registry:catalog:*`, which the realm never grants."""
    request.state.route = "/v2/_catalog"
    who = await _authenticate(request, None)
    built = _components(request)
    if who.anonymous and not built.auth.access.may_pull_anything(who):
        raise _unauthorized(request, built.auth, None, "authentication required")
    params = request.query_params
    n = parse_n(params.get("n"))
    last, ns = params.get("last"), params.get("ns")
    shown, more = await built.catalog.page(built.router, built.auth.access, who, ns, n, last)
    headers = {}
    if more and shown:
        headers["Link"] = next_link(n, shown[-1], ns)
    body = json.dumps({"repositories": shown}).encode()
    return Response(body, media_type="application/json", headers=headers)


@router.api_route("/v2/{rest:path}", methods=[*READ_METHODS, *WRITE_METHODS])
async def registry(request: Request, rest: str) -> Response:
    if request.method in WRITE_METHODS:
        raise RegistryError(
            "UNSUPPORTED", "this mirror is read-only: push to the upstream", status=405
        )
    path = parse_path(rest)
    request.state.route = path.route
    who = await _authenticate(request, path.name)
    if _components(request).events.enabled:
        events.caller.set(_caller(request, who))
    if (record := logs.current.get()) is not None:
        record.repository, record.reference = path.name, path.reference
    head = request.method == "HEAD"
    if path.kind == "manifests":
        return await _manifest(request, path.name, Reference.parse(path.reference), head)
    if path.kind == "blobs":
        return await _blob(request, path.name, Digest.parse(path.reference), head)
    if path.kind == "referrers":
        return await _referrers(request, path.name, Digest.parse(path.reference), head)
    return await _tags(request, path.name)


async def _manifest(request: Request, name: str, ref: Reference, head: bool) -> Response:
    accept = AcceptSet.from_headers(request.headers.getlist("accept"))
    route = _route(request, name)
    max_age = _max_age(request.headers.get("cache-control"))
    try:
        manifest = await route.proxy.manifest(route.name, ref, accept, max_age)
    except UpstreamError as exc:
        _upstream_failed(request, route, str(ref), exc)
        raise
    stored = manifest.stored
    etag = f'"{stored.digest}"'
    headers = {
        "Docker-Content-Digest": str(stored.digest),
        "ETag": etag,
        "X-Cache": manifest.result.upper(),  # HIT, MISS, REVALIDATED, STALE, UPDATING
    }
    if manifest.age is not None:
        # How long ago the tag was confirmed with the registry: a downstream mirror
        # tier counts its own TTL from then (RFC 9111 `Age`).
        headers["Age"] = str(int(manifest.age))
    if not head:
        # A pull as registries count them (Docker Hub: manifest GETs, a conditional one
        # too), for the inventory and the events alike.
        image = ImageKey(route.proxy.name, route.proxy.repo(route.name), str(ref))
        _components(request).store.record_pull(image, stored.digest)
        _pulled(
            request,
            route,
            "manifest",
            str(stored.digest),
            stored.media_type,
            len(stored.body),
            manifest.result,
            ref.tag,
            stored.body,
        )
    if request.headers.get("if-none-match") == etag:
        return Response(status_code=304, headers=headers)
    if not head:
        _metrics(request).served_bytes.labels(manifest.source).inc(len(stored.body))
    # uvicorn drops the body of a HEAD response but keeps our Content-Length.
    return Response(stored.body, media_type=stored.media_type, headers=headers)


async def _referrers(request: Request, name: str, digest: Digest, head: bool) -> Response:
    """The OCI referrers API (mirror.referrers): per upstream and repository, through
    the same authorization as a pull of that repository."""
    route = _route(request, name)
    found = await route.proxy.referrers(route.name, digest)
    headers = {"X-Cache": found.result.upper()}
    body = found.stored.body
    artifact_type = request.query_params.get("artifactType")
    if artifact_type is not None:
        body = referrers.only(body, artifact_type)
        headers[referrers.FILTERS_HEADER] = "artifactType"
    if not head:
        _metrics(request).served_bytes.labels(found.source).inc(len(body))
    return Response(body, media_type=OCI_INDEX, headers=headers)


async def _blob(request: Request, name: str, digest: Digest, head: bool) -> Response:
    spec = parse_range(request.headers.get("range"))
    route = _route(request, name)
    try:
        blob = await route.proxy.blob(route.name, digest, spec, head=head)
    except UpstreamError as exc:
        _upstream_failed(request, route, str(digest), exc)
        raise
    if not head:
        cache = "hit" if blob.source == "cache" else "miss"
        _pulled(request, route, "blob", str(digest), None, blob.size, cache, None, None)
    if blob.location is not None:
        # The client fetches it from the object store (with its Range, if any).
        return Response(
            status_code=307,
            headers={
                "Location": blob.location,
                "Docker-Content-Digest": str(digest),
                "X-Cache": "HIT",
            },
        )
    headers = {
        "Docker-Content-Digest": str(digest),
        "Accept-Ranges": "bytes",
        "Content-Type": "application/octet-stream",
        # Content-addressed: the bytes behind this URL never change.
        "Cache-Control": "public, max-age=31536000, immutable",
        "ETag": f'"{digest}"',
        "X-Cache": "HIT" if blob.source == "cache" else "MISS",
    }
    return _blob_response(blob, headers, _metrics(request).served_bytes.labels(blob.source).inc)


# -- events (mirror.events) ----------------------------------------------------------

# Client-sent values in events (Host, User-Agent) are cut to this many characters.
EVENT_FIELD_MAX = 256


def _caller(request: Request, who: Principal) -> events.Caller:
    record = logs.current.get()
    client = request.client
    return events.Caller(
        id=record.request_id if record is not None else "",
        addr=f"{client.host}:{client.port}" if client is not None else "",
        host=request.headers.get("host", "")[:EVENT_FIELD_MAX],
        method=request.method,
        useragent=request.headers.get("user-agent", "")[:EVENT_FIELD_MAX],
        user=who.user,
    )


def _pulled(
    request: Request,
    route: Route,
    kind: Kind,
    digest: str,
    media_type: str | None,
    size: int | None,
    cache: str,
    tag: str | None,
    manifest: bytes | None,
) -> None:
    """A pull event (a GET, as Distribution reports them; never a HEAD)."""
    sink = _components(request).events
    if not sink.enabled:
        return
    path = f"/v2/{route.prefix}{route.name}/{kind}s/{digest}"
    sink.pull(
        kind,
        upstream=route.proxy.name,
        repository=route.proxy.repo(route.name),
        digest=digest,
        media_type=media_type,
        size=size,
        cache=cache,
        tag=tag,
        url=str(request.url.replace(path=path)),
        manifest=manifest,
    )


def _upstream_failed(request: Request, route: Route, reference: str, exc: UpstreamError) -> None:
    """An event for a pull the upstream failed (5xx, or its 429), not for its answers
    (a 404 is the upstream's answer, not its trouble)."""
    sink = _components(request).events
    if not sink.enabled or (exc.status < 500 and exc.upstream_status != 429):
        return
    sink.upstream_failure(
        upstream=route.proxy.name,
        repository=route.proxy.repo(route.name),
        reference=reference,
        status=exc.status,
        code=exc.code,
        message=exc.message,
        upstream_status=exc.upstream_status,
    )


def _blob_response(
    blob: Blob, headers: dict[str, str], on_chunk: Callable[[int], None]
) -> BlobResponse:
    """200 with the whole blob, or 206 with its range; Content-Length when known."""
    status = 200
    if blob.range is not None and blob.size is not None:
        status = 206
        headers["Content-Range"] = blob.range.content_range(blob.size)
        headers["Content-Length"] = str(blob.range.length)
    elif blob.size is not None:
        headers["Content-Length"] = str(blob.size)
    return BlobResponse(status, headers, blob.body, on_chunk)


_SECONDS_RE = re.compile(r"[0-9]{1,12}")
# However fresh a client asks a tag to be, it is revalidated at most this often: any
# client may send `Cache-Control`, and none may turn every pull into a registry HEAD.
MIN_MAX_AGE = 1.0


def _max_age(cache_control: str | None) -> float | None:
    """`Cache-Control: max-age=N` (or `no-cache`: 0) from a downstream mirror tier;
    anything unparsable is ignored."""
    if not cache_control:
        return None
    for part in cache_control.split(","):
        key, _, value = part.strip().partition("=")
        key = key.strip().lower()
        if key == "no-cache":
            return MIN_MAX_AGE
        if key == "max-age" and _SECONDS_RE.fullmatch(value.strip()):  # ASCII digits only
            return max(MIN_MAX_AGE, float(value.strip()))
    return None


_LAST_RE = re.compile(r"[A-Za-z0-9_.-]{1,128}")


async def _tags(request: Request, name: str) -> Response:
    params = request.query_params
    n: int | None = None
    if "n" in params:
        n = parse_length(params["n"])
        if n is None:
            raise RegistryError("UNSUPPORTED", "n must be a non-negative integer", status=400)
    last = params.get("last")
    if last is not None and _LAST_RE.fullmatch(last) is None:
        validate_tag(last)  # raises TAG_INVALID with the offending value
    route = _route(request, name)
    body, link = await route.proxy.tags(route.name, n, last)
    headers = {}
    if link and (next_page := _next_page(link, route.prefix + route.name, params.get("ns"))):
        headers["Link"] = next_page
    return Response(body, media_type="application/json", headers=headers)


def _next_page(link: str, name: str, ns: str | None) -> str | None:
    """The upstream's `Link: <...?last=x&n=y>; rel="next"`, pointed back at this mirror.

    Only `n` and `last` are taken from it: the path is the client's own (with its
    prefix) and `ns` is carried over, so following the link reaches the same upstream
    through the mirror, never the upstream directly or the default registry.
    """
    target, sep, rest = link.partition(">")
    if not sep or 'rel="next"' not in rest.replace(" ", ""):
        return None
    query = parse_qs(urlsplit(target.strip().lstrip("<")).query)
    params = {k: query[k][0] for k in ("n", "last") if query.get(k)}
    if ns is not None:
        params["ns"] = ns
    return f'</v2/{name}/tags/list?{urlencode(params)}>; rel="next"'
