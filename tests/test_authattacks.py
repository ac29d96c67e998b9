"""A hostile client against client authentication (mirror.clientauth, mirror.routes):
forged tokens, odd Basic credentials, scope and path tricks, header injection,
secrets in logs and metrics. Every answer is a 401/403/404 in the OCI envelope,
never a 500, and never bytes the client may not have."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import logging
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import bcrypt
import httpx
import jwt
import pytest
from conftest import MirrorFactory
from fakes.server import serve
from fakes.upstream import FakeUpstream

from mirror.mediatypes import DOCKER_MANIFEST_V2

MANIFEST = {"schemaVersion": 2, "mediaType": DOCKER_MANIFEST_V2, "layers": []}
PATH = "/v2/library/app/manifests/1"
KEY = b"k" * 64
LONG = "correct horse battery staple " * 4  # 116 bytes: past bcrypt's 72


def _htpasswd(path: Path, lines: list[str]) -> Path:
    path.write_text("\n".join(lines) + "\n")
    return path


def _entry(user: str, password: str) -> str:
    # As `htpasswd -B` does: bcrypt reads the first 72 bytes of a password.
    hashed = bcrypt.hashpw(password.encode()[:72], bcrypt.gensalt(rounds=4)).decode()
    return f"{user}:{hashed}"


def _basic(raw: bytes) -> dict[str, str]:
    return {"Authorization": "Basic " + base64.b64encode(raw).decode()}


def _code(r: httpx.Response) -> str:
    code: str = r.json()["errors"][0]["code"]
    return code


@pytest.fixture
def upstream(fake: tuple[FakeUpstream, str]) -> tuple[FakeUpstream, str]:
    up, url = fake
    up.add_manifest(DOCKER_MANIFEST_V2, MANIFEST, tag="1")
    return up, url


@pytest.fixture
def users(tmp_path: Path) -> Path:
    return _htpasswd(
        tmp_path / "htpasswd",
        [_entry("alice", "wonderland"), _entry("long", LONG), "broken:$2y$05$not-a-bcrypt-hash"],
    )


@pytest.fixture
def keyfile(tmp_path: Path) -> Path:
    path = tmp_path / "token.key"
    path.write_bytes(KEY)
    return path


# -- Basic credentials -----------------------------------------------------------------


async def test_a_password_longer_than_72_bytes_is_checked_as_htpasswd_made_it(
    upstream: tuple[FakeUpstream, str], mirror: MirrorFactory, users: Path
) -> None:
    """bcrypt 5 refuses passwords past 72 bytes (ValueError) where htpasswd, and every
    bcrypt before it, used the first 72: a long password must be a login, not a 500."""
    _, url = upstream
    async with mirror(url, auth_htpasswd=users) as m, httpx.AsyncClient(base_url=m.url) as c:
        assert (await c.get(PATH, headers=_basic(f"long:{LONG}".encode()))).status_code == 200
        wrong = await c.get(PATH, headers=_basic(b"alice:" + b"x" * 100))
        assert (wrong.status_code, _code(wrong)) == (401, "UNAUTHORIZED")
        realm = await c.get("/auth/token", headers=_basic(b"alice:" + b"x" * 100))
        assert realm.status_code == 401


async def test_a_malformed_htpasswd_entry_is_a_refused_login_not_a_500(
    upstream: tuple[FakeUpstream, str], mirror: MirrorFactory, users: Path
) -> None:
    _, url = upstream
    async with mirror(url, auth_htpasswd=users) as m, httpx.AsyncClient(base_url=m.url) as c:
        r = await c.get(PATH, headers=_basic(b"broken:anything"))
        assert (r.status_code, _code(r)) == (401, "UNAUTHORIZED")
        # The good entries still work.
        assert (await c.get(PATH, headers=_basic(b"alice:wonderland"))).status_code == 200


async def test_an_unknown_user_costs_a_bcrypt_check_like_a_wrong_password(
    upstream: tuple[FakeUpstream, str],
    mirror: MirrorFactory,
    users: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Answering an unknown user at once, and a known one after a bcrypt check, would
    tell by timing which user names exist."""
    _, url = upstream
    checks: list[bytes] = []
    real = bcrypt.checkpw

    def checkpw(password: bytes, hashed: bytes) -> bool:
        checks.append(hashed)
        return real(password, hashed)

    monkeypatch.setattr("mirror.clientauth.bcrypt.checkpw", checkpw)
    async with mirror(url, auth_htpasswd=users) as m, httpx.AsyncClient(base_url=m.url) as c:
        for user in (b"alice", b"mallory"):
            r = await c.get(PATH, headers=_basic(user + b":guess"))
            assert r.status_code == 401
    assert len(checks) == 2
    assert checks[0][:7] == checks[1][:7]  # the same algorithm and cost


