"""Logging: set-up (text or JSON lines), and the per-request access record.

Each request gets a `RequestLog` in a context variable: the middleware creates it and
writes one access-log line from it when the response ends; handlers fill in the
repository and reference; `Upstream` reads its id (sent upstream as `X-Request-Id`)
and records the upstream's status. A download started by a request runs in a task
created inside that request's context, so its upstream requests carry the same id.
Nothing here ever sees a credential: the record holds only the fields below.
"""

from __future__ import annotations

import logging
import re
import sys
import uuid
from contextvars import ContextVar
from dataclasses import dataclass

from pythonjsonlogger.json import JsonFormatter

access_log = logging.getLogger("mirror.access")

# A client's id is kept if it is short and plain, so it can go into headers and logs.
_REQUEST_ID_RE = re.compile(r"[A-Za-z0-9._:-]{1,128}")
TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
WORKER_TEXT_FORMAT = "%(asctime)s %(levelname)s [worker %(worker)s] %(name)s: %(message)s"


@dataclass(slots=True)
class RequestLog:
    request_id: str
    method: str
    path: str
    route: str = "other"
    repository: str | None = None
    reference: str | None = None
    upstream: str | None = None  # which upstream the request was routed to
    user: str | None = None  # the authenticated client (None: anonymous)
    tier: str | None = None  # which of its tiers answered (a mirror tier, or the registry)
    upstream_status: int | None = None  # the last upstream response's status
    status: int = 0
    bytes: int = 0
    cache: str | None = None  # X-Cache: HIT, MISS, REVALIDATED, STALE, UPDATING

    def fields(self, duration: float) -> dict[str, object]:
        return {
            "request_id": self.request_id,
            "method": self.method,
            "route": self.route,
            "path": self.path,
            "repository": self.repository,
            "reference": self.reference,
            "upstream": self.upstream,
            "user": self.user,
            "tier": self.tier,
            "status": self.status,
            "bytes": self.bytes,
            "duration_s": round(duration, 6),
            "cache": self.cache,
            "upstream_status": self.upstream_status,
        }


current: ContextVar[RequestLog | None] = ContextVar("mirror_request", default=None)


_CONTROL_RE = re.compile(r"[\x00-\x1f\x7f]")


def printable(text: str) -> str:
    """Control characters percent-encoded: one request is one log line, always."""
    return _CONTROL_RE.sub(lambda m: f"%{ord(m.group()):02X}", text)


def request_id(header: str | None) -> str:
    if header and _REQUEST_ID_RE.fullmatch(header):
        return header
    return uuid.uuid4().hex


def log_access(record: RequestLog, duration: float) -> None:
    fields = record.fields(duration)
    message = (
        f"{record.method} {record.path} {record.status} {record.bytes}B {duration:.3f}s"
        f" cache={record.cache or '-'} upstream_status={record.upstream_status or '-'}"
        f"{f' tier={record.tier}' if record.tier else ''}"
        f"{f' user={record.user}' if record.user else ''} id={record.request_id}"
    )
    # JSON output gets every field as its own key; text output gets the message.
    access_log.info(message, extra={"access": fields})


class _WorkerFilter(logging.Filter):
    def __init__(self, worker: int) -> None:
        super().__init__()
        self._worker = worker

    def filter(self, record: logging.LogRecord) -> bool:
        record.worker = self._worker
        return True


class _JsonFormatter(JsonFormatter):
    def add_fields(
        self,
        log_data: dict[str, object],
        record: logging.LogRecord,
        message_dict: dict[str, object],
    ) -> None:
        super().add_fields(log_data, record, message_dict)
        access = log_data.pop("access", None)
        if isinstance(access, dict):
            log_data.update(access)


def configure(level: str, fmt: str, worker: int | None = None) -> None:
    """Root logging for `mirror serve`: one line per record on stderr. A worker of
    several (`workers`) names itself in each line: `[worker 2]`, or `"worker": 2`."""
    handler = logging.StreamHandler(sys.stderr)
    if fmt == "json":
        handler.setFormatter(
            _JsonFormatter(
                "%(asctime)s %(levelname)s %(name)s %(message)s"
                + (" %(worker)s" if worker is not None else ""),
                rename_fields={"asctime": "time", "levelname": "level", "name": "logger"},
            )
        )
    elif worker is not None:
        handler.setFormatter(logging.Formatter(WORKER_TEXT_FORMAT))
    else:
        handler.setFormatter(logging.Formatter(TEXT_FORMAT))
    if worker is not None:
        handler.addFilter(_WorkerFilter(worker))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # httpx logs every request at INFO: our access log already says what matters.
    logging.getLogger("httpx").setLevel(logging.WARNING)
