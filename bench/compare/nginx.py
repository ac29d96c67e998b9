"""nginx as a third reference: `proxy_cache` in front of the upstream, hits sent with sendfile.

The approach of rpardini/docker-registry-proxy, cut down to what a blob GET needs: the
cache key is the URI (a blob's URI names its digest), 200 answers are kept, and
`proxy_cache_lock` lets one request per key go upstream while the others wait for the
cache entry. nginx has no token dance of its own: it forwards every request with a
bearer token the bench obtained beforehand from the harness's token server, valid for
the whole run. Its CPU is that of the master and all its workers together.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import shutil
import signal
import subprocess
from pathlib import Path

from front import Front
from harness import TokenServer, free_port

from .processes import Subject, http_get, wait_until
from .sampling import children

NGINX = "nginx"
TOKEN_TTL = 6 * 3600  # longer than any run; Docker Hub's own are 300 s
# error.log levels that mean something went wrong ("[warn]" is nginx buffering a large
# upstream body to a temp file, which is how proxy_cache works).
_TROUBLE = re.compile(r"\[(error|crit|alert|emerg)\]")
# The access log's format below: method, URI, status, cache status.
_ACCESS = re.compile(r"^(?P<method>[A-Z]+) \S+ (?P<status>\d{3}) (?P<cache>\S+)$")


def nginx_binary() -> str | None:
    """nginx on PATH, or where Debian's package puts it (/usr/sbin is not on every PATH)."""
    found = shutil.which("nginx")
    if found is None and os.access("/usr/sbin/nginx", os.X_OK):
        found = "/usr/sbin/nginx"
    return found


def cache_file(cache_dir: Path, key: str) -> Path:
    """Where `proxy_cache_path ... levels=1:2` keeps the entry for `key`."""
    md5 = hashlib.md5(key.encode(), usedforsecurity=False).hexdigest()
    return cache_dir / md5[-1] / md5[-3:-1] / md5


def nginx_conf(
    workdir: Path, port: int, upstream: str, token: str, workers: str = "1", as_root: bool = True
) -> str:
    """The whole nginx.conf: every path inside `workdir`, listening on 127.0.0.1:`port`."""
    w = str(workdir)
    # Workers drop to `nobody` when the master runs as root; the cache is in a 0700
    # temporary directory of root's, so they stay root here.
    user = "user root;\n" if as_root else ""
    return f"""{user}daemon off;
master_process on;
worker_processes {workers};
pid {w}/nginx.pid;
error_log {w}/error.log warn;
events {{ worker_connections 4096; }}
http {{
    log_format bench '$request_method $uri $status $upstream_cache_status';
    access_log {w}/access.log bench;
    client_body_temp_path {w}/client_body;
    proxy_temp_path {w}/proxy_temp;
    fastcgi_temp_path {w}/fastcgi_temp;
    uwsgi_temp_path {w}/uwsgi_temp;
    scgi_temp_path {w}/scgi_temp;
    sendfile on;
    tcp_nopush on;
    keepalive_timeout 65;
    proxy_cache_path {w}/cache levels=1:2 keys_zone=blobs:16m max_size=64g inactive=1d
                     use_temp_path=off;
    server {{
        listen 127.0.0.1:{port};
        location /v2/ {{
            proxy_pass {upstream};
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_set_header Authorization "Bearer {token}";
            proxy_read_timeout 600s;
            proxy_buffering on;
            proxy_cache blobs;
            proxy_cache_key $uri;
            proxy_cache_valid 200 1d;
            proxy_cache_lock on;
            # The default 5 s would send waiting clients upstream uncached during a
            # slow cold miss: they wait for the one download instead.
            proxy_cache_lock_timeout 1h;
            proxy_cache_lock_age 1h;
            # A storage driver that redirects blob GETs (S3): follow it here and cache
            # the target's answer under the blob's URI (a target named by host name
            # would also need a `resolver`). The filesystem driver used by this bench
            # answers 200 itself, so this path is not exercised here.
            proxy_intercept_errors on;
            error_page 301 302 307 = @redirected;
        }}
        location @redirected {{
            set $target $upstream_http_location;
            proxy_pass $target;
            proxy_http_version 1.1;
            proxy_set_header Authorization "";
            proxy_read_timeout 600s;
            proxy_cache blobs;
            proxy_cache_key $uri;
            proxy_cache_valid 200 1d;
            proxy_cache_lock on;
            proxy_cache_lock_timeout 1h;
            proxy_cache_lock_age 1h;
        }}
    }}
}}
"""


