"""Client authentication and authorization as clients see them: challenges, the
mirror's token realm, htpasswd, robot tokens, access rules (against the fake upstream)."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import time
from pathlib import Path
from typing import Any

import bcrypt
import httpx
import jwt
import pytest
from conftest import MirrorFactory, until
from fakes.clock import Clock
from fakes.upstream import FakeUpstream, sha256

from mirror.clientauth import AuthFailed as AuthFailedError
from mirror.clientauth import parse_scopes
from mirror.config import Settings
from mirror.mediatypes import DOCKER_MANIFEST_V2

MANIFEST = {"schemaVersion": 2, "mediaType": DOCKER_MANIFEST_V2, "layers": []}
ROBOT_TOKEN = "ci-robot-token-0123456789abcdef"


def htpasswd(path: Path, users: dict[str, str]) -> Path:
    lines = [
        f"{user}:{bcrypt.hashpw(pw.encode(), bcrypt.gensalt(rounds=4)).decode()}"
        for user, pw in users.items()
    ]
    path.write_text("\n".join(lines) + "\n")
    return path


def basic(user: str, password: str) -> dict[str, str]:
    return {"Authorization": "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()}


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def challenge(response: httpx.Response) -> dict[str, str]:
    scheme, _, params = response.headers["www-authenticate"].partition(" ")
    assert scheme == "Bearer"
    out = {}
    for part in params.split('",'):
        key, _, value = part.partition("=")
        out[key.strip()] = value.strip('"')
    return out


def error_code(response: httpx.Response) -> str:
    code: str = response.json()["errors"][0]["code"]
    return code


@pytest.fixture
def upstream(fake: tuple[FakeUpstream, str]) -> tuple[FakeUpstream, str]:
    up, url = fake
    up.add_manifest(DOCKER_MANIFEST_V2, MANIFEST, tag="1")
    return up, url


@pytest.fixture
def users(tmp_path: Path) -> Path:
    return htpasswd(tmp_path / "htpasswd", {"alice": "wonderland", "bob": "builder"})


def robot(**extra: Any) -> dict[str, Any]:
    return {"name": "ci", "sha256": hashlib.sha256(ROBOT_TOKEN.encode()).hexdigest(), **extra}


async def test_without_authentication_configured_everything_is_open(
    upstream: tuple[FakeUpstream, str], mirror: MirrorFactory
) -> None:
    _, url = upstream
    async with mirror(url) as m, httpx.AsyncClient(base_url=m.url) as c:
        assert (await c.get("/v2/")).status_code == 200
        # A client's own registry login (e.g. its Docker Hub one) is ignored, as before.
        r = await c.get("/v2/library/app/manifests/1", headers=basic("x", "y"))
        assert r.status_code == 200


async def test_challenge_names_the_realm_and_scope(
    upstream: tuple[FakeUpstream, str], mirror: MirrorFactory, users: Path
) -> None:
    up, url = upstream
    async with mirror(url, auth_htpasswd=users) as m, httpx.AsyncClient(base_url=m.url) as c:
        base = await c.get("/v2/")
        assert base.status_code == 401
        assert error_code(base) == "UNAUTHORIZED"
        port = m.url.rsplit(":", 1)[1]
        assert challenge(base) == {
            "realm": f"http://127.0.0.1:{port}/auth/token",
            "service": "mirror",
        }
        r = await c.get("/v2/library/app/manifests/1")
        assert r.status_code == 401
        assert challenge(r)["scope"] == "repository:library/app:pull"
        assert up.requests == []  # nothing went upstream for an unauthenticated client


async def test_basic_auth_with_htpasswd(
    upstream: tuple[FakeUpstream, str], mirror: MirrorFactory, users: Path
) -> None:
    _, url = upstream
    async with mirror(url, auth_htpasswd=users) as m, httpx.AsyncClient(base_url=m.url) as c:
        ok = await c.get("/v2/library/app/manifests/1", headers=basic("alice", "wonderland"))
        assert ok.status_code == 200
        assert ok.headers["docker-content-digest"] == sha256(json.dumps(MANIFEST).encode())
        bad = await c.get("/v2/library/app/manifests/1", headers=basic("alice", "nope"))
        assert bad.status_code == 401
        assert challenge(bad)["error"] == "invalid_client"
        assert (await c.get("/v2/", headers=basic("mallory", "x"))).status_code == 401
        assert m.metric("mirror_client_auth_total", method="basic", result="ok") == 1
        assert m.metric("mirror_client_auth_total", method="basic", result="invalid") == 2


async def test_token_flow_scopes_and_expiry(
    upstream: tuple[FakeUpstream, str], mirror: MirrorFactory, users: Path
) -> None:
    _, url = upstream
    clock = Clock(time.time())
    async with (
        mirror(url, auth_htpasswd=users, auth_token_ttl=60, clock=clock) as m,
        httpx.AsyncClient(base_url=m.url) as c,
    ):
        realm = challenge(await c.get("/v2/library/app/manifests/1"))["realm"]
        got = await c.get(
            realm,
            params={"service": "mirror", "scope": "repository:library/app:pull,push"},
            headers=basic("alice", "wonderland"),
        )
        assert got.status_code == 200
        assert got.headers["cache-control"] == "no-store"
        body = got.json()
        assert body["expires_in"] == 60 and body["token"] == body["access_token"]
        claims = jwt.decode(body["token"], options={"verify_signature": False})
        # Pull only, whatever else was asked: the mirror is read-only.
        assert claims["access"] == [
            {"type": "repository", "name": "library/app", "actions": ["pull"]}
        ]
        assert claims["sub"] == "alice"
        token = body["token"]
        r = await c.get("/v2/library/app/manifests/1", headers=bearer(token))
        assert r.status_code == 200
        other = await c.get("/v2/library/other/manifests/1", headers=bearer(token))
        assert other.status_code == 401
        assert challenge(other)["error"] == "insufficient_scope"
        assert challenge(other)["scope"] == "repository:library/other:pull"
        # Login (no scope): a token good for the base endpoint only.
        login = await c.get(realm, headers=basic("alice", "wonderland"))
        assert (await c.get("/v2/", headers=bearer(login.json()["token"]))).status_code == 200
        tampered = token[:-2] + ("AA" if not token.endswith("AA") else "BB")
        assert (await c.get("/v2/", headers=bearer(tampered))).status_code == 401
        clock.now += 61
        expired = await c.get("/v2/library/app/manifests/1", headers=bearer(token))
        assert expired.status_code == 401
        assert challenge(expired)["error"] == "invalid_token"
        assert "expired" in expired.json()["errors"][0]["message"]


async def test_token_realm_refuses_bad_credentials_and_takes_the_password_grant(
    upstream: tuple[FakeUpstream, str], mirror: MirrorFactory, users: Path
) -> None:
    _, url = upstream
    async with mirror(url, auth_htpasswd=users) as m, httpx.AsyncClient(base_url=m.url) as c:
        bad = await c.get("/auth/token", headers=basic("alice", "guess"))
        assert bad.status_code == 401
        assert bad.headers["www-authenticate"] == 'Basic realm="mirror"'
        assert error_code(bad) == "UNAUTHORIZED"
        none = await c.get("/auth/token")
        assert none.status_code == 401
        # containerd tries OAuth2's password grant first.
        form = {
            "grant_type": "password",
            "username": "bob",
            "password": "builder",
            "service": "mirror",
            "scope": "repository:library/app:pull",
            "client_id": "containerd-client",
        }
        posted = await c.post("/auth/token", data=form)
        assert posted.status_code == 200
        token = posted.json()["access_token"]
        r = await c.get("/v2/library/app/manifests/1", headers=bearer(token))
        assert r.status_code == 200
        refresh = await c.post("/auth/token", data={"grant_type": "refresh_token"})
        assert refresh.status_code == 400


async def test_htpasswd_changes_apply_at_once(
    upstream: tuple[FakeUpstream, str], mirror: MirrorFactory, users: Path
) -> None:
    _, url = upstream
    path = "/v2/library/app/manifests/1"
    async with mirror(url, auth_htpasswd=users) as m, httpx.AsyncClient(base_url=m.url) as c:
        scope = {"scope": "repository:library/app:pull"}
        bob = (await c.get("/auth/token", params=scope, headers=basic("bob", "builder"))).json()
        alice = (
            await c.get("/auth/token", params=scope, headers=basic("alice", "wonderland"))
        ).json()
        assert (await c.get(path, headers=bearer(bob["token"]))).status_code == 200
        # bob removed, alice's password changed, while the mirror runs.
        htpasswd(users, {"alice": "new-password"})
        assert (await c.get(path, headers=basic("bob", "builder"))).status_code == 401
        assert (await c.get(path, headers=bearer(bob["token"]))).status_code == 401
        again = await c.get("/auth/token", params=scope, headers=basic("bob", "builder"))
        assert again.status_code == 401
        assert (await c.get(path, headers=bearer(alice["token"]))).status_code == 401
        assert (await c.get(path, headers=basic("alice", "wonderland"))).status_code == 401
        assert (await c.get(path, headers=basic("alice", "new-password"))).status_code == 200


async def test_robot_tokens(
    upstream: tuple[FakeUpstream, str], mirror: MirrorFactory, tmp_path: Path
) -> None:
    _, url = upstream
    path = "/v2/library/app/manifests/1"
    async with mirror(url, auth_tokens=[robot()]) as m, httpx.AsyncClient(base_url=m.url) as c:
        assert (await c.get(path)).status_code == 401
        assert (await c.get(path, headers=bearer(ROBOT_TOKEN))).status_code == 200
        assert (await c.get(path, headers=bearer(ROBOT_TOKEN + "x"))).status_code == 401
        # As a Basic login (docker login -u ci), also at the realm.
        assert (await c.get(path, headers=basic("ci", ROBOT_TOKEN))).status_code == 200
        got = await c.get("/auth/token", headers=basic("ci", ROBOT_TOKEN))
        assert got.status_code == 200
        assert (await c.get("/v2/", headers=bearer(got.json()["token"]))).status_code == 200


async def test_access_rules(
    upstream: tuple[FakeUpstream, str], mirror: MirrorFactory, users: Path
) -> None:
    up, url = upstream
    up.add_manifest(DOCKER_MANIFEST_V2, MANIFEST, tag="2")
    rules = [
        {"users": ["alice"], "repositories": ["library/*"]},
        {"groups": ["builders"], "repositories": ["team/*"]},
        {"anonymous": True, "repositories": ["public/*"]},
    ]
    settings: dict[str, Any] = {
        "auth_htpasswd": users,
        "auth_anonymous": True,
        "auth_groups": {"builders": ["bob", "ci"]},
        "auth_tokens": [robot()],
        "access": rules,
    }
    async with mirror(url, **settings) as m, httpx.AsyncClient(base_url=m.url) as c:
        alice, bob = basic("alice", "wonderland"), basic("bob", "builder")
        assert (await c.get("/v2/library/app/manifests/1", headers=alice)).status_code == 200
        denied = await c.get("/v2/library/app/manifests/1", headers=bob)
        assert denied.status_code == 403
        assert error_code(denied) == "DENIED"
        assert (await c.get("/v2/team/app/manifests/1", headers=bob)).status_code == 200
        # Groups reach robots too.
        assert (
            await c.get("/v2/team/x/manifests/1", headers=bearer(ROBOT_TOKEN))
        ).status_code == 200
        assert (await c.get("/v2/public/app/manifests/1")).status_code == 200
        # Anonymous and not allowed: told to log in, not refused.
        anon = await c.get("/v2/team/app/manifests/1")
        assert anon.status_code == 401
        assert challenge(anon)["scope"] == "repository:team/app:pull"
        # A cached manifest is no exception: hits are authorized too.
        cached = await c.get("/v2/library/app/manifests/1", headers=bob)
        assert cached.status_code == 403 and b"schemaVersion" not in cached.content
        by_digest = sha256(json.dumps(MANIFEST).encode())
        assert (
            await c.get(f"/v2/library/app/manifests/{by_digest}", headers=bob)
        ).status_code == 403
        assert m.metric("mirror_client_auth_total", method="user", result="denied") == 3
        # Nothing went upstream for the refused requests.
        assert up.count("GET", "/library/app/manifests/1") == 1


async def test_anonymous_base_endpoint_with_rules(
    upstream: tuple[FakeUpstream, str], mirror: MirrorFactory, users: Path
) -> None:
    _, url = upstream
    rules = [{"users": ["*"]}]
    async with (
        mirror(url, auth_htpasswd=users, auth_anonymous=True, access=rules) as m,
        httpx.AsyncClient(base_url=m.url) as c,
    ):
        # Anonymous clients may pull nothing: `docker login` must meet a challenge.
        assert (await c.get("/v2/")).status_code == 401
        assert (await c.get("/v2/", headers=basic("bob", "builder"))).status_code == 200


async def test_access_log_names_the_user(
    upstream: tuple[FakeUpstream, str],
    mirror: MirrorFactory,
    users: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    _, url = upstream
    async with mirror(url, auth_htpasswd=users) as m, httpx.AsyncClient(base_url=m.url) as c:
        with caplog.at_level("INFO", logger="mirror.access"):
            await c.get("/v2/library/app/manifests/1", headers=basic("alice", "wonderland"))
    [line] = [r.getMessage() for r in caplog.records if r.name == "mirror.access"]
    assert " user=alice " in line
    assert "wonderland" not in caplog.text


def test_settings_check_rules() -> None:
    with pytest.raises(ValueError, match=r"upstream 'ghcr\.io', which is not configured"):
        Settings(access=[{"users": ["a"], "upstreams": ["ghcr.io"]}])
    with pytest.raises(ValueError, match="names users, groups, or anonymous"):
        Settings(access=[{"repositories": ["x/*"]}])
    with pytest.raises(ValueError, match="group 'ops', not in auth_groups"):
        Settings(access=[{"groups": ["ops"]}])
    with pytest.raises(ValueError, match="64 hex digits"):
        Settings(auth_tokens=[{"name": "ci", "sha256": "abc"}])
    assert Settings().anonymous_allowed()
    assert not Settings(auth_tokens=[robot()]).anonymous_allowed()


def test_scopes() -> None:
    assert parse_scopes(
        [
            "repository:library/a:pull",
            "repository:b:push",
            "registry:catalog:*",
            "repository:host:5000/c:pull,push repository:d:pull",
        ]
    ) == ["library/a", "host:5000/c", "d"]


def test_cli_makes_htpasswd_entries_and_robot_tokens(tmp_path: Path) -> None:
    from click.testing import CliRunner

    from mirror.cli import main
    from mirror.clientauth import Htpasswd

    runner = CliRunner()
    path = tmp_path / "htpasswd"
    args = ["auth", "htpasswd", "alice", "--file", str(path), "--cost", "4"]
    assert runner.invoke(main, args, input="first\n").output == f"added alice in {path}\n"
    result = runner.invoke(main, args, input="second\n")
    assert result.output == f"updated alice in {path}\n"
    entry = Htpasswd(path).entry("alice")
    assert entry is not None and bcrypt.checkpw(b"second", entry)
    assert len(path.read_text().splitlines()) == 1

    made = runner.invoke(main, ["auth", "token", "ci", "--group", "builders"])
    assert made.exit_code == 0
    token = made.stdout.strip()
    snippet = made.stderr.split("add to the settings file:\n", 1)[1]
    import yaml

    [entry_] = yaml.safe_load(snippet)["auth_tokens"]
    assert entry_ == {
        "name": "ci",
        "sha256": hashlib.sha256(token.encode()).hexdigest(),
        "groups": ["builders"],
    }
    Settings(auth_tokens=[entry_])  # the snippet is valid settings as printed


async def test_replicas_sharing_a_peer_secret_accept_each_others_tokens(tmp_path: Path) -> None:
    """Behind one Service a token from one replica must work at every other: with
    store s3 the key derives from the peer secret they share; a key file wins."""
    from mirror.access import Access
    from mirror.clientauth import ClientAuth, token_key
    from mirror.identity import Principal
    from mirror.metrics import Metrics

    settings = Settings(auth_tokens=[robot()], cache_dir=tmp_path)

    def replica(secret: str | None) -> ClientAuth:
        key = token_key(settings, secret)
        return ClientAuth(settings, Access([], {}), Metrics(), key=key)

    a, b = replica("p" * 32), replica("p" * 32)
    grant = a.realm.issue(Principal("ci", "10.0.0.1"), "robot", robot()["sha256"][:16], ["x/y"])
    who = await b.authenticate(f"Bearer {grant.token}", "10.0.0.2", None)
    assert (who.user, who.repositories) == ("ci", frozenset({"x/y"}))
    with pytest.raises(AuthFailedError):
        await replica("q" * 32).authenticate(f"Bearer {grant.token}", "10.0.0.2", None)
    # Without a shared secret each process has its own key.
    assert token_key(settings, None) != token_key(settings, None)
    keyfile = tmp_path / "key"
    keyfile.write_text("k" * 40)
    keyed = Settings(auth_token_key_file=keyfile, cache_dir=tmp_path)
    assert token_key(keyed, "p" * 32) == b"k" * 40
    keyfile.write_text("short")
    with pytest.raises(ValueError, match="32 bytes or more"):
        token_key(keyed, None)


async def test_per_client_limits_count_by_user_not_by_address(
    upstream: tuple[FakeUpstream, str], mirror: MirrorFactory, users: Path
) -> None:
    """Behind one NAT address, alice exhausting her manifest budget leaves bob's intact."""
    up, url = upstream
    for tag in ("2", "3", "4"):
        up.add_manifest(DOCKER_MANIFEST_V2, {**MANIFEST, "annotations": {"t": tag}}, tag=tag)
    settings: dict[str, Any] = {"auth_htpasswd": users, "client_manifest_requests_per_minute": 2}
    async with mirror(url, **settings) as m, httpx.AsyncClient(base_url=m.url) as c:
        alice, bob = basic("alice", "wonderland"), basic("bob", "builder")
        for tag in ("1", "2"):
            assert (
                await c.get(f"/v2/library/app/manifests/{tag}", headers=alice)
            ).status_code == 200
        refused = await c.get("/v2/library/app/manifests/3", headers=alice)
        assert refused.status_code == 429
        assert error_code(refused) == "TOOMANYREQUESTS"
        assert int(refused.headers["retry-after"]) >= 1
        assert up.count("GET", "/library/app/manifests/3") == 0
        # Same address, another user: a budget of its own.
        assert (await c.get("/v2/library/app/manifests/3", headers=bob)).status_code == 200
        assert (await c.get("/v2/library/app/manifests/4", headers=bob)).status_code == 200
        # And alice's hits are never limited.
        assert (await c.get("/v2/library/app/manifests/1", headers=alice)).status_code == 200


