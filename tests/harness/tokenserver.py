"""A stand-in for auth.docker.io: issues RS256 JWTs that Distribution's token auth accepts."""

from __future__ import annotations

import base64
import binascii
import datetime as dt
import json
import secrets
import threading
import time
import uuid
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import TracebackType
from typing import Any
from urllib.parse import parse_qs, urlsplit

import jwt
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import NameOID

DEFAULT_USERS = {"pusher": "pushpass"}


@dataclass(frozen=True)
class TokenRequest:
    path: str
    service: str | None
    scopes: list[str]
    # The user named in the Basic header, even when its password was wrong.
    user: str | None
    authorization_header: str | None
    status: int


def _self_signed() -> tuple[rsa.RSAPrivateKey, x509.Certificate]:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "mirror test token signer")])
    now = dt.datetime.now(dt.UTC)
    # No extended key usage: Go's chain verification would then demand one that matches.
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(days=1))
        .not_valid_after(now + dt.timedelta(days=365))
        .sign(key, hashes.SHA256())
    )
    return key, cert


def _parse_basic(header: str | None) -> tuple[str, str] | None:
    if not header or not header.lower().startswith("basic "):
        return None
    try:
        decoded = base64.b64decode(header[6:].strip(), validate=True).decode()
    except (binascii.Error, UnicodeDecodeError):
        return None
    user, sep, password = decoded.partition(":")
    return (user, password) if sep else None


def _parse_scope(scope: str) -> tuple[str, str, list[str]] | None:
    # Names may hold a colon (host:port/repo), so the actions are split off the right.
    kind, _, rest = scope.partition(":")
    name, sep, actions = rest.rpartition(":")
    if not kind or not sep or not name:
        return None
    return kind, name, [a for a in actions.split(",") if a]


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, owner: TokenServer) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.owner = owner


class _Handler(BaseHTTPRequestHandler):
    server: _Server

    def do_GET(self) -> None:
        status, body = self.server.owner._handle(self.path, self.headers.get("Authorization"))
        payload = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(payload)))
        if status == 401:
            self.send_header("WWW-Authenticate", 'Basic realm="mirror-test"')
        self.end_headers()
        self.wfile.write(payload)

    def log_message(self, format: str, *args: Any) -> None:
        pass  # .requests is the record; stderr chatter would only clutter pytest output


class TokenServer:
    def __init__(
        self,
        cert_dir: Path,
        *,
        users: dict[str, str] | None = None,
        issuer: str = "auth.docker.io",
        service: str = "registry.docker.io",
        expires_in: int = 300,
        anonymous_pull: bool = True,
    ) -> None:
        self.users = dict(DEFAULT_USERS if users is None else users)
        # False: a private registry, where pulling needs a valid user.
        self.anonymous_pull = anonymous_pull
        # (user, repository) pairs granted nothing: a repository that user cannot read.
        self.denied: set[tuple[str, str]] = set()
        self.issuer = issuer
        self.service = service
        self.expires_in = expires_in
        self._key, self._cert = _self_signed()
        self.cert_path = Path(cert_dir) / "token-signer.pem"
        self.cert_path.write_bytes(self._cert.public_bytes(serialization.Encoding.PEM))
        self._x5c = base64.b64encode(self._cert.public_bytes(serialization.Encoding.DER)).decode()
        self._lock = threading.Lock()
        self._requests: list[TokenRequest] = []
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None

    @property
    def port(self) -> int:
        if self._server is None:
            raise RuntimeError("TokenServer is not started")
        return int(self._server.server_address[1])

    @property
    def realm(self) -> str:
        return f"http://127.0.0.1:{self.port}/token"

    @property
    def requests(self) -> list[TokenRequest]:
        with self._lock:
            return list(self._requests)

    def clear(self) -> None:
        with self._lock:
            self._requests.clear()

    def start(self) -> TokenServer:
        if self._server is None:
            self._server = _Server(self)
            self._thread = threading.Thread(
                target=self._server.serve_forever, name="token-server", daemon=True
            )
            self._thread.start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            if self._thread is not None:
                self._thread.join()
            self._server = None
            self._thread = None

    def __enter__(self) -> TokenServer:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def issue(
        self, access: list[dict[str, Any]], subject: str = "", expires_in: int | None = None
    ) -> str:
        """A signed token; `expires_in` overrides the server's TTL for this one token."""
        now = int(time.time())
        claims = {
            "iss": self.issuer,
            "aud": self.service,
            "sub": subject,
            "iat": now,
            # Allow for clock skew between the test and the registry process.
            "nbf": now - 5,
            "exp": now + (self.expires_in if expires_in is None else expires_in),
            "jti": uuid.uuid4().hex,
            "access": access,
        }
        return jwt.encode(claims, self._key, algorithm="RS256", headers={"x5c": [self._x5c]})

    def _authenticate(self, header: str | None) -> tuple[str | None, bool]:
        basic = _parse_basic(header)
        if basic is None:
            return None, header is None
        user, password = basic
        expected = self.users.get(user)
        return user, expected is not None and secrets.compare_digest(expected, password)

    def _handle(self, raw_path: str, header: str | None) -> tuple[int, dict[str, Any]]:
        url = urlsplit(raw_path)
        query = parse_qs(url.query)
        scopes = [s for value in query.get("scope", []) for s in value.split(" ") if s]
        user, ok = self._authenticate(header)
        status = 404 if url.path != "/token" else 200 if ok else 401
        with self._lock:
            self._requests.append(
                TokenRequest(
                    path=raw_path,
                    service=query.get("service", [None])[0],
                    scopes=scopes,
                    user=user,
                    authorization_header=header,
                    status=status,
                )
            )
        if status != 200:
            return status, {"details": "not found" if status == 404 else "access denied"}
        grants = self._grant(scopes, authenticated=user is not None)
        if user is None and not self.anonymous_pull:
            grants = []
        grants = [g for g in grants if (user, g["name"]) not in self.denied]
        token = self.issue(grants, user or "")
        return 200, {
            "token": token,
            "access_token": token,
            "expires_in": self.expires_in,
            "issued_at": dt.datetime.now(dt.UTC).isoformat().replace("+00:00", "Z"),
        }

    @staticmethod
    def _grant(scopes: list[str], *, authenticated: bool) -> list[dict[str, Any]]:
        access: list[dict[str, Any]] = []
        for scope in scopes:
            parsed = _parse_scope(scope)
            if parsed is None:
                continue
            kind, name, actions = parsed
            if not authenticated:
                # Like Docker Hub for public images: anyone may pull, nothing else.
                actions = ["pull"] if kind == "repository" and "pull" in actions else []
            if actions:
                access.append({"type": kind, "name": name, "actions": actions})
        return access
