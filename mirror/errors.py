"""The one error table: OCI distribution error codes, their HTTP status, one renderer.

Hierarchy::

    RegistryError            an error a client sees as {"errors":[{code,message,detail}]}
    ├── (codes below, chosen by `code`, not by subclass)
    UpstreamError(RegistryError)   the upstream failed us; carries the upstream status
    AbortResponse(Exception)       a streamed body turned out bad after headers were sent:
                                   the connection must be cut, never completed normally

Codes are registered once, with their default status, like Distribution's errcode package.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from fastapi.exceptions import RequestValidationError
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response

from mirror.logs import printable

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ErrorCode:
    code: str
    status: int
    message: str


_CODES = [
    # The spec's codes (distribution-spec, "Error Codes").
    ErrorCode("BLOB_UNKNOWN", 404, "blob unknown to registry"),
    ErrorCode("DIGEST_INVALID", 400, "provided digest did not match uploaded content"),
    ErrorCode("MANIFEST_UNKNOWN", 404, "manifest unknown"),
    ErrorCode("MANIFEST_INVALID", 400, "manifest invalid"),
    ErrorCode("NAME_INVALID", 400, "invalid repository name"),
    ErrorCode("NAME_UNKNOWN", 404, "repository name not known to registry"),
    ErrorCode("SIZE_INVALID", 400, "provided length did not match content length"),
    ErrorCode("UNAUTHORIZED", 401, "authentication required"),
    ErrorCode("DENIED", 403, "requested access to the resource is denied"),
    ErrorCode("UNSUPPORTED", 405, "the operation is unsupported"),
    ErrorCode("TOOMANYREQUESTS", 429, "too many requests"),
    # Not in the spec, but used by Distribution and understood by clients.
    ErrorCode("TAG_INVALID", 400, "manifest tag did not match URI"),
    ErrorCode("RANGE_INVALID", 416, "requested range not satisfiable"),
    ErrorCode("PAGINATION_NUMBER_INVALID", 400, "invalid number of results requested"),
    ErrorCode("UNAVAILABLE", 503, "service unavailable"),
    ErrorCode("UNKNOWN", 500, "unknown error"),
]
CODES: Mapping[str, ErrorCode] = {c.code: c for c in _CODES}


class RegistryError(Exception):
    """An error rendered to the client in the OCI error envelope."""

    def __init__(
        self,
        code: str,
        message: str | None = None,
        detail: Any = None,
        *,
        status: int | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        entry = CODES[code]  # KeyError here is a programming error, caught by tests
        self.code = code
        self.message = message or entry.message
        self.detail = detail
        self.status = status or entry.status
        self.headers = dict(headers or {})
        super().__init__(f"{code}: {self.message}")

    def body(self) -> bytes:
        err: dict[str, Any] = {"code": self.code, "message": self.message}
        if self.detail is not None:
            err["detail"] = self.detail
        return json.dumps({"errors": [err]}).encode()


class UpstreamError(RegistryError):
    """The upstream answered with an error or could not be reached."""

    def __init__(
        self,
        code: str,
        message: str | None = None,
        *,
        status: int | None = None,
        upstream_status: int | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(code, message, status=status, headers=headers)
        self.upstream_status = upstream_status


class AbortResponse(Exception):
    """Raised inside a response body stream to cut the client's connection.

    Used when a blob's digest does not verify (or its download fails) after the
    status line and headers were already sent: completing the body normally would
    hand the client bytes nobody verified.
    """


def error_response(err: RegistryError) -> Response:
    return Response(
        err.body(), status_code=err.status, media_type="application/json", headers=err.headers
    )


def install_handlers(app: Starlette) -> None:
    """Every error a client can see leaves in the OCI envelope."""
    app.add_exception_handler(RegistryError, _registry_error)
    app.add_exception_handler(HTTPException, _http_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(Exception, _unexpected_error)


# Starlette types handlers as taking Exception; each narrows it by what it is
# registered for.
async def _registry_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, RegistryError)
    return error_response(exc)


async def _http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    if exc.status_code == 405:
        return error_response(
            RegistryError("UNSUPPORTED", "method not allowed: this mirror is read-only")
        )
    if exc.status_code == 404:
        return error_response(RegistryError("NAME_UNKNOWN", "no such endpoint", status=404))
    return error_response(RegistryError("UNKNOWN", str(exc.detail), status=exc.status_code))


async def _validation_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, RequestValidationError)
    return error_response(
        RegistryError(
            "UNSUPPORTED", "invalid request parameters", detail=str(exc.errors())[:500], status=400
        )
    )


async def _unexpected_error(request: Request, exc: Exception) -> Response:
    log.exception("unexpected error on %s %s", request.method, printable(request.url.path))
    return error_response(RegistryError("UNKNOWN", "internal error"))


def told(body: bytes, *, detail: bool = False) -> str | None:
    """What an error envelope says, as one line ("CODE: message"), for the mirror's own
    clients (`mirror warm`, `mirror admin`); None: the body is not an envelope."""
    try:
        error = json.loads(body)["errors"][0]
        line = f"{error['code']}: {error['message']}"
        if detail and error.get("detail"):
            line += f" ({json.dumps(error['detail'])})"
    except (ValueError, KeyError, IndexError, TypeError):
        return None
    return line
