"""The upstream client against the fake upstream: token flow, retries, error mapping."""

from __future__ import annotations

import asyncio
import logging
import socket
from collections.abc import AsyncIterator

import httpx
import pytest
from fakes.clock import Clock
from fakes.rawupstream import OCI, RawUpstream, Request, Script, manifest, manifest_response
from fakes.upstream import FakeUpstream

from mirror.budget import Budget, Reserve
from mirror.errors import UpstreamError
from mirror.metrics import Metrics
from mirror.reference import Digest, Reference
from mirror.upstream import Credentials, Upstream, make_client

ANY_DIGEST = "sha256:" + "0" * 64  # mock transports answer any path


async def _fetch(up: Upstream, repo: str, digest: str) -> bytes:
    blob = await up.open_blob(repo, Digest.parse(digest), 1 << 20)
    try:
        return b"".join([chunk async for chunk in blob])
    finally:
        await blob.aclose()


async def _streamed(data: bytes) -> AsyncIterator[bytes]:
    # As a real transport's body: not read yet (bytes content would be, and the
    # remote store streams raw bytes).
    yield data


@pytest.fixture
async def client() -> AsyncIterator[httpx.AsyncClient]:
    c = make_client(2.0, 2.0)
    yield c
    await c.aclose()


async def test_token_fetched_once_and_reused(
    fake: tuple[FakeUpstream, str], client: httpx.AsyncClient
) -> None:
    upstream, url = fake
    upstream.token = "tok"
    digest = upstream.add_blob(b"hello")
    up = Upstream(url, client, Metrics())
    for _ in range(5):
        assert await _fetch(up, "a", digest) == b"hello"
    assert len(upstream.token_requests) == 1
    # Only the very first request paid the 401 round trip.
    assert sum(1 for r in upstream.requests if "authorization" not in r.headers) == 1


async def test_access_token_field_and_default_expiry(
    fake: tuple[FakeUpstream, str], client: httpx.AsyncClient
) -> None:
    upstream, url = fake
    upstream.token = "tok2"
    upstream.token_response = {"access_token": "tok2"}  # no expires_in: 60 s
    digest = upstream.add_blob(b"x")
    clock = Clock()
    up = Upstream(url, client, Metrics(), clock=clock)
    for advance in (0, 30, 30):
        clock.now += advance
        assert await _fetch(up, "a", digest) == b"x"
    assert len(upstream.token_requests) == 2  # refreshed once the 60 s ran out


async def test_stale_token_is_retried_once_with_a_fresh_one(
    fake: tuple[FakeUpstream, str], client: httpx.AsyncClient
) -> None:
    upstream, url = fake
    upstream.token = "old"
    digest = upstream.add_blob(b"x")
    up = Upstream(url, client, Metrics())
    assert await _fetch(up, "a", digest) == b"x"
    upstream.token = "new"  # the upstream rotated its keys
    assert await _fetch(up, "a", digest) == b"x"
    assert len(upstream.token_requests) == 2


async def test_credentials_go_to_token_realm_as_basic(
    fake: tuple[FakeUpstream, str], client: httpx.AsyncClient
) -> None:
    upstream, url = fake
    upstream.token = "t"
    digest = upstream.add_blob(b"x")
    up = Upstream(url, client, Metrics(), credentials=Credentials("user", "pa:ss"))
    assert await _fetch(up, "a", digest) == b"x"
    assert upstream.token_requests[0].headers["authorization"] == "Basic dXNlcjpwYTpzcw=="
    # The registry itself only ever sees the bearer token.
    assert all(
        r.headers.get("authorization", "Bearer").startswith("Bearer") for r in upstream.requests
    )


async def test_concurrent_requests_share_one_token_fetch(
    fake: tuple[FakeUpstream, str], client: httpx.AsyncClient
) -> None:
    upstream, url = fake
    upstream.token = "t"
    digest = upstream.add_blob(b"x")
    up = Upstream(url, client, Metrics())
    # Learn the challenge first, then let ten requests race for the token.
    assert await _fetch(up, "a", digest) == b"x"
    upstream.token_requests.clear()
    bodies = await asyncio.gather(*(_fetch(up, "b", digest) for _ in range(10)))
    assert bodies == [b"x"] * 10
    assert len(upstream.token_requests) == 1


