"""Run the real `mirror serve` command as a subprocess, and pull through it with skopeo."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from fakes.pki import CA, client_context
from prometheus_client.parser import text_string_to_metric_families

from .daemon import Daemon, NotReady, expect_status, free_port
from .images import _skopeo, _skopeo_env


class MirrorProcess(Daemon):
    """`python -m mirror serve` on 127.0.0.1:<free port>, with its log in a file."""

    name = "mirror"
    stop_grace = 15.0

    def __init__(
        self,
        workdir: Path,
        upstream: str | None,
        *,
        cache_dir: Path | None = None,
        env: dict[str, str] | None = None,
        port: int | None = None,
        argv: list[str] | None = None,
        workers: int | str | None = None,
    ) -> None:
        super().__init__(workdir, "mirror.log")
        self.workers = workers  # `--workers`; None: the setting's default (one process)
        self.upstream = upstream
        self.cache_dir = cache_dir or self.workdir / "cache"
        self.port = port or free_port()
        self.env = env or {}
        # A command line of its own (e.g. the image's ENTRYPOINT + CMD): then listen
        # address and cache directory must come from `env`.
        self.argv = argv

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def host(self) -> str:
        return f"127.0.0.1:{self.port}"

    def command(self) -> list[str]:
        if self.argv is not None:
            return self.argv
        cmd = [sys.executable, "-m", "mirror", "serve", "--listen", self.host]
        cmd += ["--cache-dir", str(self.cache_dir)]
        if self.upstream is not None:  # else `upstreams` come from env or a config file
            cmd += ["--upstream", self.upstream]
        if self.workers is not None:
            cmd += ["--workers", str(self.workers)]
        return cmd

    def worker_pids(self) -> dict[int, int]:
        """Worker index -> pid of its latest start, from the supervisor's log lines."""
        found = re.findall(r"worker (\d+) ready \(pid (\d+)\)", self.log())
        return {int(index): int(pid) for index, pid in found}

    @contextmanager
    def only(self, worker: int) -> Iterator[int]:
        """Every other worker stopped (SIGSTOP) meanwhile: new connections go to
        `worker` (its pid)."""
        pids = self.worker_pids()
        others = [pid for index, pid in pids.items() if index != worker]
        for pid in others:
            os.kill(pid, signal.SIGSTOP)
        try:
            yield pids[worker]
        finally:
            for pid in others:
                os.kill(pid, signal.SIGCONT)

    def environment(self) -> dict[str, str]:
        # The developer's own MIRROR_* settings must not leak into a test's mirror;
        # everything else (PYTHONPATH above all) is passed on.
        env = {k: v for k, v in os.environ.items() if not k.startswith("MIRROR_")}
        return {**env, **self.env}

    @property
    def metrics_url(self) -> str:
        return self.url + "/metrics"

    def check_ready(self) -> None:
        # Not /v2/: with client authentication on, it answers 401.
        expect_status(self.url + "/readyz", 200)
        self.check_workers()

    def check_workers(self) -> None:
        """The group serves once one worker does; a test wants all of them."""
        if isinstance(self.workers, int) and len(self.worker_pids()) < self.workers:
            raise NotReady(f"{len(self.worker_pids())} of {self.workers} workers ready")

    def terminate(self, sig: int = signal.SIGTERM, timeout: float = 60) -> int:
        """Send `sig` and wait for the process to exit by itself; its exit code."""
        assert self._proc is not None
        self._proc.send_signal(sig)
        code = self._proc.wait(timeout=timeout)
        self._proc = None
        return code

    def metrics(self) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
        """Samples from /metrics, keyed by (name, sorted labels)."""
        with urllib.request.urlopen(self.metrics_url, timeout=10) as resp:
            text = resp.read().decode()
        return {
            (s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text)
            for s in family.samples
        }

    def metric(self, name: str, **labels: str) -> float:
        return self.metrics().get((name, tuple(sorted(labels.items()))), 0.0)


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


def skopeo_list_tags(ref: str) -> list[str]:
    cmd = [_skopeo(), "list-tags", "--tls-verify=false", ref]
    with tempfile.TemporaryDirectory(prefix="skopeo-") as home:
        result = subprocess.run(cmd, capture_output=True, timeout=60, env=_skopeo_env(home))
    if result.returncode != 0:
        raise RuntimeError(f"skopeo list-tags {ref} failed: {result.stderr.decode()}")
    tags: list[str] = json.loads(result.stdout)["Tags"]
    return tags


class TLSMirror(MirrorProcess):
    """`mirror serve` with TLS on its port, and /metrics on a plain admin listener."""

    def __init__(self, workdir: Path, upstream: str | None, ca: CA, env: dict[str, str]) -> None:
        self.admin_port = free_port()
        env = {**env, "MIRROR_ADMIN_LISTEN": f"127.0.0.1:{self.admin_port}"}
        super().__init__(workdir, upstream, env=env)
        self.ca = ca

    @property
    def url(self) -> str:
        return f"https://127.0.0.1:{self.port}"

    @property
    def admin_url(self) -> str:
        return f"http://127.0.0.1:{self.admin_port}"

    def check_ready(self) -> None:
        context = client_context(self.ca)
        for url, ctx in ((f"{self.admin_url}/readyz", None), (f"{self.url}/v2/", context)):
            with urllib.request.urlopen(url, timeout=1, context=ctx) as resp:
                if resp.status != 200:
                    raise NotReady(f"{url}: {resp.status}")

    @property
    def metrics_url(self) -> str:
        return f"{self.admin_url}/metrics"
