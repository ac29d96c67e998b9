"""One start/stop loop for the external daemons the e2e tests run: mirror, registry, ...

A subclass says what is its own: the command line, the environment, files to write
before the start, how to tell it is ready, and what to clean up after it stopped.
"""

from __future__ import annotations

import shutil
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path
from types import TracebackType
from typing import ClassVar, Self

import pytest


def find_binary(name: str, package: str) -> str:
    path = shutil.which(name)
    if path is None:
        raise RuntimeError(f"{name} is not on PATH (apt-get install {package})")
    return path


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_for(condition: Callable[[], bool], what: str, timeout: float = 30.0) -> None:
    """Poll a state a real process reaches (a metric moving, a webhook arriving) that
    nothing announces to the test; fail naming it after `timeout`."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(0.05)


class NotReady(Exception):
    """Raised by `check_ready` while the daemon cannot serve yet; the text says why."""


def expect_status(url: str, expected: int) -> None:
    """GET `url` and raise NotReady (or OSError) unless it answers `expected`."""
    try:
        with urllib.request.urlopen(url, timeout=1) as response:
            status = response.status
    except urllib.error.HTTPError as err:
        err.close()
        status = err.code
    if status != expected:
        raise NotReady(f"GET {url} answered {status}, expected {expected}")


class Daemon:
    """A process with its output in `log_path`, started and stopped by this object only."""

    name: ClassVar[str]
    start_timeout: ClassVar[float] = 20.0
    stop_grace: ClassVar[float] = 10.0
    # True keeps a ^C in pytest from reaching the daemon before stop() does.
    new_session: ClassVar[bool] = False

    def __init__(self, workdir: Path, log_name: str) -> None:
        self.workdir = Path(workdir)
        self.log_path = self.workdir / log_name
        self._proc: subprocess.Popen[bytes] | None = None

    def command(self) -> list[str]:
        raise NotImplementedError

    def environment(self) -> dict[str, str] | None:
        """The daemon's environment; None inherits the test's."""
        return None

    def prepare(self) -> None:
        """Write what the command line refers to (config files, directories)."""

    def check_ready(self) -> None:
        """Return once the daemon serves; raise NotReady or OSError until then."""
        raise NotImplementedError

    def cleanup(self) -> None:
        """Undo what the daemon may leave behind; runs after every stop."""

    @property
    def pid(self) -> int | None:
        return None if self._proc is None else self._proc.pid

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def start(self, timeout: float | None = None) -> Self:
        if self.running:
            return self
        command = self.command()  # first, so a missing binary fails before any setup
        try:
            self.workdir.mkdir(parents=True, exist_ok=True)
            self.prepare()
            # Appending keeps log offsets taken before a restart meaningful.
            with self.log_path.open("ab") as log:
                self._proc = subprocess.Popen(
                    command,
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    env=self.environment(),
                    start_new_session=self.new_session,
                )
            self._wait_ready(self.start_timeout if timeout is None else timeout)
        except BaseException:
            self.stop()
            raise
        return self

    def _wait_ready(self, timeout: float) -> None:
        assert self._proc is not None
        deadline = time.monotonic() + timeout
        why = "no attempt made"
        while True:
            if self._proc.poll() is not None:
                why = f"it exited with code {self._proc.returncode}"
                break
            if time.monotonic() >= deadline:
                why = f"not ready after {timeout}s: {why}"
                break
            try:
                self.check_ready()
                return
            except (NotReady, OSError) as err:
                why = str(err)
            time.sleep(0.05)
        raise RuntimeError(
            f"{self.name} (pid {self._proc.pid}) did not start: {why}\n"
            f"--- tail of {self.log_path} ---\n{self.log_tail()}"
        )

    def stop(self, sig: int = signal.SIGTERM) -> None:
        """Send `sig`, then SIGKILL after `stop_grace`; a no-op when not started."""
        proc, self._proc = self._proc, None
        try:
            if proc is not None and proc.poll() is None:
                proc.send_signal(sig)
                try:
                    proc.wait(timeout=self.stop_grace)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
        finally:
            self.cleanup()

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def log_tail(self, lines: int = 50) -> str:
        return "\n".join(self.log().splitlines()[-lines:])
