"""A real Redis for the tests (Debian `redis-server`), on loopback, no persistence."""

from __future__ import annotations

import socket
from pathlib import Path
from typing import ClassVar

from .daemon import Daemon, NotReady, find_binary, free_port


class RedisServer(Daemon):
    name: ClassVar[str] = "redis-server"

    def __init__(
        self, workdir: Path, port: int | None = None, *, password: str | None = None
    ) -> None:
        super().__init__(workdir, "redis.log")
        self.port = port or free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.password = password  # AUTH required (requirepass), not in the URL

    def command(self) -> list[str]:
        return [
            find_binary("redis-server", "redis-server"),
            "--bind", "127.0.0.1",
            "--port", str(self.port),
            "--save", "",
            "--appendonly", "no",
            "--dir", str(self.workdir),
            *(["--requirepass", self.password] if self.password else []),
        ]  # fmt: skip

    def check_ready(self) -> None:
        with socket.create_connection(("127.0.0.1", self.port), timeout=1) as conn:
            if self.password:
                conn.sendall(f"AUTH {self.password}\r\n".encode())
                if not conn.recv(16).startswith(b"+OK"):
                    raise NotReady("redis refused AUTH")
            conn.sendall(b"PING\r\n")
            if not conn.recv(16).startswith(b"+PONG"):
                raise NotReady("redis did not answer PING")
