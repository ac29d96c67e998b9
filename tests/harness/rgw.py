"""A real S3-compatible store for the tests: Ceph's RADOS Gateway, single node, on loopback.

One monitor, one OSD (BlueStore on a sparse file) and one RGW, everything (config,
keyrings, mon store, OSD, logs) in one directory, up in about 2.5 s. The settings
that matter were measured (../shared field notes): a pool size of 1 (RGW hangs at start
with the default of 3), fast Paxos and BlueStore polling (start-up 19 s -> 2.5 s), the
block file outside the OSD directory, msgr2 on loopback only. Daemons run as `ceph`
when started as root, so the directory lives under /tmp with mode 755 (pytest's
tmp_path is not reachable by that user).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
import uuid
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import ClassVar, Self

from .daemon import Daemon, NotReady, expect_status, find_binary, free_port

BLOCK_SIZE = 20 << 30  # sparse: only what is written takes space


@dataclass(frozen=True)
class S3Credentials:
    access_key: str
    secret_key: str


def _as_ceph() -> list[str]:
    return ["--setuser", "ceph", "--setgroup", "ceph"] if os.geteuid() == 0 else []


class _CephDaemon(Daemon):
    """One Ceph daemon in the foreground (`-f`), its log in the cluster's directory."""

    name: ClassVar[str] = "ceph"
    start_timeout: ClassVar[float] = 30.0

    def __init__(self, cluster: RadosGateway, binary: str, args: list[str]) -> None:
        super().__init__(cluster.root, f"{binary}.out")
        self._cluster = cluster
        self._binary = binary
        self._args = args

    def command(self) -> list[str]:
        path = find_binary(self._binary, "radosgw" if self._binary == "radosgw" else "ceph")
        return [path, "-f", "-c", str(self._cluster.conf), *self._args, *_as_ceph()]

    def check_ready(self) -> None:
        self._cluster.check(self._binary)


