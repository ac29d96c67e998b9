"""The processes of a run: the mirrors under test, the worker pool and helper servers."""

from __future__ import annotations

import contextlib
import io
import json
import multiprocessing
import re
import shutil
import subprocess
import tarfile
import time
import urllib.error
import urllib.request
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

from front import Front
from harness import free_port
from harness.mirror import MirrorProcess

from . import REPO_ROOT

CREDS = ("pusher", "pushpass")
REF = "reference"
OURS = "ours"

# Log lines worth a look. uvicorn's access log: `... "GET /v2/... HTTP/1.1" 200`.
_ACCESS = re.compile(r'"(?P<method>[A-Z]+) (?P<path>\S+) HTTP/[\d.]+" (?P<status>\d{3})')
_TROUBLE = re.compile(r"\b(WARNING|ERROR|CRITICAL)\b|Traceback|Exception")
_TIMESTAMP = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d+ |127\.0\.0\.1:\d+ - ")
# skopeo with --src-tls-verify=false tries HTTPS first; the plain-HTTP server sees a TLS
# ClientHello (uvicorn warns; Distribution logs a TLS handshake error), then skopeo
# falls back to HTTP.
_KNOWN = ("Invalid HTTP request received.", "http: TLS handshake error")
# Distribution (logrus): level=error / level=warning, and its access log.
_REF_LEVEL = re.compile(r'level=(error|warning|fatal|panic) msg="(?P<msg>[^"]*)"')
_REF_ACCESS = re.compile(r'"(?P<method>[A-Z]+) (?P<path>\S+) HTTP/[\d.]+" (?P<status>\d{3}) ')


