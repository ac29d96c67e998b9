"""The real CNCF Distribution registry as a subprocess, with Docker-Hub-style token auth."""

from __future__ import annotations

import json
import re
import shutil
import socket
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

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


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _find_binary() -> str:
    binary = shutil.which("docker-registry")
    if binary is None:
        raise RuntimeError(
            "docker-registry (CNCF Distribution) is not on PATH; "
            "install the Debian package 'docker-registry'"
        )
    return binary


class Registry:
    def __init__(
        self,
        workdir: Path,
        tokenserver: TokenServer,
        *,
        port: int | None = None,
        realm_host: str = "127.0.0.1",
    ) -> None:
        self.workdir = Path(workdir)
        # The host name the registry's challenges give for the token service: another
        # name for the same loopback server makes it a "foreign" realm.
        self.realm_host = realm_host
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.tokenserver = tokenserver
        self.port = port or free_port()
        self.storage_dir = self.workdir / "storage"
        self.config_path = self.workdir / "config.yml"
        self.log_path = self.workdir / "registry.log"
        self._log_offset = 0
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def host(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def url(self) -> str:
        return f"http://{self.host}"

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def _write_config(self) -> None:
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

    def start(self, timeout: float = 15.0) -> Registry:
        if self.running:
            return self
        binary = _find_binary()
        self._write_config()
        # Appending keeps the log offsets from before a restart meaningful.
        with self.log_path.open("ab") as log:
            self._proc = subprocess.Popen(
                [binary, "serve", str(self.config_path)],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        try:
            self._wait_ready(timeout)
        except BaseException:
            self.stop()
            raise
        return self

    def _wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        last_error = "no attempt made"
        while time.monotonic() < deadline:
            if self._proc is not None and self._proc.poll() is not None:
                last_error = f"process exited with code {self._proc.returncode}"
                break
            try:
                with urllib.request.urlopen(f"{self.url}/v2/", timeout=1) as response:
                    last_error = f"GET /v2/ answered {response.status}, expected 401"
            except urllib.error.HTTPError as err:
                err.close()
                if err.code == 401:
                    return
                last_error = f"GET /v2/ answered {err.code}, expected 401"
            except OSError as err:
                last_error = str(err)
            time.sleep(0.05)
        raise RuntimeError(
            f"registry on {self.host} did not become ready: {last_error}\n"
            f"--- {self.log_path} ---\n{self.log_text()}"
        )

    def stop(self) -> None:
        proc, self._proc = self._proc, None
        if proc is None:
            return
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()

    def __enter__(self) -> Registry:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def log_text(self) -> str:
        if not self.log_path.exists():
            return ""
        return self.log_path.read_text(errors="replace")

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
