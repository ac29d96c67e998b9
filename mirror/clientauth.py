"""Client authentication: who a request comes from, and the mirror's own token realm.

Three kinds of credentials, each checked here and nowhere else:

- an htpasswd file of bcrypt entries (Basic auth), re-read when it changes, so a user
  removed from it is refused at once;
- robots' static tokens, configured by SHA-256 (`Authorization: Bearer <token>`, or as
  the password of a Basic login under the robot's name);
- the realm's own signed tokens. A request without credentials is answered 401 with
  `WWW-Authenticate: Bearer realm=".../auth/token",service=...,scope=...`; docker,
  containerd, podman and skopeo then fetch a token there with the credentials they
  already store, as they do with Docker Hub. Tokens are short-lived HS256 JWTs scoped to
  repositories, and carry a fingerprint of the credential they were issued for: a
  removed user or a changed password revokes them.

A verified client certificate (mTLS) names its user by its subject's CN.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import datetime as dt
import hashlib
import hmac
import logging
import os
import re
import secrets
import time
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import bcrypt
import jwt

from mirror.access import Access
from mirror.config import Settings, StaticToken
from mirror.errors import RegistryError
from mirror.identity import Principal
from mirror.metrics import Metrics

log = logging.getLogger(__name__)

ISSUER = "mirror"
ALGORITHM = "HS256"
# bcrypt costs ~50-250 ms of CPU per check: at most this many run at once, so a
# password-guessing client cannot take every core.
MAX_CONCURRENT_CHECKS = 2
# Checks queued behind those: past this many, a login is answered 429 at once rather
# than queued (a flood of bad logins would otherwise make every new user's first login
# wait behind it; users already verified are never queued).
MAX_WAITING_CHECKS = 64
MAX_VERIFIED = 4096
# A whole bcrypt entry (modular crypt format): anything else makes bcrypt.checkpw
# raise, which would answer that user's every login with a 500.
_BCRYPT_RE = re.compile(r"\$2[aby]\$(0[4-9]|[12][0-9]|3[01])\$[./A-Za-z0-9]{53}")
# bcrypt reads at most this many bytes of a password. htpasswd (and bcrypt before 5.0)
# silently used the first 72; bcrypt 5 raises instead, so they are cut here.
_BCRYPT_MAX = 72
_NAME_RE = re.compile(r"[^:\s]{1,256}")


class AuthFailed(Exception):
    """Credentials that do not check out; `error` is the RFC 6750 error code."""

    def __init__(self, message: str, error: str = "invalid_token") -> None:
        super().__init__(message)
        self.message = message
        self.error = error


def _fingerprint(secret: str | bytes) -> str:
    data = secret.encode() if isinstance(secret, str) else secret
    return hashlib.sha256(data).hexdigest()[:16]


class Htpasswd:
    """An htpasswd file of bcrypt entries, re-read whenever it changes on disk."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._stamp: tuple[int, int, int] | None = None
        self._entries: dict[str, bytes] = {}
        self._told: str | None = None
        self.load(strict=True)

    def load(self, *, strict: bool = False) -> None:
        """Re-read the file if it changed. A file that cannot be read keeps the last
        good entries (a Secret being swapped must not lock everyone out), said once."""
        try:
            st = os.stat(self.path)
            stamp = (st.st_mtime_ns, st.st_size, st.st_ino)
            if stamp == self._stamp:
                return
            text = self.path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            reason = exc.strerror if isinstance(exc, OSError) else "not UTF-8 text"
            message = f"cannot read auth_htpasswd {self.path}: {reason}"
            if strict:
                raise ValueError(message) from None
            if self._told != message:
                self._told = message
                log.error("%s; keeping the users read before", message)
            return
        self._told = None
        entries: dict[str, bytes] = {}
        for number, line in enumerate(text.splitlines(), 1):
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            user, sep, hashed = line.partition(":")
            if not sep or not _NAME_RE.fullmatch(user) or not _BCRYPT_RE.fullmatch(hashed):
                # MD5, SHA-1 and crypt entries are weak or unsalted: refused, by line.
                log.warning(
                    "auth_htpasswd %s line %d ignored: only bcrypt entries (htpasswd -B)",
                    self.path,
                    number,
                )
                continue
            entries[user] = hashed.encode()
        self._stamp = stamp
        self._entries = entries
        log.info("auth_htpasswd %s: %d users", self.path, len(entries))

    def entry(self, user: str) -> bytes | None:
        self.load()
        return self._entries.get(user)

    def decoy(self) -> bytes | None:
        """Some user's entry, to check an unknown user's password against: the same
        bcrypt cost, so the answer's time does not tell which user names exist."""
        return next(iter(self._entries.values()), None)


