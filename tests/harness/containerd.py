"""Run a real containerd daemon, private to one test, and pull images with `ctr`.

The daemon gets its own root, state and config; it listens on a unix socket only
(no debug, metrics or TCP gRPC address), and has CRI, the runtimes and every
snapshotter but `native` disabled, so it needs no kernel support beyond bind mounts.

Pulls go through `ctr images pull --hosts-dir`: the `ctr` process resolves and
fetches over HTTP itself (the daemon only stores content and unpacks), so
`hosts.toml` files written by `write_hosts_toml` decide where the requests go.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

from mirror.hosts import hosts_toml

from .daemon import Daemon, NotReady, find_binary

# Everything that could make containerd touch host paths, the network or the kernel
# in ways a test does not need. The daemon then loads: content, metadata (bolt),
# the native snapshotter, the walking differ, gc, and the gRPC image/content services.
DISABLED_PLUGINS = (
    "io.containerd.grpc.v1.cri",
    "io.containerd.internal.v1.opt",  # would create /opt/containerd
    "io.containerd.internal.v1.tracing",
    "io.containerd.tracing.processor.v1.otlp",
    "io.containerd.snapshotter.v1.aufs",
    "io.containerd.snapshotter.v1.btrfs",
    "io.containerd.snapshotter.v1.devmapper",
    "io.containerd.snapshotter.v1.overlayfs",
    "io.containerd.snapshotter.v1.zfs",
    "io.containerd.runtime.v1.linux",
    "io.containerd.runtime.v2.task",
    "io.containerd.monitor.v1.cgroups",
    "io.containerd.internal.v1.restart",
    "io.containerd.service.v1.tasks-service",
    "io.containerd.grpc.v1.tasks",
)

SNAPSHOTTER = "native"

# Proxy variables would only matter for non-loopback hosts (Go never proxies
# 127.0.0.1), but a test must not depend on that.
_PROXY_VARS = {"http_proxy", "https_proxy", "all_proxy", "no_proxy"}


def _toml_str(value: str) -> str:
    # A JSON string is a valid TOML basic string.
    return json.dumps(value)


def _unescape_mountinfo(field: str) -> str:
    # /proc/self/mountinfo writes space, tab, newline and backslash as \ooo.
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m[1], 8)), field)


def mounts_under(path: Path) -> list[Path]:
    """Mount points at or below `path`, deepest first."""
    base = os.path.realpath(path)
    found = []
    with open("/proc/self/mountinfo") as info:
        for line in info:
            point = _unescape_mountinfo(line.split()[4])
            if point == base or point.startswith(base + "/"):
                found.append(Path(point))
    return sorted(found, key=lambda p: len(p.parts), reverse=True)


def hosts_directory(registry: str) -> str:
    """The directory name containerd 1.6 looks up under --hosts-dir for `registry`.

    It is the registry host as written in the reference, port included
    (`regb.test:5000`); Docker Hub is `docker.io`. A registry without a directory
    of its own falls back to `_default` (checked with containerd 1.6.20), so
    `registry="_default"` configures every other registry.
    """
    if "/" in registry or registry in ("", ".", ".."):
        raise ValueError(f"not a registry host: {registry!r}")
    return registry


def write_hosts_toml(
    hosts_dir: Path, registry: str, mirror_url: str, server: str | None = None
) -> Path:
    """Write `<hosts_dir>/<registry>/hosts.toml` sending pulls of `registry` to the mirror.

    `mirror_url` is the mirror's base URL (`http://127.0.0.1:PORT`): with the scheme
    in the host key, plain HTTP needs neither `--plain-http` nor `skip_verify` (those
    are about TLS). `server` is where containerd falls back when the mirror fails;
    tests must set it to an unreachable loopback address so nothing can leave the
    machine (without it, `docker.io` falls back to registry-1.docker.io).
    """
    if urlsplit(mirror_url).scheme not in ("http", "https"):
        raise ValueError(f"mirror_url needs a scheme: {mirror_url!r}")
    directory = hosts_dir / hosts_directory(registry)
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "hosts.toml"
    # The file `mirror containerd-hosts` writes, with the test's own fallback server.
    path.write_text(hosts_toml(mirror_url, server))
    return path


@dataclass(frozen=True)
class CtrImage:
    """One row of `ctr images ls`."""

    ref: str
    media_type: str
    digest: str


@dataclass(frozen=True)
class CtrCheck:
    """One row of `ctr images check`: `complete` once every blob of the platform is in."""

    status: str
    unpacked: bool


class Containerd(Daemon):
    """A private containerd daemon: `with Containerd(workdir) as ctd: ctd.pull(...)`."""

    name = "containerd"
    new_session = True

    def __init__(self, workdir: Path, *, namespace: str = "mirror-test") -> None:
        super().__init__(Path(workdir).absolute(), "containerd.log")
        self.namespace = namespace
        self.root = self.workdir / "root"
        self.state = self.workdir / "state"
        self.config_path = self.workdir / "config.toml"
        self._sockdir: Path | None = None

    @property
    def address(self) -> str:
        # A unix socket path must fit in sun_path (108 bytes): pytest's tmp_path
        # may not, so the sockets live in a short directory of their own.
        if self._sockdir is None:
            raise RuntimeError("containerd is not started")
        return str(self._sockdir / "c.sock")

    def command(self) -> list[str]:
        return [find_binary("containerd", "containerd"), "--config", str(self.config_path)]

    def prepare(self) -> None:
        (self.workdir / "tmp").mkdir(exist_ok=True)
        self._sockdir = Path(tempfile.mkdtemp(prefix="ctd-", dir="/tmp"))
        disabled = ", ".join(_toml_str(p) for p in DISABLED_PLUGINS)
        config = f"""\