ODD_BASIC = {
    "not UTF-8": "Basic " + base64.b64encode(b"alice:\xff\xfe").decode(),
    "no colon": "Basic " + base64.b64encode(b"alicewonderland").decode(),
    "empty user": "Basic " + base64.b64encode(b":wonderland").decode(),
    "empty password": "Basic " + base64.b64encode(b"alice:").decode(),
    "not base64": "Basic !!!!",
    "nothing": "Basic",
    "NUL in password": "Basic " + base64.b64encode(b"alice:wonder\x00land").decode(),
    "user with colon": "Basic " + base64.b64encode(b"ali:ce:wonderland").decode(),
    "huge": "Basic " + base64.b64encode(b"alice:" + b"y" * 6000).decode(),
    "other scheme": "Digest username=alice",
    "bearer garbage": "Bearer not.a.token",
    "bearer empty": "Bearer",
}


@pytest.mark.parametrize("header", list(ODD_BASIC.values()), ids=list(ODD_BASIC))
async def test_odd_credentials_are_a_401_never_a_500(
    upstream: tuple[FakeUpstream, str], mirror: MirrorFactory, users: Path, header: str
) -> None:
    up, url = upstream
    async with mirror(url, auth_htpasswd=users) as m, httpx.AsyncClient(base_url=m.url) as c:
        for path in (PATH, "/v2/", "/auth/token"):
            r = await c.get(path, headers={"Authorization": header})
            assert (r.status_code, _code(r)) == (401, "UNAUTHORIZED"), path
        assert up.requests == []


async def test_scheme_case_and_spaces_are_tolerated(
    upstream: tuple[FakeUpstream, str], mirror: MirrorFactory, users: Path
) -> None:
    _, url = upstream
    value = base64.b64encode(b"alice:wonderland").decode()
    async with mirror(url, auth_htpasswd=users) as m, httpx.AsyncClient(base_url=m.url) as c:
        for header in (f"basic {value}", f"BASIC   {value}"):
            assert (await c.get(PATH, headers={"Authorization": header})).status_code == 200


# -- forged tokens ---------------------------------------------------------------------


def _claims(**over: Any) -> dict[str, Any]:
    now = int(time.time())
    claims: dict[str, Any] = {
        "iss": "mirror",
        "sub": "alice",
        "aud": "mirror",
        "iat": now,
        "nbf": now - 5,
        "exp": now + 300,
        "access": [{"type": "repository", "name": "library/app", "actions": ["pull"]}],
        "src": "certificate",  # the one source without a credential to revoke
        "cred": "",
    }
    claims.update(over)
    return {k: v for k, v in claims.items() if v is not None}


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _none_token(claims: dict[str, Any]) -> str:
    head = {"alg": "none", "typ": "JWT"}
    return f"{_b64(json.dumps(head).encode())}.{_b64(json.dumps(claims).encode())}."


def _empty_key_token(claims: dict[str, Any]) -> str:
    # PyJWT will not sign with an empty key: by hand, as an attacker would.
    head = {"alg": "HS256", "typ": "JWT"}
    signed = f"{_b64(json.dumps(head).encode())}.{_b64(json.dumps(claims).encode())}"
    return f"{signed}.{_b64(hmac.new(b'', signed.encode(), hashlib.sha256).digest())}"