@dataclass(frozen=True, slots=True)
class Grant:
    """A token request's answer."""

    token: str
    expires_in: int
    issued_at: str


class Realm:
    """Signs and verifies the realm's tokens."""

    def __init__(self, key: bytes, ttl: float, service: str, clock: Callable[[], float]) -> None:
        self._key = key
        self._ttl = int(ttl)
        self._service = service
        self._clock = clock
        # Tokens that verified, with their claims: a client sends the same token with
        # every request of a pull, and a full decode costs ~0.2 ms of CPU (bench/auth.py).
        # Expiry is still checked on every use; revocation is the caller's, every time.
        self._verified: dict[str, dict[str, Any]] = {}

    def issue(self, who: Principal, source: str, cred: str, repositories: Iterable[str]) -> Grant:
        now = int(self._clock())
        claims = {
            "iss": ISSUER,
            "sub": who.user or "",
            "aud": self._service,
            "iat": now,
            "nbf": now - 5,  # replicas' clocks differ a little
            "exp": now + self._ttl,
            "jti": uuid.uuid4().hex,
            "access": [
                {"type": "repository", "name": name, "actions": ["pull"]}
                for name in sorted(set(repositories))
            ],
            "src": source,
            "cred": cred,
        }
        token = jwt.encode(claims, self._key, algorithm=ALGORITHM)
        issued = dt.datetime.fromtimestamp(now, dt.UTC).isoformat().replace("+00:00", "Z")
        return Grant(token, self._ttl, issued)

    def verify(self, token: str) -> dict[str, Any]:
        claims = self._verified.get(token)
        if claims is None:
            claims = self._decode(token)
            if len(self._verified) >= MAX_VERIFIED:
                self._verified.clear()
            self._verified[token] = claims
        if claims["exp"] <= self._clock():
            self._verified.pop(token, None)
            raise AuthFailed("the token has expired")
        return claims

    def _decode(self, token: str) -> dict[str, Any]:
        try:
            claims: dict[str, Any] = jwt.decode(
                token,
                self._key,
                algorithms=[ALGORITHM],
                audience=self._service,
                issuer=ISSUER,
                options={"require": ["exp", "iat", "sub", "access", "src", "cred"]},
                leeway=0,
            )
        except jwt.ExpiredSignatureError:
            raise AuthFailed("the token has expired") from None
        except jwt.InvalidTokenError:
            raise AuthFailed("the token is not valid for this mirror") from None
        # PyJWT checks exp against the wall clock; ours is injectable (tests, skew).
        if not isinstance(claims["exp"], int) or claims["exp"] <= self._clock():
            raise AuthFailed("the token has expired")
        if not isinstance(claims["access"], list):
            raise AuthFailed("the token is not valid for this mirror")
        return claims


def parse_scopes(values: Iterable[str]) -> list[str]:
    """Repository names asked for pull in `scope=repository:<name>:<actions>` values;
    other resource types and actions are never granted (the mirror is read-only)."""
    names = []
    for value in values:
        for scope in value.split(" "):
            kind, _, rest = scope.partition(":")
            name, _, actions = rest.rpartition(":")
            if kind == "repository" and name and "pull" in actions.split(","):
                names.append(name)
    return names


def token_key(settings: Settings, peer_secret: str | None) -> bytes:
    """The realm's signing key: the configured file; with replicas, derived from the
    secret they share (a token from one replica works at every other); else random."""
    if settings.auth_token_key_file is not None:
        try:
            key = settings.auth_token_key_file.read_bytes().strip()
        except OSError as exc:
            raise ValueError(
                f"cannot read auth_token_key_file {settings.auth_token_key_file}: {exc.strerror}"
            ) from None
        if len(key) < 32:
            raise ValueError("auth_token_key_file needs 32 bytes or more (openssl rand -hex 32)")
        return key
    if peer_secret:
        return hmac.new(peer_secret.encode(), b"mirror token realm", hashlib.sha256).digest()
    return secrets.token_bytes(32)