class RadosGateway:
    """`with RadosGateway() as rgw:` -> rgw.endpoint, rgw.credentials (an S3 user)."""

    def __init__(self) -> None:
        self.root = Path(tempfile.mkdtemp(prefix="rgw-", dir="/tmp"))
        self.root.chmod(0o755)
        self.conf = self.root / "ceph.conf"
        self.port = free_port()
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self.credentials = S3Credentials("", "")
        self._daemons: list[_CephDaemon] = []

    # -- lifecycle ----------------------------------------------------------------------

    def start(self) -> Self:
        try:
            self._configure()
            self._run("ceph-mon", ["-i", "a", "--mkfs", "--monmap", str(self.root / "monmap")])
            self._start("ceph-mon", ["-i", "a"])
            osd_uuid = str(uuid.uuid4())
            self._ceph("osd", "new", osd_uuid, "0")
            block = self.root / "osd-block"
            with block.open("wb") as f:
                f.truncate(BLOCK_SIZE)
            self._chown()
            self._run("ceph-osd", ["-i", "0", "--mkfs", "--osd-uuid", osd_uuid])
            self._start("ceph-osd", ["-i", "0"])
            self._start("radosgw", ["-n", "client.rgw"])
            user = json.loads(
                self._admin("user", "create", "--uid=mirror", "--display-name=mirror")
            )
            key = user["keys"][0]
            self.credentials = S3Credentials(key["access_key"], key["secret_key"])
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        for daemon in reversed(self._daemons):
            daemon.stop()
        self._daemons.clear()
        shutil.rmtree(self.root, ignore_errors=True)

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def create_bucket(self, name: str) -> None:
        """PUT a bucket, signed with SigV4 by curl (no S3 SDK in the test deps)."""
        c = self.credentials
        _quiet(
            [
                find_binary("curl", "curl"),
                "-sSf",
                "-X",
                "PUT",
                "--aws-sigv4",
                "aws:amz:us-east-1:s3",
                "--user",
                f"{c.access_key}:{c.secret_key}",
                "-H",
                "x-amz-content-sha256: UNSIGNED-PAYLOAD",
                f"{self.endpoint}/{name}",
            ]
        )

    def stop_gateway(self) -> None:
        """Stop the RGW daemon only (the S3 endpoint goes away; the cluster stays)."""
        gateway = next(d for d in self._daemons if d._binary == "radosgw")
        gateway.stop()
        self._daemons.remove(gateway)

    def start_gateway(self) -> None:
        self._start("radosgw", ["-n", "client.rgw"])

    # -- readiness ------------------------------------------------------------------------

    def check(self, daemon: str) -> None:
        if daemon == "ceph-mon":
            self._ceph("mon", "stat")
        elif daemon == "ceph-osd":
            if '"num_up_osds":1' not in self._ceph("osd", "stat", "-f", "json").replace(" ", ""):
                raise NotReady("the OSD is not up yet")
        else:
            expect_status(self.endpoint + "/", 200)

    # -- internals ------------------------------------------------------------------------

    def _configure(self) -> None:
        root = self.root
        for sub in ("run", "log", "crash", "mon", "osd", "rgw"):
            (root / sub).mkdir()
        fsid = str(uuid.uuid4())
        mon_port = free_port()
        low = free_port()
        self.conf.write_text(
            f"""[global]
fsid = {fsid}
mon host = [v2:127.0.0.1:{mon_port}]
mon initial members = a
public addr = 127.0.0.1
cluster addr = 127.0.0.1
ms bind msgr1 = false
ms bind port min = {low}
ms bind port max = {low + 40}
keyring = {root}/keyring
run dir = {root}/run
log file = {root}/log/$name.log
admin socket = {root}/run/$name.asok
crash dir = {root}/crash
osd pool default size = 1
osd pool default min size = 1
osd pool default pg num = 8
osd pool default pgp num = 8
osd pool default pg autoscale mode = off
mon allow pool size one = true
mon data avail crit = 0
paxos propose interval = 0.05
bdev aio poll ms = 10
osd memory target = 1073741824
# Deleted objects would otherwise stay 2 h until garbage collection.
rgw gc obj min wait = 1
rgw gc processor period = 5
[mon.a]
mon data = {root}/mon
[osd.0]
osd data = {root}/osd
bluestore block path = {root}/osd-block
[client.rgw]
# tcp_nodelay: without it 2-7% of small GETs wait 40 ms for delayed ACKs (measured).
rgw frontends = beast endpoint=127.0.0.1:{self.port} tcp_nodelay=1
rgw data = {root}/rgw
"""
        )
        # One keyring with every daemon's key, made before the monitor's mkfs imports
        # it: no `ceph auth` calls needed.
        keyring = str(root / "keyring")
        authtool = find_binary("ceph-authtool", "ceph-common")
        for name, caps in (
            ("mon.", ["--cap", "mon", "allow *"]),
            (
                "client.admin",
                ["--cap", "mon", "allow *", "--cap", "osd", "allow *", "--cap", "mgr", "allow *"],
            ),
            ("osd.0", ["--cap", "mon", "allow profile osd", "--cap", "osd", "allow *"]),
            ("client.rgw", ["--cap", "mon", "allow rw", "--cap", "osd", "allow rwx"]),
        ):
            create = ["--create-keyring"] if name == "mon." else []
            _quiet([authtool, keyring, *create, "--gen-key", "-n", name, *caps])
        _quiet(
            [
                find_binary("monmaptool", "ceph-common"),
                "--create",
                "--addv",
                "a",
                f"[v2:127.0.0.1:{mon_port}]",
                "--fsid",
                fsid,
                str(root / "monmap"),
            ]
        )
        self._chown()

    def _chown(self) -> None:
        if os.geteuid() == 0:
            _quiet(["chown", "-R", "ceph:ceph", str(self.root)])

    def _run(self, binary: str, args: list[str]) -> None:
        path = find_binary(binary, "ceph")
        _quiet([path, "-c", str(self.conf), *args, *_as_ceph()])

    def _start(self, binary: str, args: list[str]) -> None:
        daemon = _CephDaemon(self, binary, args)
        self._daemons.append(daemon)
        daemon.start()

    def _ceph(self, *args: str) -> str:
        return _quiet([find_binary("ceph", "ceph-common"), "-c", str(self.conf), *args])

    def _admin(self, *args: str) -> str:
        return _quiet([find_binary("radosgw-admin", "radosgw"), "-c", str(self.conf), *args])


def _quiet(command: list[str]) -> str:
    """Run a setup command; its output, or an error with its stderr."""
    result = subprocess.run(command, capture_output=True, text=True, timeout=30)
    if result.returncode != 0:
        raise RuntimeError(f"{command[0]} failed ({result.returncode}): {result.stderr[-2000:]}")
    return result.stdout
