"""The real CNCF Distribution registry as a subprocess, with Docker-Hub-style token auth."""

from __future__ import annotations

import json
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from .daemon import Daemon, expect_status, find_binary, free_port
from .tokenserver import TokenServer

# Gorilla's combined log format: host ident user [date] "request" status size "referer" "ua"
_ACCESS_LINE = re.compile(
    r'^\S+ \S+ \S+ \[[^\]]*\] "(?P<method>[A-Z]+) (?P<path>\S+) [^"]*" '
    r'(?P<status>\d{3}) (?P<size>\d+|-)(?: "[^"]*" "(?P<agent>[^"]*)")?'
)


@dataclass(frozen=True)
class LoggedRequest:
    method: str
    path: str
    status: int
    size: int | None
    user_agent: str | None


class Registry(Daemon):
    name = "registry"
    start_timeout = 15.0

    def __init__(
        self,
        workdir: Path,
        tokenserver: TokenServer,
        *,
        port: int | None = None,
        realm_host: str = "127.0.0.1",
    ) -> None:
        super().__init__(workdir, "registry.log")
        # The host name the registry's challenges give for the token service: another
        # name for the same loopback server makes it a "foreign" realm.
        self.realm_host = realm_host
        self.tokenserver = tokenserver
        self.port = port or free_port()
        self.storage_dir = self.workdir / "storage"
        self.config_path = self.workdir / "config.yml"
        self._log_offset = 0

    @property
    def host(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def url(self) -> str:
        return f"http://{self.host}"

    def command(self) -> list[str]:
        return [find_binary("docker-registry", "docker-registry"), "serve", str(self.config_path)]

    def prepare(self) -> None:
        # JSON is valid YAML, and json.dumps quotes paths safely.
        config = {
            "version": 0.1,
            "log": {"level": "info", "accesslog": {"disabled": False}},
            "storage": {
                "filesystem": {"rootdirectory": str(self.storage_dir)},
                "delete": {"enabled": True},
            },
            "http": {"addr": self.host, "secret": "mirror-test-harness-secret"},
            "auth": {
                "token": {
                    # Read at start(), so a restarted token server is picked up.
                    "realm": self.tokenserver.realm.replace("127.0.0.1", self.realm_host),
                    "service": self.tokenserver.service,
                    "issuer": self.tokenserver.issuer,
                    "rootcertbundle": str(self.tokenserver.cert_path),
                }
            },
        }
        self.config_path.write_text(json.dumps(config, indent=2))

    def check_ready(self) -> None:
        # Token auth is on, so an anonymous GET /v2/ answers 401 once it serves.
        expect_status(f"{self.url}/v2/", 401)

    def clear_log(self) -> None:
        self._log_offset = self.log_path.stat().st_size if self.log_path.exists() else 0

    def requests(self) -> list[LoggedRequest]:
        """Access-log entries written since the last clear_log()."""
        if not self.log_path.exists():
            return []
        with self.log_path.open("rb") as log:
            log.seek(self._log_offset)
            data = log.read()
        # A line still being written has no newline yet; leave it for the next call.
        complete = data[: data.rfind(b"\n") + 1].decode(errors="replace")
        found = []
        for line in complete.splitlines():
            match = _ACCESS_LINE.match(line)
            if match:
                size = match["size"]
                found.append(
                    LoggedRequest(
                        method=match["method"],
                        path=match["path"],
                        status=int(match["status"]),
                        size=None if size == "-" else int(size),
                        user_agent=match["agent"],
                    )
                )
        return found

    def wait_for_request(
        self, match: Callable[[LoggedRequest], bool], timeout: float = 5.0
    ) -> LoggedRequest:
        """The access log is written after the response, so a client can outrun it."""
        deadline = time.monotonic() + timeout
        while True:
            for entry in self.requests():
                if match(entry):
                    return entry
            if time.monotonic() >= deadline:
                raise AssertionError(f"no matching request in the access log of {self.host}")
            time.sleep(0.05)
