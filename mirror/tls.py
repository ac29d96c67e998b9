"""TLS on the client listener: the server context, its files reloaded in place, and
what a handshake says about the client.

One `ssl.SSLContext` serves the listener for the process's life. When the certificate,
key or client CA files change (cert-manager renews a Secret), the new files are loaded
into that same context: OpenSSL uses a context's certificate for handshakes that start
after the change, so connections in flight keep theirs and are never dropped.

A reload is all or nothing. The files are read once into memory, checked on a scratch
context (a key that does not match the certificate, a half-written file), and only
then loaded into the live one, from the same bytes: loading a mismatched pair into the
live context would leave it with the new certificate and no key, and every handshake
would fail. A failed reload keeps the old pair, says so in one line and in
`mirror_tls_reloads_total{result="error"}`, and is tried again at the next poll.

A client CA bundle only grows by reloading (OpenSSL has no way to drop CAs from a
context's store): a CA removed from the bundle stays trusted until a restart.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import os
import ssl
import tempfile
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding
from cryptography.x509.oid import NameOID

from mirror.config import Settings
from mirror.metrics import Metrics

log = logging.getLogger(__name__)

ClientAuth = Literal["require", "optional"]
# (mtime, size, inode) of a file behind its symlinks: cert-manager and the kubelet swap
# a `..data` symlink to a new directory, which changes the inode even when the
# timestamps and size happen to match.
Stamp = tuple[int, int, int] | None
# The ASGI TLS extension's tls_version values.
_TLS_VERSIONS = {"TLSv1.2": 0x0303, "TLSv1.3": 0x0304}


class TLSError(Exception):
    """TLS files that cannot be used; the message is one line naming the setting."""


@dataclass(frozen=True)
class TLSFiles:
    cert: Path
    key: Path
    client_ca: Path | None = None
    client_auth: ClientAuth = "require"

    def stamps(self) -> tuple[Stamp, ...]:
        return tuple(_stamp(p) for p in (self.cert, self.key, self.client_ca) if p is not None)


def _stamp(path: Path) -> Stamp:
    try:
        st = path.resolve().stat()
    except OSError:
        return None
    return (st.st_mtime_ns, st.st_size, st.st_ino)


@dataclass(frozen=True)
class Material:
    """The files' bytes, read once, so what is checked is what is loaded."""

    cert: bytes
    key: bytes
    client_ca: str | None
    leaf: x509.Certificate

    @classmethod
    def read(cls, files: TLSFiles) -> Material:
        cert = _read(files.cert, "tls_cert_file")
        key = _read(files.key, "tls_key_file")
        try:
            leaf = x509.load_pem_x509_certificates(cert)[0]
        except ValueError:
            raise TLSError(f"tls_cert_file {files.cert} holds no PEM certificate") from None
        ca = None
        if files.client_ca is not None:
            ca = _read(files.client_ca, "tls_client_ca").decode("ascii", "replace")
        return cls(cert, key, ca, leaf)


def _read(path: Path, setting: str) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise TLSError(f"{setting} {path} cannot be read: {exc.strerror or exc}") from None


def _no_password() -> bytes:
    # Without a callback OpenSSL would prompt on the terminal for an encrypted key.
    raise TLSError("the key is encrypted (give an unencrypted PEM key)")


@contextlib.contextmanager
def _as_files(material: Material) -> Iterator[tuple[str, str]]:
    """Paths for load_cert_chain (it reads only files): anonymous memory on Linux,
    so the key is never written to a disk, else a private temporary directory."""
    if hasattr(os, "memfd_create"):
        fds = [os.memfd_create(name) for name in ("cert", "key")]
        try:
            for fd, data in zip(fds, (material.cert, material.key), strict=True):
                os.write(fd, data)
            yield f"/proc/self/fd/{fds[0]}", f"/proc/self/fd/{fds[1]}"
        finally:
            for fd in fds:
                os.close(fd)
        return
    with tempfile.TemporaryDirectory() as tmp:  # pragma: no cover - not Linux
        cert, key = Path(tmp, "cert.pem"), Path(tmp, "key.pem")
        cert.write_bytes(material.cert)
        key.write_bytes(material.key)
        yield str(cert), str(key)


def _load(context: ssl.SSLContext, material: Material, files: TLSFiles) -> None:
    with _as_files(material) as (cert, key):
        try:
            context.load_cert_chain(cert, key, password=_no_password)
        except TLSError as exc:
            raise TLSError(f"tls_key_file {files.key}: {exc}") from None
        except ssl.SSLError as exc:
            if exc.reason == "KEY_VALUES_MISMATCH":
                why = f"does not match the certificate in tls_cert_file {files.cert}"
            else:
                why = f"with tls_cert_file {files.cert}: cannot be used ({exc.reason or exc})"
            raise TLSError(f"tls_key_file {files.key} {why}") from None
    if material.client_ca is not None:
        try:
            context.load_verify_locations(cadata=material.client_ca)
        except (ssl.SSLError, ValueError):
            raise TLSError(
                f"tls_client_ca {files.client_ca} holds no usable PEM certificate"
            ) from None