async def test_a_flood_of_logins_is_answered_429_past_the_queue(
    upstream: tuple[FakeUpstream, str],
    mirror: MirrorFactory,
    users: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """bcrypt runs two at a time; logins queued past the bound get 429 at once instead of
    making every new user's first login wait behind a password-guessing flood."""
    import threading

    import mirror.clientauth as clientauth

    monkeypatch.setattr(clientauth, "MAX_WAITING_CHECKS", 1)
    release, started = threading.Event(), threading.Semaphore(0)
    real_checkpw = bcrypt.checkpw

    def held_checkpw(password: bytes, hashed: bytes) -> bool:
        started.release()
        release.wait(10)
        return bool(real_checkpw(password, hashed))

    monkeypatch.setattr(bcrypt, "checkpw", held_checkpw)
    path = "/v2/library/app/manifests/1"
    async with (
        mirror(upstream[1], auth_htpasswd=users) as m,
        httpx.AsyncClient(base_url=m.url, timeout=20) as c,
    ):
        running = [
            asyncio.create_task(c.get(path, headers=basic("alice", f"guess{i}"))) for i in range(2)
        ]
        for _ in range(2):  # both checks are in bcrypt now
            assert await asyncio.to_thread(started.acquire, True, 10)
        queued = asyncio.create_task(c.get(path, headers=basic("bob", "guess")))
        await until(lambda: m.app.state.components.auth._waiting == 1, "a queued login")
        flooded = await c.get(path, headers=basic("bob", "another guess"))
        assert flooded.status_code == 429
        assert error_code(flooded) == "TOOMANYREQUESTS"
        assert flooded.headers["retry-after"] == "1"
        release.set()
        answers = await asyncio.gather(*running, queued)
        assert [a.status_code for a in answers] == [401, 401, 401]
        # A right password after the flood is checked and accepted as usual.
        ok = await c.get(path, headers=basic("alice", "wonderland"))
        assert ok.status_code == 200