class Nginx(Subject):
    label = NGINX
    title = "nginx proxy_cache"

    def __init__(
        self,
        root: Path,
        front: Front,
        tokens: TokenServer,
        repos: list[str],
        workers: str = "1",
        label: str = NGINX,
    ) -> None:
        super().__init__(root, front)
        self.tokens = tokens
        self.repos = repos
        self.workers = workers
        self.label = label
        self.binary = nginx_binary()
        self._proc: subprocess.Popen[bytes] | None = None
        self._port = 0

    @property
    def port(self) -> int:
        return self._port

    @property
    def root_pid(self) -> int:
        if self._proc is None:
            raise RuntimeError("nginx is not running")
        return self._proc.pid

    @property
    def pid(self) -> int:
        """The (first) worker: the process that serves, whose RSS is comparable."""
        workers = children(self.root_pid)
        return min(workers) if workers else self.root_pid

    def blob_path(self, digest: str) -> Path:
        assert self.workdir is not None
        return cache_file(self.workdir / "cache", f"/v2/{self.repos[0]}/blobs/{digest}")

    def settle(self, digest: str, size: int, timeout: float = 180) -> None:
        # The cache file starts with nginx's own header, so it is larger than the blob.
        path = self.blob_path(digest)

        def committed() -> bool:
            with contextlib.suppress(OSError):
                return path.stat().st_size >= size
            return False

        wait_until(committed, timeout, f"{self.label} to cache {digest[:19]}")

    def _start(self, workdir: Path) -> None:
        if self.binary is None:
            raise RuntimeError("nginx is not installed (bash scripts/system-deps.sh)")
        workdir.mkdir(parents=True)
        self._port = free_port()
        access = [{"type": "repository", "name": r, "actions": ["pull"]} for r in self.repos]
        token = self.tokens.issue(access, "pusher", expires_in=TOKEN_TTL)
        conf = workdir / "nginx.conf"
        conf.write_text(
            nginx_conf(workdir, self._port, self.front.url, token, self.workers, os.geteuid() == 0)
        )
        with (workdir / "stderr.log").open("ab") as log:
            self._proc = subprocess.Popen(
                [self.binary, "-p", str(workdir), "-e", str(workdir / "error.log"), "-c", conf],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
            )

        def ready() -> bool:
            if self._proc is not None and self._proc.poll() is not None:
                raise RuntimeError(f"nginx exited:\n{self._log()}")
            with contextlib.suppress(OSError):
                # Through to the upstream: /v2/ answers 200 with the token.
                return http_get(self.url + "/v2/", {})[0] == 200
            return False

        wait_until(ready, 20, "nginx to answer GET /v2/")

    def _stop(self) -> None:
        proc = self._proc
        if proc is None or proc.poll() is not None:
            self._proc = None
            return
        workers = children(proc.pid)
        # QUIT: workers finish their responses and exit; TERM: they exit at once. A
        # master killed outright would leave its workers behind, holding the port.
        for sig, wait in ((signal.SIGQUIT, 10), (signal.SIGTERM, 5)):
            proc.send_signal(sig)
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=wait)
                break
        else:
            for pid in [*workers, proc.pid]:
                with contextlib.suppress(OSError):
                    os.kill(pid, signal.SIGKILL)
            proc.wait()
        self._proc = None

    def _log(self) -> str:
        assert self.workdir is not None
        parts = []
        for name in ("stderr.log", "error.log", "access.log"):
            path = self.workdir / name
            if path.exists():
                parts.append(path.read_text(errors="replace"))
        return "\n".join(parts)

    def _scan(self, text: str) -> None:
        for line in text.splitlines():
            if access := _ACCESS.match(line):
                self.statuses[f"{access['method']} {access['status']} {access['cache']}"] += 1
            elif _TROUBLE.search(line):
                self.findings[re.sub(r"^\S+ \S+ ", "", line)[:200]] += 1