version = 2
root = {_toml_str(str(self.root))}
state = {_toml_str(str(self.state))}
temp = {_toml_str(str(self.workdir / "tmp"))}
disabled_plugins = [{disabled}]

[grpc]
  address = {_toml_str(self.address)}
  tcp_address = ""

[ttrpc]
  address = {_toml_str(self.address + ".ttrpc")}

[debug]
  address = ""
  level = "debug"

[metrics]
  address = ""

[plugins."io.containerd.gc.v1.scheduler"]
  startup_delay = "100ms"
"""
        self.config_path.write_text(config)

    def check_ready(self) -> None:
        if not Path(self.address).exists():
            raise NotReady(f"no socket at {self.address} yet")
        result = self.ctr("version", timeout=5)
        if result.returncode != 0:
            raise NotReady(result.stderr.strip())

    def cleanup(self) -> None:
        self._unmount()
        if self._sockdir is not None:
            shutil.rmtree(self._sockdir, ignore_errors=True)
            self._sockdir = None

    def _unmount(self) -> None:
        # The native snapshotter unpacks through bind mounts under root/tmpmounts;
        # containerd removes them itself, unless it was killed mid-unpack.
        for base in (self.root, self.state, self.workdir / "tmp"):
            for point in mounts_under(base):
                subprocess.run(["umount", "--lazy", str(point)], capture_output=True, check=False)

    def environment(self) -> dict[str, str]:
        return {k: v for k, v in os.environ.items() if k.lower() not in _PROXY_VARS}

    def ctr(self, *args: str, timeout: float = 60.0) -> subprocess.CompletedProcess[str]:
        """`ctr --address SOCK --namespace NS ARGS...`; never raises on a non-zero exit."""
        cmd = [
            find_binary("ctr", "containerd"),
            "--address",
            self.address,
            "--namespace",
            self.namespace,
            *args,
        ]
        return subprocess.run(
            cmd,
            capture_output=True,
            text=True,
            timeout=timeout,
            env=self.environment(),
            check=False,
        )

    def pull(
        self,
        ref: str,
        hosts_dir: Path,
        platform: str = "linux/amd64",
        *,
        timeout: float = 60.0,
        http_dump: bool = False,
        user: str | None = None,
    ) -> subprocess.CompletedProcess[str]:
        """`ctr images pull` with unpack into the native snapshotter.

        `ref` is fully qualified (`docker.io/library/small:v1`); `hosts_dir` holds
        the `hosts.toml` files. With `http_dump`, ctr writes every request and
        response to stderr. `user` ("name:password") is offered to every host that
        asks for credentials.
        """
        args = ["images", "pull", "--hosts-dir", str(hosts_dir), "--platform", platform]
        args += ["--snapshotter", SNAPSHOTTER]
        if user is not None:
            args += ["--user", user]
        if http_dump:
            args.append("--http-dump")
        return self.ctr(*args, ref, timeout=timeout)

    def images(self) -> dict[str, CtrImage]:
        """The images in our namespace, by reference."""
        result = self.ctr("images", "ls")
        if result.returncode != 0:
            raise RuntimeError(f"ctr images ls failed: {result.stderr}")
        found = {}
        for line in result.stdout.splitlines()[1:]:  # REF TYPE DIGEST SIZE PLATFORMS LABELS
            fields = line.split()
            if len(fields) >= 3:
                found[fields[0]] = CtrImage(fields[0], fields[1], fields[2])
        return found

    def image_digest(self, ref: str) -> str:
        """The digest of the manifest (or index) `ref` points to."""
        images = self.images()
        if ref not in images:
            raise AssertionError(f"{ref} is not in containerd; it has {sorted(images)}")
        return images[ref].digest

    def check(self, ref: str) -> CtrCheck:
        """`ctr images check` for `ref`, against our snapshotter (ctr's default is overlayfs)."""
        result = self.ctr("images", "check", "--snapshotter", SNAPSHOTTER, f"name=={ref}")
        if result.returncode != 0:
            raise RuntimeError(f"ctr images check failed: {result.stderr}")
        # REF TYPE DIGEST STATUS SIZE UNPACKED, e.g. `... complete (2/2) 4.5 KiB/4.5 KiB true`
        for line in result.stdout.splitlines()[1:]:
            fields = line.split()
            if fields and fields[0] == ref:
                return CtrCheck(status=fields[3], unpacked=fields[-1] == "true")
        raise AssertionError(f"{ref} missing from ctr images check:\n{result.stdout}")

    def snapshot_dirs(self) -> list[Path]:
        """The native snapshotter's layer directories: unpacked files live here."""
        snapshots = self.root / f"io.containerd.snapshotter.v1.{SNAPSHOTTER}" / "snapshots"
        if not snapshots.is_dir():
            return []
        return sorted(p for p in snapshots.iterdir() if p.is_dir())
