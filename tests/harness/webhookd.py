"""A webhook receiver process (stdlib only): `python webhookd.py PORT FILE`.

Each POST's path, headers and JSON body go to FILE as one JSON line; it answers 200.
GET /ready answers 200 once it listens. Run and stopped by harness.receiver.
"""

from __future__ import annotations

import json
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

_lock = threading.Lock()


class Handler(BaseHTTPRequestHandler):
    out = ""

    def do_GET(self) -> None:
        self._answer(200 if self.path == "/ready" else 404)

    def do_POST(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length)
        headers: dict[str, list[str]] = {}
        for name, value in self.headers.items():
            headers.setdefault(name.lower(), []).append(value)
        record = {"path": self.path, "headers": headers, "body": json.loads(body)}
        with _lock, open(self.out, "a", encoding="utf-8") as out:
            out.write(json.dumps(record) + "\n")
        self._answer(200)

    def _answer(self, status: int) -> None:
        self.send_response(status)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, format: str, *args: Any) -> None:
        pass  # the file is the record


def main() -> None:
    port, Handler.out = int(sys.argv[1]), sys.argv[2]
    server = ThreadingHTTPServer(("127.0.0.1", port), Handler)
    server.serve_forever()


if __name__ == "__main__":
    main()