class ClientAuth:
    """Authenticates requests and issues the realm's tokens."""

    def __init__(
        self,
        settings: Settings,
        access: Access,
        metrics: Metrics,
        *,
        key: bytes,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.access = access
        self._metrics = metrics
        self.service = settings.auth_service
        self.realm_url = settings.auth_realm
        self.anonymous = settings.anonymous_allowed()
        # Without any credentials configured, an Authorization header means nothing
        # here (a client may send its Docker Hub login): it is ignored, as before.
        self.enabled = settings.credentials_configured()
        self.htpasswd = Htpasswd(settings.auth_htpasswd) if settings.auth_htpasswd else None
        self._robots: dict[str, StaticToken] = {t.sha256: t for t in settings.auth_tokens}
        self._robots_by_name = {t.name: t for t in settings.auth_tokens}
        self.realm = Realm(key, settings.auth_token_ttl, settings.auth_service, clock)
        # Passwords that checked out, by (user, keyed hash of the password) -> the
        # entry they matched: a hit costs no bcrypt, and a changed entry misses.
        self._verified: dict[tuple[str, bytes], bytes] = {}
        self._salt = secrets.token_bytes(16)
        self._checks = asyncio.Semaphore(MAX_CONCURRENT_CHECKS)
        self._waiting = 0  # logins queued for a check

    @property
    def required(self) -> bool:
        """Whether some request may be refused for who sent it."""
        return not self.anonymous or self.access.restricted

    # -- credentials --------------------------------------------------------------------

    async def password(self, user: str, password: str) -> tuple[str, str]:
        """(source, credential fingerprint) for a Basic login; AuthFailed otherwise."""
        robot = self._robots_by_name.get(user)
        if robot is not None:
            if hmac.compare_digest(hashlib.sha256(password.encode()).hexdigest(), robot.sha256):
                return "robot", robot.sha256[:16]
            raise AuthFailed("invalid username or password", "invalid_client")
        entry = self.htpasswd.entry(user) if self.htpasswd is not None else None
        if entry is None:
            decoy = self.htpasswd.decoy() if self.htpasswd is not None else None
            if decoy is not None:
                await self._bcrypt(password, decoy)  # as slow as a wrong password
            raise AuthFailed("invalid username or password", "invalid_client")
        key = (user, hmac.new(self._salt, password.encode(), hashlib.sha256).digest())
        if self._verified.get(key) != entry:
            if not await self._bcrypt(password, entry):
                raise AuthFailed("invalid username or password", "invalid_client")
            if len(self._verified) >= MAX_VERIFIED:
                self._verified.clear()
            self._verified[key] = entry
        return "htpasswd", _fingerprint(entry)

    async def _bcrypt(self, password: str, entry: bytes) -> bool:
        if self._checks.locked() and self._waiting >= MAX_WAITING_CHECKS:
            raise RegistryError(
                "TOOMANYREQUESTS",
                "too many logins are being checked; retry shortly",
                headers={"Retry-After": "1"},
            )
        self._waiting += 1
        try:
            await self._checks.acquire()
        finally:
            self._waiting -= 1
        try:
            secret = password.encode()[:_BCRYPT_MAX]
            return await asyncio.to_thread(bcrypt.checkpw, secret, entry)
        finally:
            self._checks.release()

    def _principal(self, user: str | None, address: str, extra: Iterable[str] = ()) -> Principal:
        groups = self.access.groups_of(user) | frozenset(extra) if user else frozenset()
        return Principal(user, address, groups)

    async def login(
        self, authorization: str | None, address: str, cert_user: str | None
    ) -> tuple[Principal, str, str]:
        """Who asks the realm for a token: (principal, source, fingerprint)."""
        if authorization:
            scheme, _, value = authorization.partition(" ")
            if scheme.lower() != "basic":
                raise AuthFailed("the token realm takes Basic credentials", "invalid_request")
            user, password = _basic(value)
            source, cred = await self.password(user, password)
            self._count("realm", "ok")
            return self._robot_principal(user, address, source), source, cred
        if cert_user is not None:
            self._count("realm", "ok")
            return self._principal(cert_user, address), "certificate", ""
        if not self.anonymous:
            self._count("realm", "invalid")
            raise AuthFailed("credentials required: log in to this mirror", "invalid_client")
        self._count("realm", "ok")
        return Principal(None, address), "anonymous", ""

    def _robot_principal(self, user: str, address: str, source: str) -> Principal:
        robot = self._robots_by_name.get(user) if source == "robot" else None
        return self._principal(user, address, robot.groups if robot else ())

    async def authenticate(
        self, authorization: str | None, address: str, cert_user: str | None
    ) -> Principal:
        """The principal of a registry request; AuthFailed for bad credentials. An
        anonymous principal comes back even where anonymous access is off: whether
        that is acceptable depends on what it asks for."""
        if not self.enabled or not authorization:
            if cert_user is not None:
                self._count("certificate", "ok")
                return self._principal(cert_user, address)
            return Principal(None, address)
        scheme, _, value = authorization.partition(" ")
        scheme = scheme.lower()
        if scheme == "basic":
            user, password = _basic(value)
            try:
                source, _ = await self.password(user, password)
            except AuthFailed:
                self._count("basic", "invalid")
                raise
            self._count("basic", "ok")
            return self._robot_principal(user, address, source)
        if scheme == "bearer":
            value = value.strip()
            robot = self._robots.get(hashlib.sha256(value.encode()).hexdigest())
            if robot is not None:
                self._count("robot", "ok")
                return self._principal(robot.name, address, robot.groups)
            try:
                principal = self._from_token(value, address)
            except AuthFailed:
                self._count("bearer", "invalid")
                raise
            self._count("bearer", "ok")
            return principal
        self._count("basic", "invalid")
        raise AuthFailed(f"unsupported authorization scheme {scheme[:20]!r}", "invalid_request")

    def _from_token(self, token: str, address: str) -> Principal:
        claims = self.realm.verify(token)
        user = claims["sub"] or None
        source, cred = claims["src"], claims["cred"]
        # Revocation: the credential the token was issued for must still be there.
        if source == "htpasswd":
            entry = self.htpasswd.entry(user) if self.htpasswd and user else None
            if entry is None or _fingerprint(entry) != cred:
                raise AuthFailed("the token's user or password has changed")
        elif source == "robot":
            robot = self._robots_by_name.get(user or "")
            if robot is None or robot.sha256[:16] != cred:
                raise AuthFailed("the token's robot token has changed")
        elif source == "anonymous" and not self.anonymous:
            raise AuthFailed("anonymous access is off")
        repos = frozenset(
            a["name"]
            for a in claims["access"]
            if isinstance(a, dict)
            and a.get("type") == "repository"
            and "pull" in a.get("actions", ())
        )
        robot = self._robots_by_name.get(user or "") if source == "robot" else None
        principal = self._principal(user, address, robot.groups if robot else ())
        return Principal(principal.user, address, principal.groups, repos)

    def _count(self, method: str, result: str) -> None:
        self._metrics.client_auth.labels(method, result).inc()

    def denied(self, method: str) -> None:
        self._count(method, "denied")

    # -- challenges ---------------------------------------------------------------------

    def challenge(self, realm: str, scope: str | None, error: str | None = None) -> str:
        params = [f'realm="{realm}"', f'service="{self.service}"']
        if scope:
            params.append(f'scope="{scope}"')
        if error:
            params.append(f'error="{error}"')
        return "Bearer " + ",".join(params)


def _basic(value: str) -> tuple[str, str]:
    try:
        decoded = base64.b64decode(value.strip(), validate=True).decode("utf-8")
    except (binascii.Error, UnicodeDecodeError):
        raise AuthFailed("malformed Basic credentials", "invalid_request") from None
    user, sep, password = decoded.partition(":")
    if not sep or not user:
        raise AuthFailed("malformed Basic credentials", "invalid_request")
    return user, password