@pytest.mark.parametrize(
    ("status", "code", "mapped"),
    [
        (404, "BLOB_UNKNOWN", 404),
        (401, "UNAUTHORIZED", 401),
        (403, "DENIED", 403),
        (429, "TOOMANYREQUESTS", 429),
        (500, "UNAVAILABLE", 502),
        (503, "UNAVAILABLE", 502),
    ],
)
async def test_status_mapping(
    fake: tuple[FakeUpstream, str],
    client: httpx.AsyncClient,
    status: int,
    code: str,
    mapped: int,
) -> None:
    from fakes.upstream import Fault

    upstream, url = fake
    digest = upstream.add_blob(b"x")
    upstream.faults[digest] = Fault(status=status)
    up = Upstream(url, client, Metrics())
    with pytest.raises(UpstreamError) as err:
        await up.open_blob("a", Digest.parse(digest), 1 << 20)
    assert (err.value.code, err.value.status) == (code, mapped)


async def test_unreachable_upstream_is_502(client: httpx.AsyncClient) -> None:
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    up = Upstream(f"http://127.0.0.1:{port}", client, Metrics())
    with pytest.raises(UpstreamError) as err:
        await up.head_manifest("a", Reference(tag="x"), None)
    assert err.value.status == 502
    assert "unreachable" in err.value.message


