"""Run the real `mirror serve` command as a subprocess, and pull through it with skopeo."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path
from types import TracebackType

from prometheus_client.parser import text_string_to_metric_families

from .images import _skopeo, _skopeo_env
from .registry import free_port


class MirrorProcess:
    """`python -m mirror serve` on 127.0.0.1:<free port>, with its log in a file."""

    def __init__(
        self,
        workdir: Path,
        upstream: str | None,
        *,
        cache_dir: Path | None = None,
        env: dict[str, str] | None = None,
        port: int | None = None,
        argv: list[str] | None = None,
    ) -> None:
        self.workdir = workdir
        self.upstream = upstream
        self.cache_dir = cache_dir or workdir / "cache"
        self.port = port or free_port()
        self.log_path = workdir / "mirror.log"
        self.env = env or {}
        # A command line of its own (e.g. the image's ENTRYPOINT + CMD): then listen
        # address and cache directory must come from `env`.
        self.argv = argv
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def host(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self, timeout: float = 20.0) -> MirrorProcess:
        self.workdir.mkdir(parents=True, exist_ok=True)
        cmd = [
            sys.executable,
            "-m",
            "mirror",
            "serve",
            "--listen",
            self.host,
            "--cache-dir",
            str(self.cache_dir),
        ]
        if self.upstream is not None:  # else `upstreams` come from env or a config file
            cmd += ["--upstream", self.upstream]
        if self.argv is not None:
            cmd = self.argv
        env = {k: v for k, v in os.environ.items() if not k.startswith("MIRROR_")}
        with self.log_path.open("ab") as log:
            self._proc = subprocess.Popen(
                cmd, stdout=log, stderr=subprocess.STDOUT, env={**env, **self.env}
            )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                raise RuntimeError(f"mirror exited ({self._proc.returncode}):\n{self.log()}")
            try:
                with urllib.request.urlopen(self.url + "/v2/", timeout=1) as resp:
                    if resp.status == 200:
                        return self
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"mirror did not become ready:\n{self.log()}")

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self._proc is None:
            return
        if self._proc.poll() is None:
            self._proc.send_signal(sig)
            try:
                self._proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()
        self._proc = None

    def terminate(self, sig: int = signal.SIGTERM, timeout: float = 60) -> int:
        """Send `sig` and wait for the process to exit by itself; its exit code."""
        assert self._proc is not None
        self._proc.send_signal(sig)
        code = self._proc.wait(timeout=timeout)
        self._proc = None
        return code

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def metrics(self) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
        """Samples from /metrics, keyed by (name, sorted labels)."""
        with urllib.request.urlopen(self.url + "/metrics", timeout=10) as resp:
            text = resp.read().decode()
        return {
            (s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text)
            for s in family.samples
        }

    def metric(self, name: str, **labels: str) -> float:
        return self.metrics().get((name, tuple(sorted(labels.items()))), 0.0)

    def __enter__(self) -> MirrorProcess:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


def skopeo_copy(
    source: str, dest: str, *, multi_arch: bool = False, extra: list[str] | None = None
) -> subprocess.CompletedProcess[str]:
    """`skopeo copy` with TLS verification off for loopback registries; never raises."""
    cmd = [
        _skopeo(),
        "--insecure-policy",
        "copy",
        "--src-tls-verify=false",
        "--dest-tls-verify=false",
        *(extra or []),
    ]
    if multi_arch:
        cmd += ["--multi-arch", "all"]
    cmd += [source, dest]
    with tempfile.TemporaryDirectory(prefix="skopeo-") as home:
        return subprocess.run(
            cmd, capture_output=True, text=True, timeout=120, env=_skopeo_env(home)
        )


def skopeo_inspect_raw(ref: str) -> bytes:
    cmd = [_skopeo(), "--insecure-policy", "inspect", "--tls-verify=false", "--raw", ref]
    with tempfile.TemporaryDirectory(prefix="skopeo-") as home:
        result = subprocess.run(cmd, capture_output=True, timeout=60, env=_skopeo_env(home))
    if result.returncode != 0:
        raise RuntimeError(f"skopeo inspect {ref} failed: {result.stderr.decode()}")
    return result.stdout