FORGED = {
    "alg none": lambda: _none_token(_claims()),
    "HS256 empty key": lambda: _empty_key_token(_claims()),
    "HS256 other key": lambda: jwt.encode(_claims(), b"o" * 40, algorithm="HS256"),
    "HS512 right key": lambda: jwt.encode(_claims(), KEY, algorithm="HS512"),
    "other audience": lambda: jwt.encode(_claims(aud="other"), KEY, algorithm="HS256"),
    "other issuer": lambda: jwt.encode(_claims(iss="hub"), KEY, algorithm="HS256"),
    "no exp": lambda: jwt.encode(_claims(exp=None), KEY, algorithm="HS256"),
    "no access": lambda: jwt.encode(_claims(access=None), KEY, algorithm="HS256"),
    "expired": lambda: jwt.encode(_claims(exp=int(time.time()) - 1), KEY, algorithm="HS256"),
    "not yet": lambda: jwt.encode(_claims(nbf=int(time.time()) + 60), KEY, algorithm="HS256"),
    "removed user": lambda: jwt.encode(
        _claims(sub="mallory", src="htpasswd", cred="0" * 16), KEY, algorithm="HS256"
    ),
    "another repository": lambda: jwt.encode(
        _claims(access=[{"type": "repository", "name": "library/other", "actions": ["pull"]}]),
        KEY,
        algorithm="HS256",
    ),
    "push only": lambda: jwt.encode(
        _claims(access=[{"type": "repository", "name": "library/app", "actions": ["push"]}]),
        KEY,
        algorithm="HS256",
    ),
}


@pytest.mark.parametrize("make", list(FORGED.values()), ids=list(FORGED))
async def test_forged_and_foreign_tokens_are_refused(
    upstream: tuple[FakeUpstream, str],
    mirror: MirrorFactory,
    users: Path,
    keyfile: Path,
    make: Any,
) -> None:
    _, url = upstream
    settings = {"auth_htpasswd": users, "auth_token_key_file": keyfile}
    async with mirror(url, **settings) as m, httpx.AsyncClient(base_url=m.url) as c:
        r = await c.get(PATH, headers={"Authorization": f"Bearer {make()}"})
        assert (r.status_code, _code(r)) == (401, "UNAUTHORIZED")
        assert b"schemaVersion" not in r.content
        # The control: the same claims, rightly signed, are accepted.
        good = jwt.encode(_claims(), KEY, algorithm="HS256")
        assert (await c.get(PATH, headers={"Authorization": f"Bearer {good}"})).status_code == 200


# -- the realm's scopes ----------------------------------------------------------------


@pytest.mark.parametrize(
    "scope",
    ["repository:library/app:pull:extra", "repository:*:pull", "registry:catalog:*", "a b c"],
)
async def test_odd_scopes_grant_nothing_else(
    upstream: tuple[FakeUpstream, str], mirror: MirrorFactory, users: Path, scope: str
) -> None:
    _, url = upstream
    async with mirror(url, auth_htpasswd=users) as m, httpx.AsyncClient(base_url=m.url) as c:
        got = await c.get(
            "/auth/token", params={"scope": scope}, headers=_basic(b"alice:wonderland")
        )
        assert got.status_code == 200
        token = got.json()["token"]
        r = await c.get(PATH, headers={"Authorization": f"Bearer {token}"})
        assert r.status_code == 401


# -- challenges and leaks --------------------------------------------------------------


@pytest.mark.parametrize(
    "host", ['evil", error="x', "a.b,realm=x", "evil.example\tx", "ex ample", "[::1"]
)
async def test_a_hostile_host_header_never_reaches_the_challenge(
    upstream: tuple[FakeUpstream, str], mirror: MirrorFactory, users: Path, host: str
) -> None:
    _, url = upstream
    async with mirror(url, auth_htpasswd=users) as m, httpx.AsyncClient(base_url=m.url) as c:
        r = await c.get(PATH, headers={"Host": host})
        assert r.status_code == 401
        port = m.url.rsplit(":", 1)[1]
        assert r.headers["www-authenticate"].startswith(
            f'Bearer realm="http://127.0.0.1:{port}/auth/token",service="mirror",'
        )
        assert r.headers["www-authenticate"].count('"') == 6


