"""The test images the upstream holds: uncompressed tars of seeded-random bytes."""

from __future__ import annotations

import hashlib
import json
import shutil
import tarfile
from pathlib import Path
from typing import Any

from harness import OCI_MANIFEST, Layout, Registry, TestImage, push
from harness.images import read_back, seeded_bytes

from . import MiB

OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
OCI_LAYER_TAR = "application/vnd.oci.image.layer.v1.tar"
_EPOCH = 1_700_000_000
_PIECE = 32 * MiB  # seeded_bytes (random.randbytes) overflows at 256 MiB: build in pieces


def _canonical(obj: Any) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()


def _tar_layer(layout: Layout, seed: str, payload: int) -> dict[str, Any]:
    """An uncompressed one-file tar of seeded-random bytes, streamed into the layout."""
    info = tarfile.TarInfo(f"opt/bench/{seed}.bin")
    info.size, info.mode, info.mtime = payload, 0o644, _EPOCH
    hasher = hashlib.sha256()
    total = 0
    tmp = layout.root / "blobs" / f"tmp-{seed}"
    with tmp.open("wb") as out:

        def put(data: bytes) -> None:
            nonlocal total
            out.write(data)
            hasher.update(data)
            total += len(data)

        put(info.tobuf(format=tarfile.USTAR_FORMAT))
        for i, start in enumerate(range(0, payload, _PIECE)):
            put(seeded_bytes(f"{seed}-{i}", min(_PIECE, payload - start)))
        put(bytes(-payload % tarfile.BLOCKSIZE))
        put(bytes(2 * tarfile.BLOCKSIZE))  # end of archive, as tarfile writes it
        put(bytes(-total % tarfile.RECORDSIZE))
    tmp.rename(layout.root / "blobs" / "sha256" / hasher.hexdigest())
    return {"mediaType": OCI_LAYER_TAR, "digest": "sha256:" + hasher.hexdigest(), "size": total}


def build_image(
    workdir: Path, registry: Registry, repo: str, layer_sizes: list[int]
) -> tuple[TestImage, int]:
    """Build, push and read back an OCI image of uncompressed seeded-random layers."""
    layout = Layout(workdir / f"layout-{repo.replace('/', '_')}")
    layers = [
        _tar_layer(layout, f"{repo.replace('/', '-')}-{i}", size)
        for i, size in enumerate(layer_sizes)
    ]
    config = {
        "architecture": "amd64",
        "os": "linux",
        "created": "2024-01-01T00:00:00Z",
        "config": {"Cmd": ["/bin/true"]},
        # Uncompressed layers: each diff_id is the layer's own digest.
        "rootfs": {"type": "layers", "diff_ids": [layer["digest"] for layer in layers]},
    }
    config_descriptor = layout.blob(_canonical(config), OCI_CONFIG)
    manifest = {
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "config": config_descriptor,
        "layers": layers,
    }
    descriptor = layout.blob(_canonical(manifest), OCI_MANIFEST)
    layout.tag(descriptor, "bench")
    digest = push(layout.root, "bench", registry, repo, "1.0")
    if digest != descriptor["digest"]:
        raise RuntimeError(f"{repo}: pushed {digest}, the layout has {descriptor['digest']}")
    shutil.rmtree(layout.root)  # the registry holds it now
    size = int(config_descriptor["size"]) + sum(int(la["size"]) for la in layers)
    return read_back(registry, repo, "1.0", digest), size