def wait_until(check: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise RuntimeError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(0.05)


def http_get(url: str, headers: dict[str, str]) -> tuple[int, bytes]:
    request = urllib.request.Request(url, headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=60) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as err:
        with err:
            return err.code, err.read()


def tool_output(cmd: list[str]) -> str:
    """What a command prints, stripped; "?" if it cannot run."""
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        return subprocess.run(cmd, capture_output=True, text=True, timeout=10).stdout.strip()
    return "?"


class Subject:
    """One mirror under test, restartable with a fresh, empty cache."""

    label = ""
    title = ""

    def __init__(self, root: Path, front: Front) -> None:
        self.root = root
        self.front = front
        self.generation = 0
        self.workdir: Path | None = None
        self.findings: Counter[str] = Counter()
        self.statuses: Counter[str] = Counter()

    @property
    def port(self) -> int:
        raise NotImplementedError

    @property
    def pid(self) -> int:
        raise NotImplementedError

    @property
    def root_pid(self) -> int:
        """The process whose tree's CPU time is the server's (nginx: the master)."""
        return self.pid

    @property
    def host(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def url(self) -> str:
        return f"http://{self.host}"

    def blob_path(self, digest: str) -> Path:
        raise NotImplementedError

    def _start(self, workdir: Path) -> None:
        raise NotImplementedError

    def _stop(self) -> None:
        raise NotImplementedError

    def _log(self) -> str:
        raise NotImplementedError

    def _scan(self, text: str) -> None:
        raise NotImplementedError

    def fresh(self) -> None:
        """Stop, keep what its log says, delete its cache, start anew on an empty one."""
        self.stop()
        self.generation += 1
        self.workdir = self.root / f"{self.label}-{self.generation}"
        self._start(self.workdir)

    def stop(self) -> None:
        if self.workdir is None:
            return
        self._stop()
        self._scan(self._log())
        shutil.rmtree(self.workdir, ignore_errors=True)
        self.workdir = None

    def settle(self, digest: str, size: int, timeout: float = 180) -> None:
        """Wait until the blob is committed to the mirror's own storage."""
        path = self.blob_path(digest)

        def committed() -> bool:
            with contextlib.suppress(OSError):
                return path.stat().st_size == size
            return False

        wait_until(committed, timeout, f"{self.label} to commit {digest[:19]}")


class Reference(Subject):
    label = REF
    title = "Distribution proxy"

    def __init__(self, root: Path, front: Front) -> None:
        super().__init__(root, front)
        self._proc: subprocess.Popen[bytes] | None = None
        self._port = 0

    @property
    def port(self) -> int:
        return self._port

    @property
    def pid(self) -> int:
        if self._proc is None:
            raise RuntimeError("the reference is not running")
        return self._proc.pid

    def blob_path(self, digest: str) -> Path:
        assert self.workdir is not None
        hexd = digest.removeprefix("sha256:")
        v2 = self.workdir / "storage" / "docker" / "registry" / "v2"
        return v2 / "blobs" / "sha256" / hexd[:2] / hexd / "data"

    def _start(self, workdir: Path) -> None:
        workdir.mkdir(parents=True)
        self._port = free_port()
        config = {
            "version": 0.1,
            "log": {"level": "info", "accesslog": {"disabled": False}},
            "storage": {
                "filesystem": {"rootdirectory": str(workdir / "storage")},
                # Distribution's sample config and its Docker image both ship this.
                "cache": {"blobdescriptor": "inmemory"},
            },
            "http": {"addr": f"127.0.0.1:{self._port}", "secret": "compare-bench-secret"},
            "proxy": {"remoteurl": self.front.url, "username": CREDS[0], "password": CREDS[1]},
        }
        (workdir / "config.yml").write_text(json.dumps(config, indent=2))
        binary = shutil.which("docker-registry")
        assert binary is not None
        with (workdir / "registry.log").open("ab") as log:
            self._proc = subprocess.Popen(
                [binary, "serve", str(workdir / "config.yml")],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
            )

        def ready() -> bool:
            if self._proc is not None and self._proc.poll() is not None:
                raise RuntimeError(f"the reference exited:\n{self._log()}")
            with contextlib.suppress(OSError):
                return http_get(self.url + "/v2/", {})[0] == 200
            return False

        wait_until(ready, 20, "the reference to answer GET /v2/")

    def _stop(self) -> None:
        proc, self._proc = self._proc, None
        if proc is not None and proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()

    def _log(self) -> str:
        assert self.workdir is not None
        path = self.workdir / "registry.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def _scan(self, text: str) -> None:
        for line in text.splitlines():
            if access := _REF_ACCESS.search(line):
                self.statuses[f"{access['method']} {access['status']}"] += 1
                continue
            if level := _REF_LEVEL.search(line):
                msg = level["msg"]
                if not any(k in msg for k in _KNOWN):
                    self.findings[f"level={level[1]} {msg[:160]}"] += 1


class Ours(Subject):
    label = OURS
    title = "ours (mirror serve)"

    def __init__(
        self, root: Path, front: Front, env: dict[str, str] | None = None, label: str = OURS
    ) -> None:
        super().__init__(root, front)
        self.proc: MirrorProcess | None = None
        self.extra_env = env or {}
        self.label = label

    @property
    def port(self) -> int:
        assert self.proc is not None
        return self.proc.port

    @property
    def pid(self) -> int:
        # The harness keeps its process private; its pid is what /proc is asked about.
        if self.proc is None or self.proc._proc is None:
            raise RuntimeError("our mirror is not running")
        return self.proc._proc.pid

    def blob_path(self, digest: str) -> Path:
        assert self.proc is not None
        hexd = digest.removeprefix("sha256:")
        return self.proc.cache_dir / "blobs" / "sha256" / hexd[:2] / hexd

    def _start(self, workdir: Path) -> None:
        env = {"MIRROR_UPSTREAM_USERNAME": CREDS[0], "MIRROR_UPSTREAM_PASSWORD": CREDS[1]}
        self.proc = MirrorProcess(workdir, self.front.url, env={**env, **self.extra_env}).start()

    def _stop(self) -> None:
        if self.proc is not None:
            self.proc.stop()

    def _log(self) -> str:
        return self.proc.log() if self.proc is not None else ""

    def _scan(self, text: str) -> None:
        for line in text.splitlines():
            if access := _ACCESS.search(line):
                self.statuses[f"{access['method']} {access['status']}"] += 1
                if int(access["status"]) >= 400:
                    self.findings[_TIMESTAMP.sub("", line.strip())[:200]] += 1
            elif _TROUBLE.search(line) and not any(k in line for k in _KNOWN):
                self.findings[_TIMESTAMP.sub("", line.strip())[:200]] += 1


def export_mirror(rev: str, work: Path) -> tuple[dict[str, str], str]:
    """Our mirror from `git archive REV mirror/`: the environment that runs it, and `REV (sha)`."""
    sha = tool_output(["git", "-C", str(REPO_ROOT), "rev-parse", "--short", rev])
    if not sha or sha == "?":
        raise RuntimeError(f"--mirror-rev {rev}: not a revision of {REPO_ROOT}")
    src = work / "mirror-src"
    src.mkdir()
    archive = subprocess.run(
        ["git", "-C", str(REPO_ROOT), "archive", "--format=tar", sha, "mirror"],
        capture_output=True,
        check=True,
        timeout=60,
    )
    with tarfile.open(fileobj=io.BytesIO(archive.stdout)) as tar:
        tar.extractall(src, filter="data")
    # -m puts the current directory first on sys.path unless PYTHONSAFEPATH is set;
    # PYTHONPATH then wins over the editable install of the working tree.
    env = {"PYTHONSAFEPATH": "1", "PYTHONPATH": str(src)}
    return env, f"{rev} ({sha})"


@contextlib.contextmanager
def worker_pool() -> Iterator[ProcessPoolExecutor]:
    pool = ProcessPoolExecutor(max_workers=2, mp_context=multiprocessing.get_context("spawn"))
    try:
        # Start both workers now, so no measurement waits for a process to spawn.
        for f in [pool.submit(time.sleep, 0.5) for _ in range(2)]:
            f.result(60)
        yield pool
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


@contextlib.contextmanager
def serving(target: Callable[..., None], *args: Any, what: str) -> Iterator[int]:
    """A loadgen server in its own process for the block; yields the port it listens on.

    `target(*args, ready)` sends its port through `ready` once it listens.
    """
    ctx = multiprocessing.get_context("spawn")
    receiver, sender = ctx.Pipe(duplex=False)
    server = ctx.Process(target=target, args=(*args, sender), daemon=True)
    server.start()
    sender.close()
    try:
        if not receiver.poll(30):
            raise RuntimeError(f"the {what} did not start")
        yield int(receiver.recv())
    finally:
        server.terminate()
        server.join(10)
