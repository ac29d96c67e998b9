"""Deterministic OCI layouts, pushed into a Registry with skopeo, plus tiny HTTP helpers."""

from __future__ import annotations

import base64
import gzip
import hashlib
import io
import json
import os
import random
import shutil
import subprocess
import tarfile
import tempfile
import urllib.error
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass, field
from email.message import Message
from pathlib import Path
from typing import Any, ClassVar
from urllib.parse import urlencode

from .registry import Registry
from .tokenserver import TokenServer

OCI_INDEX = "application/vnd.oci.image.index.v1+json"
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
OCI_LAYER = "application/vnd.oci.image.layer.v1.tar+gzip"
DOCKER_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
LIST_TYPES = (OCI_INDEX, DOCKER_LIST)
# Distribution 2.8 answers 404 for OCI manifests/indexes unless their exact type is accepted
# (*/* is not enough), 400 for a schema2 tag without the schema2 type, and serves the
# linux/amd64 child instead of a manifest list by tag unless the list type is accepted.
MANIFEST_ACCEPT = ", ".join((OCI_INDEX, DOCKER_LIST, OCI_MANIFEST, DOCKER_MANIFEST))

_EPOCH = 1_700_000_000
_SKOPEO_TIMEOUT = 120

Descriptor = dict[str, Any]
Files = Sequence[tuple[str, bytes]]