def _new_context(files: TLSFiles) -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    if files.client_ca is not None:
        context.verify_mode = (
            ssl.CERT_REQUIRED if files.client_auth == "require" else ssl.CERT_OPTIONAL
        )
    return context


class ServerTLS:
    """The listener's context and the files it came from; `poll` reloads them."""

    def __init__(self, files: TLSFiles) -> None:
        """Raises TLSError (one line) when the files cannot be used."""
        self.files = files
        self._stamps = files.stamps()
        material = Material.read(files)
        self.context = _new_context(files)
        _load(self.context, material, files)
        self.certificate = material.leaf
        self._failed: tuple[tuple[Stamp, ...], str] | None = None

    @property
    def not_after(self) -> float:
        return self.certificate.not_valid_after_utc.timestamp()

    def poll(self, metrics: Metrics) -> bool | None:
        """Reload if a file changed: True if reloaded, False if the change could not be
        used (the old pair stays), None if nothing changed."""
        stamps = self.files.stamps()
        if stamps == self._stamps:
            return None
        try:
            material = Material.read(self.files)
            # All checks on a scratch context first: the live one is only ever loaded
            # with a pair that works.
            _load(_new_context(self.files), material, self.files)
            _load(self.context, material, self.files)
        except TLSError as exc:
            # Retried at every poll (the rest of a rotation may still be on its way),
            # said and counted once per state of the files.
            if self._failed != (stamps, str(exc)):
                self._failed = (stamps, str(exc))
                metrics.tls_reloads.labels("error").inc()
                log.error("TLS files changed but cannot be used, keeping the old ones: %s", exc)
            return False
        self._stamps, self._failed = stamps, None
        self.certificate = material.leaf
        metrics.tls_reloads.labels("ok").inc()
        metrics.tls_certificate_expiry.labels("registry").set(self.not_after)
        log.info(
            "TLS certificate reloaded: %s, serial %x, valid until %s",
            self.certificate.subject.rfc4514_string(),
            self.certificate.serial_number,
            self.certificate.not_valid_after_utc.isoformat(),
        )
        return True

    async def keep_fresh(self, metrics: Metrics, interval: float) -> None:
        """Poll every `interval` seconds until cancelled. In the event loop, not a
        thread: loading into a context while handshakes read it is not thread-safe, and
        the work is a few stat calls and a few KiB read."""
        for result in ("ok", "error"):
            metrics.tls_reloads.labels(result)
        metrics.tls_certificate_expiry.labels("registry").set(self.not_after)
        while True:
            await asyncio.sleep(interval)
            self.poll(metrics)


def server_tls(settings: Settings) -> ServerTLS | None:
    """The listener's TLS from the settings (None: plain HTTP); TLSError if unusable."""
    if settings.tls_cert_file is None or settings.tls_key_file is None:
        return None
    files = TLSFiles(
        settings.tls_cert_file,
        settings.tls_key_file,
        settings.tls_client_ca,
        settings.tls_client_auth,
    )
    return ServerTLS(files)


def tls_extension(ssl_object: ssl.SSLObject) -> dict[object, object]:
    """The ASGI TLS extension (`scope["extensions"]["tls"]`) for one connection. A
    client certificate is only ever present verified: the context asks for one only
    with a CA to check it against, and one that fails the check fails the handshake."""
    der = ssl_object.getpeercert(binary_form=True)
    chain: list[str] = []
    name = None
    if der:
        cert = x509.load_der_x509_certificate(der)
        chain = [cert.public_bytes(Encoding.PEM).decode("ascii")]
        name = cert.subject.rfc4514_string()
    cipher = ssl_object.cipher()
    return {
        "server_cert": None,  # optional in the spec, and nothing here needs it
        "client_cert_chain": chain,
        "client_cert_name": name,
        "client_cert_error": None,
        "tls_version": _TLS_VERSIONS.get(ssl_object.version() or ""),
        "cipher_suite": _cipher_id(cipher[0]) if cipher else None,
    }


@functools.cache
def _cipher_id(name: str) -> int | None:
    # get_ciphers() ids are OpenSSL's: 0x0300 followed by the IANA 16-bit code.
    for c in ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER).get_ciphers():
        if c["name"] == name:
            return int(c["id"]) & 0xFFFF
    return None


def client_common_name(scope: Mapping[str, Any]) -> str | None:
    """The CN of the verified client certificate of this request's connection, if any
    (the user name for client certificate authentication)."""
    tls = scope.get("extensions", {}).get("tls") or {}
    subject = tls.get("client_cert_name")
    return _common_name(subject) if subject else None


@functools.lru_cache(maxsize=1024)
def _common_name(subject: str) -> str | None:
    # Asked on every request of a connection (and a fleet's nodes present few distinct
    # certificates): parsed once per subject, not once per request.
    names = x509.Name.from_rfc4514_string(subject).get_attributes_for_oid(NameOID.COMMON_NAME)
    value = names[0].value if names else None
    return value if isinstance(value, str) else None