async def test_secrets_never_reach_the_logs_or_metrics(
    upstream: tuple[FakeUpstream, str],
    mirror: MirrorFactory,
    users: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    _, url = upstream
    caplog.set_level(logging.DEBUG)
    async with mirror(url, auth_htpasswd=users) as m, httpx.AsyncClient(base_url=m.url) as c:
        got = await c.get("/auth/token", headers=_basic(b"alice:wonderland"))
        token = got.json()["token"]
        await c.get("/v2/", headers={"Authorization": f"Bearer {token}"})
        await c.get(PATH, headers=_basic(b"alice:s3cret-guess"))
        await c.post(
            "/auth/token",
            data={"grant_type": "password", "username": "alice", "password": "s3cret-form"},
        )
        metrics = (await c.get("/metrics")).text
    logged = "\n".join(r.getMessage() + repr(r.__dict__) for r in caplog.records)
    for secret in ("wonderland", "s3cret-guess", "s3cret-form", token, token.split(".")[2]):
        assert secret not in logged
        assert secret not in metrics
    assert "alice" not in metrics  # no per-user labels


async def test_the_peer_endpoint_needs_the_peer_secret(
    upstream: tuple[FakeUpstream, str], mirror: MirrorFactory
) -> None:
    up, url = upstream
    digest = up.add_blob(b"private bytes" * 100)
    async with mirror(url) as m, httpx.AsyncClient(base_url=m.url) as c:
        assert (await c.get(f"/v2/a/blobs/{digest}")).status_code == 200  # now cached
        for headers in ({}, {"Authorization": "Bearer"}, {"Authorization": "Bearer x"}):
            r = await c.get(f"/_mirror/peer/blobs/{digest}", headers=headers)
            assert (r.status_code, _code(r)) == (403, "DENIED")
            assert b"private bytes" not in r.content


# -- another upstream's content ----------------------------------------------------------

PRIVATE_LAYER = b"a private layer of regb " * 2048


@pytest.fixture
async def two() -> AsyncIterator[tuple[FakeUpstream, str, FakeUpstream, str]]:
    a, b = FakeUpstream(), FakeUpstream()
    async with serve(a) as url_a, serve(b) as url_b:
        yield a, url_a, b, url_b


async def test_a_user_allowed_one_upstream_reaches_no_other_by_prefix_ns_or_digest(
    two: tuple[FakeUpstream, str, FakeUpstream, str], mirror: MirrorFactory, users: Path
) -> None:
    a, url_a, b, url_b = two
    layer = b.add_blob(PRIVATE_LAYER)
    manifest = b.add_manifest(DOCKER_MANIFEST_V2, MANIFEST, tag="1")
    settings: dict[str, Any] = {
        "upstreams": [
            {"name": "rega.test", "url": url_a},
            {"name": "regb.test:5000", "url": url_b, "path_prefix": "regb"},
        ],
        "default_upstream": "rega.test",
        "auth_htpasswd": _htpasswd(
            users, [_entry("alice", "wonderland"), _entry("bob", "builder")]
        ),
        "access": [
            {"users": ["alice"]},
            {"users": ["bob"], "upstreams": ["rega.test"]},
        ],
    }
    alice, bob = _basic(b"alice:wonderland"), _basic(b"bob:builder")
    async with mirror(None, **settings) as m, httpx.AsyncClient(base_url=m.url) as c:
        # alice caches regb's private layer and manifest.
        got = await c.get(f"/v2/regb/team/app/blobs/{layer}", headers=alice)
        assert got.content == PRIVATE_LAYER
        assert (await c.get("/v2/regb/team/app/manifests/1", headers=alice)).status_code == 200
        b_requests = len(b.requests)
        for path, params in [
            (f"/v2/regb/team/app/blobs/{layer}", {}),
            (f"/v2/team/app/blobs/{layer}", {"ns": "regb.test:5000"}),
            (f"/v2/team/app/blobs/{layer}", {"ns": "REGB.test:5000"}),
            (f"/v2/team/app/blobs/{layer}", {"ns": "regb.test:5000 "}),
            ("/v2/regb/team/app/manifests/1", {}),
            ("/v2/regb/team/app/tags/list", {}),
            (f"/v2/team/app/manifests/{manifest}", {"ns": "regb.test:5000"}),
        ]:
            for method in ("GET", "HEAD"):
                r = await c.request(method, path, params=params, headers=bob)
                assert r.status_code == 403, (method, path, params)
                assert PRIVATE_LAYER[:32] not in r.content
        assert len(b.requests) == b_requests  # nothing asked of regb for bob
        # Through the upstream bob may use, by digest: rega is asked, and says no.
        for path in (f"/v2/team/app/blobs/{layer}", f"/v2/team/app/manifests/{manifest}"):
            for method in ("GET", "HEAD"):
                r = await c.request(method, path, headers=bob | {"Range": "bytes=0-9"})
                assert r.status_code == 404, (method, path)
                assert PRIVATE_LAYER[:10] not in r.content
        assert a.count("HEAD", f"/v2/team/app/blobs/{layer}") == 2
        assert not any(r.method == "GET" and layer in r.path for r in a.requests)