def sha256_digest(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def seeded_bytes(seed: str, size: int) -> bytes:
    # Reproducibility is the point here; nothing secret is derived from it.
    return random.Random(seed).randbytes(size)


def _canonical(obj: Any) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()


def make_layer(files: Files) -> tuple[bytes, str]:
    """A gzipped tar and its diff_id; fixed order, owner and mtimes make it byte-stable."""
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        dirs = sorted({str(Path(name).parent) for name, _ in files} - {"."})
        for name in dirs:
            info = tarfile.TarInfo(name)
            info.type, info.mode, info.mtime = tarfile.DIRTYPE, 0o755, _EPOCH
            tar.addfile(info)
        for name, data in sorted(files):
            info = tarfile.TarInfo(name)
            info.size, info.mode, info.mtime = len(data), 0o644, _EPOCH
            tar.addfile(info, io.BytesIO(data))
    tar_bytes = raw.getvalue()
    return gzip.compress(tar_bytes, compresslevel=6, mtime=0), sha256_digest(tar_bytes)


class Layout:
    """An OCI image layout directory (image-spec v1.0) written by hand."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        (self.root / "blobs" / "sha256").mkdir(parents=True, exist_ok=True)
        (self.root / "oci-layout").write_bytes(_canonical({"imageLayoutVersion": "1.0.0"}))
        self._refs: dict[str, Descriptor] = {}
        self._write_index()

    def blob(self, data: bytes, media_type: str) -> Descriptor:
        digest = sha256_digest(data)
        (self.root / "blobs" / "sha256" / digest.removeprefix("sha256:")).write_bytes(data)
        return {"mediaType": media_type, "digest": digest, "size": len(data)}

    def read(self, digest: str) -> bytes:
        return (self.root / "blobs" / "sha256" / digest.removeprefix("sha256:")).read_bytes()

    def image(self, layers: Sequence[Files], arch: str = "amd64") -> Descriptor:
        built = [make_layer(files) for files in layers]
        config = {
            "architecture": arch,
            "os": "linux",
            "created": "2024-01-01T00:00:00Z",
            "config": {"Cmd": ["/bin/true"], "Env": ["PATH=/bin"]},
            "rootfs": {"type": "layers", "diff_ids": [diff_id for _, diff_id in built]},
        }
        manifest = {
            "schemaVersion": 2,
            "mediaType": OCI_MANIFEST,
            "config": self.blob(_canonical(config), OCI_CONFIG),
            "layers": [self.blob(gz, OCI_LAYER) for gz, _ in built],
        }
        return self.blob(_canonical(manifest), OCI_MANIFEST)

    def index(self, children: dict[str, Descriptor]) -> Descriptor:
        manifests = []
        for platform, child in children.items():
            os_name, arch = platform.split("/")
            manifests.append({**child, "platform": {"architecture": arch, "os": os_name}})
        index = {"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": manifests}
        return self.blob(_canonical(index), OCI_INDEX)

    def tag(self, descriptor: Descriptor, ref_name: str) -> None:
        annotations = {"org.opencontainers.image.ref.name": ref_name}
        self._refs[ref_name] = {**descriptor, "annotations": annotations}
        self._write_index()

    def _write_index(self) -> None:
        index = {"schemaVersion": 2, "manifests": list(self._refs.values())}
        (self.root / "index.json").write_bytes(_canonical(index))


def _skopeo() -> str:
    binary = shutil.which("skopeo")
    if binary is None:
        raise RuntimeError("skopeo is not on PATH; install the Debian package 'skopeo'")
    return binary


def push(
    layout_dir: Path,
    ref_name: str,
    registry: Registry | str,
    repo: str,
    tag: str,
    *,
    creds: tuple[str, str] = ("pusher", "pushpass"),
    fmt: str | None = None,
    multi_arch: bool = False,
) -> str:
    """Copy one layout ref to registry (or a host:port); returns the stored manifest digest."""
    host = registry.host if isinstance(registry, Registry) else registry
    with tempfile.TemporaryDirectory(prefix="skopeo-") as scratch:
        digestfile = Path(scratch) / "digest"
        cmd = [_skopeo(), "--insecure-policy", "copy", "--dest-tls-verify=false"]
        cmd += ["--dest-creds", ":".join(creds), "--digestfile", str(digestfile)]
        # Converting to another format rewrites manifests, which --preserve-digests forbids.
        cmd += ["--preserve-digests"] if fmt is None else ["--format", fmt]
        if multi_arch:
            cmd += ["--multi-arch", "all"]
        cmd += [f"oci:{layout_dir}:{ref_name}", f"docker://{host}/{repo}:{tag}"]
        result = subprocess.run(
            cmd, capture_output=True, text=True, timeout=_SKOPEO_TIMEOUT, env=_skopeo_env(scratch)
        )
        if result.returncode != 0:
            raise RuntimeError(
                f"skopeo push of {ref_name} to {repo}:{tag} failed ({result.returncode}):\n"
                f"{' '.join(cmd)}\n{result.stderr}"
            )
        return digestfile.read_text().strip()


def _skopeo_env(home: str) -> dict[str, str]:
    # skopeo's blob-info cache outlives runs and steers which blobs it mounts or skips.
    # As root it lives in /var/lib/containers; claiming to be rootless moves it under
    # XDG_DATA_HOME, so each push starts from nothing and leaves nothing behind.
    return {
        **os.environ,
        "_CONTAINERS_ROOTLESS_UID": str(os.geteuid() or 1),
        "HOME": home,
        "XDG_DATA_HOME": f"{home}/data",
        "XDG_CONFIG_HOME": f"{home}/config",
    }


def fetch_token(
    tokenserver_or_realm: TokenServer | str,
    repo: str,
    actions: str = "pull",
    creds: tuple[str, str] | None = None,
    *,
    service: str | None = None,
) -> str:
    if isinstance(tokenserver_or_realm, TokenServer):
        realm = tokenserver_or_realm.realm
        service = service or tokenserver_or_realm.service
    else:
        realm = tokenserver_or_realm
    query = urlencode(
        {"service": service or "registry.docker.io", "scope": f"repository:{repo}:{actions}"}
    )
    request = urllib.request.Request(f"{realm}?{query}")
    if creds is not None:
        basic = base64.b64encode(":".join(creds).encode()).decode()
        request.add_header("Authorization", f"Basic {basic}")
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            token: str = json.load(response)["token"]
    except urllib.error.HTTPError as err:
        # Callers still get .code; an unclosed error would leak its socket.
        err.close()
        raise
    return token


def registry_get(
    registry: Registry | str,
    path: str,
    token: str | None = None,
    accept: str = MANIFEST_ACCEPT,
    *,
    method: str = "GET",
) -> tuple[int, Message[str, str], bytes]:
    """Status, headers and body, with HTTP errors returned rather than raised."""
    base = registry.url if isinstance(registry, Registry) else registry.rstrip("/")
    request = urllib.request.Request(base + path, method=method, headers={"Accept": accept})
    if token is not None:
        request.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, response.headers, response.read()
    except urllib.error.HTTPError as err:
        with err:
            return err.code, err.headers, err.read()


@dataclass(frozen=True)
class TestImage:
    __test__: ClassVar[bool] = False  # pytest would otherwise try to collect it

    repo: str
    tag: str
    digest: str
    media_type: str
    manifest: bytes
    layer_digests: list[str]
    child_digests: dict[str, str] = field(default_factory=dict)

    @property
    def reference(self) -> str:
        return f"{self.repo}:{self.tag}"


def read_back(
    registry: Registry, repo: str, tag: str, digest: str, creds: tuple[str, str] | None = None
) -> TestImage:
    """Describe an image from what the registry actually stores, not from what was pushed."""
    token = fetch_token(registry.tokenserver, repo, creds=creds)

    def manifest(ref: str) -> tuple[str, bytes, dict[str, Any]]:
        status, headers, body = registry_get(registry, f"/v2/{repo}/manifests/{ref}", token)
        if status != 200 or sha256_digest(body) != ref:
            raise RuntimeError(f"GET manifest {repo}@{ref} answered {status} or wrong bytes")
        return headers.get_content_type(), body, json.loads(body)

    media_type, raw, parsed = manifest(digest)
    children: dict[str, str] = {}
    blobs: list[str] = []
    child_docs = [parsed]
    if media_type in LIST_TYPES:
        child_docs = []
        for entry in parsed["manifests"]:
            platform = f"{entry['platform']['os']}/{entry['platform']['architecture']}"
            children[platform] = entry["digest"]
            child_docs.append(manifest(entry["digest"])[2])
    for doc in child_docs:
        blobs += [doc["config"]["digest"]] + [layer["digest"] for layer in doc["layers"]]
    return TestImage(repo, tag, digest, media_type, raw, blobs, children)


def _two_platforms(layout: Layout, seed: str) -> Descriptor:
    children = {}
    for arch in ("amd64", "arm64"):
        files = [
            (f"etc/{seed}-arch", f"{arch}\n".encode()),
            ("opt/bin/tool", seeded_bytes(f"{seed}-{arch}", 8 * 1024)),
        ]
        children[f"linux/{arch}"] = layout.image([files], arch=arch)
    return layout.index(children)


def build_and_push_test_images(workdir: Path, registry: Registry) -> dict[str, TestImage]:
    """The four shapes a mirror must handle; about 2.1 MiB in total, identical every run."""
    layout = Layout(Path(workdir) / "layout")
    small = layout.image(
        [[("etc/motd", b"small image\n"), ("opt/small/data.bin", seeded_bytes("small", 4 * 1024))]]
    )
    # The 2 MiB of incompressible data makes the mirror stream more than one chunk.
    oci = layout.image(
        [
            [("etc/app.conf", b"answer = 42\n")],
            [("opt/app/big.bin", seeded_bytes("oci-big", 2 * 1024 * 1024))],
            [("opt/app/VERSION", b"1.0\n")],
        ]
    )
    plan = {
        "schema2": (small, "library/small", "v1", "v2s2", False),
        "oci": (oci, "team/app/oci", "1.0", None, False),
        "index": (_two_platforms(layout, "index"), "multi/index", "latest", None, True),
        "list": (_two_platforms(layout, "list"), "multi/list", "latest", "v2s2", True),
    }
    images = {}
    for name, (descriptor, repo, tag, fmt, multi_arch) in plan.items():
        layout.tag(descriptor, name)
        digest = push(layout.root, name, registry, repo, tag, fmt=fmt, multi_arch=multi_arch)
        if fmt is None and digest != descriptor["digest"]:
            raise RuntimeError(f"{name}: pushed {digest}, layout has {descriptor['digest']}")
        images[name] = read_back(registry, repo, tag, digest)
    return images