async def test_silent_upstream_times_out_as_504() -> None:
    writers: list[asyncio.StreamWriter] = []

    async def accept_and_say_nothing(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        writers.append(w)

    server = await asyncio.start_server(accept_and_say_nothing, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    c = make_client(0.5, 0.3)
    try:
        up = Upstream(f"http://127.0.0.1:{port}", c, Metrics())
        with pytest.raises(UpstreamError) as err:
            await up.head_manifest("a", Reference(tag="x"), None)
        assert err.value.status == 504
    finally:
        await c.aclose()
        for w in writers:
            w.close()
        server.close()
        await server.wait_closed()


async def test_cold_concurrent_401s_cost_one_token_fetch(
    fake: tuple[FakeUpstream, str], client: httpx.AsyncClient
) -> None:
    upstream, url = fake
    upstream.token = "t"
    digest = upstream.add_blob(b"x")
    up = Upstream(url, client, Metrics())

    bodies = await asyncio.gather(*(_fetch(up, "a", digest) for _ in range(20)))
    assert bodies == [b"x"] * 20
    assert len(upstream.token_requests) == 1


async def test_challenge_from_a_redirect_target_is_not_followed(
    fake: tuple[FakeUpstream, str], client: httpx.AsyncClient
) -> None:
    from fakes.server import serve
    from fakes.upstream import Fault

    upstream, url = fake
    upstream.token = "t"
    evil, cdn = FakeUpstream(), FakeUpstream()
    async with serve(evil) as evil_url, serve(cdn) as cdn_url:
        cdn.token = "cdn-only"  # the CDN answers 401 pointing at a foreign realm
        cdn.realm = f"{evil_url}/token"
        plain = upstream.add_blob(b"plain")
        digest = upstream.add_blob(b"x")
        upstream.faults[digest] = Fault(redirect_to=cdn_url)
        up = Upstream(url, client, Metrics(), credentials=Credentials("user", "secret"))
        # Learn the upstream's own challenge first, so the CDN's 401 is a new one.
        assert await _fetch(up, "a", plain) == b"plain"
        with pytest.raises(UpstreamError) as err:
            await up.open_blob("a", Digest.parse(digest), 1 << 20)
        assert err.value.code == "UNAUTHORIZED"
        assert len(upstream.token_requests) == 1  # still the upstream's own token
    assert evil.token_requests == []
    assert all("authorization" not in r.headers for r in cdn.requests)


async def test_credentials_never_follow_a_downgrade_to_http() -> None:
    seen: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        if request.url.path == "/token":
            return httpx.Response(200, content=_streamed(b'{"token": "tok"}'))
        if request.url.scheme == "https" and "authorization" not in request.headers:
            return httpx.Response(
                401, headers={"www-authenticate": 'Bearer realm="https://reg.example/token"'}
            )
        if request.url.scheme == "https":
            return httpx.Response(307, headers={"location": "http://reg.example/plain"})
        return httpx.Response(200, content=_streamed(b"ok"))

    async with httpx.AsyncClient(transport=httpx.MockTransport(handler)) as c:
        up = Upstream("https://reg.example", c, Metrics(), credentials=Credentials("u", "p"))
        assert await _fetch(up, "a", ANY_DIGEST) == b"ok"
    plain = [r for r in seen if r.url.scheme == "http"]
    assert len(plain) == 1
    assert "authorization" not in plain[0].headers


async def test_no_basic_credentials_to_a_plain_http_realm_of_an_https_upstream() -> None:
    token_auth: list[str | None] = []

    def handler(request: httpx.Request) -> httpx.Response:
        if request.url.path == "/token":
            token_auth.append(request.headers.get("authorization"))
            return httpx.Response(200, content=_streamed(b'{"token": "tok"}'))
        if "authorization" not in request.headers:
            return httpx.Response(
                401, headers={"www-authenticate": 'Bearer realm="http://reg.example/token"'}
            )
        return httpx.Response(200, content=_streamed(b"ok"))

    async with httpx.AsyncClient(transport=httpx.MockTransport(handler)) as c:
        up = Upstream("https://reg.example", c, Metrics(), credentials=Credentials("u", "p"))
        # Neither credentials nor a token travel in clear text for an https upstream.
        with pytest.raises(UpstreamError, match="token realm"):
            await up.open_blob("a", Digest.parse(ANY_DIGEST), 1 << 20)
    assert token_auth == []


@pytest.mark.parametrize(
    ("token_status", "result"), [(200, "ok"), (401, "refused"), (503, "error")]
)
async def test_token_fetches_are_counted_once_by_result(token_status: int, result: str) -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        if request.url.path == "/token":
            return httpx.Response(token_status, content=_streamed(b'{"token": "tok"}'))
        if "authorization" not in request.headers:
            return httpx.Response(
                401, headers={"www-authenticate": 'Bearer realm="https://reg.example/token"'}
            )
        return httpx.Response(200, content=_streamed(b"ok"))

    metrics = Metrics()
    async with httpx.AsyncClient(transport=httpx.MockTransport(handler)) as c:
        up = Upstream("https://reg.example", c, metrics, credentials=Credentials("u", "p"))
        try:
            await _fetch(up, "a", ANY_DIGEST)
        except UpstreamError:
            assert result != "ok"
    counts = {
        r: metrics.registry.get_sample_value(
            "mirror_upstream_token_fetches_total", {"upstream": "reg.example", "result": r}
        )
        for r in ("ok", "refused", "error")
    }
    assert counts == {r: (1.0 if r == result else None) for r in counts}


async def test_a_refused_connection_says_so_and_failure_and_recovery_log_once(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="mirror.upstream")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    c = make_client(2.0, 2.0)
    up = Upstream(f"http://127.0.0.1:{port}", c, Metrics())

    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 200 OK\r\ndocker-content-digest: sha256:" + b"a" * 64)
        writer.write(b"\r\ncontent-length: 0\r\n\r\n")
        await writer.drain()
        writer.close()

    try:
        for _ in range(3):
            with pytest.raises(UpstreamError) as err:
                await up.head_manifest("a", Reference(tag="x"), None)
        # Not ConnectTimeout, not "ssl:default": what happened, and where.
        assert err.value.message == (
            f"upstream unreachable: cannot connect to 127.0.0.1:{port}: connection refused"
        )
        server = await asyncio.start_server(answer, "127.0.0.1", port)
        async with server:
            for _ in range(2):
                assert await up.head_manifest("a", Reference(tag="x"), None) is not None
    finally:
        await c.aclose()
    said = [r.getMessage() for r in caplog.records if r.name == "mirror.upstream"]
    assert said == [
        f"upstream 127.0.0.1:{port} (http://127.0.0.1:{port}) is failing: {err.value.message}",
        f"upstream 127.0.0.1:{port} answers again",
    ]


async def test_the_get_a_broken_head_falls_back_to_is_a_pull_the_budget_may_refuse(
    client: httpx.AsyncClient,
) -> None:
    """A HEAD is free, its GET fallback is not: with the pull limit spent (a 429 said
    so), the fallback is refused here, as any manifest GET is, not sent upstream."""
    body, digest = manifest("x")

    def answer(request: Request) -> Script:
        if request.method == "HEAD":  # an answer that cannot be parsed
            return Script([b"HTTP/1.1 2OO OK\r\ncontent-length: 0\r\n\r\n", None])
        return Script([manifest_response(body, digest)])

    raw = RawUpstream(answer)
    metrics = Metrics()
    metrics.add_upstream("hub")
    budget = Budget("hub", Reserve(), metrics, Clock())
    budget.observe(429, {"retry-after": "600"})
    async with raw.serve() as url:
        up = Upstream(url, client, metrics, name="hub", budget=budget)
        with pytest.raises(UpstreamError) as err:
            await up.head_manifest("a", Reference(tag="v1"), OCI)
    assert err.value.status == 429
    assert err.value.headers == {"Retry-After": "600"}
    assert raw.count("HEAD", "/manifests/v1") == 1
    assert raw.count("GET", "/manifests/v1") == 0
