"""Redis memory per index entry of the shared store (store: s3), for sizing Redis.

    .venv/bin/python bench/redis_memory.py [--entries 50000]

Starts a private `redis-server` (no persistence, loopback), writes N blobs, N manifests
and N tags through `RedisIndex` itself (so the keys are exactly the mirror's: a blob is
an entry in `blobs` and `atime`, a manifest in `manifests` and `matime`, a tag one
field of `tags` per negotiated Accept set), and reports the growth of Redis'
`used_memory` per entry of each kind.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import shutil
import socket
import subprocess
import tempfile
import time

import redis

from mirror.metrics import Metrics
from mirror.redisindex import RedisIndex
from mirror.reference import Digest
from mirror.store import TagEntry, TagKey

# What skopeo and Docker send (every manifest type): the longest common Accept key.
ACCEPT = ",".join(
    sorted(
        [
            "application/vnd.docker.distribution.manifest.list.v2+json",
            "application/vnd.docker.distribution.manifest.v2+json",
            "application/vnd.oci.image.index.v1+json",
            "application/vnd.oci.image.manifest.v1+json",
        ]
    )
)
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"


def digest(kind: str, i: int) -> Digest:
    return Digest("sha256", hashlib.sha256(f"{kind}{i}".encode()).hexdigest())


def used(client: redis.Redis) -> int:
    return int(client.info("memory")["used_memory"])


async def fill(index: RedisIndex, kind: str, entries: int) -> None:
    now = time.time()
    for i in range(entries):
        if kind == "blob":
            await index.add_blob(digest("blob", i), 10_000_000 + i, now + i)
        elif kind == "manifest":
            await index.add_manifest(digest("manifest", i), OCI_MANIFEST, now + i)
        else:
            key = TagKey("docker.io", f"library/app{i % 1000}", f"v1.{i}", ACCEPT)
            await index.put_tag(key, TagEntry(digest("manifest", i), OCI_MANIFEST, now + i))


async def measure(url: str, entries: int) -> dict[str, float]:
    client = redis.Redis.from_url(url)
    index = RedisIndex(url, Metrics())
    per_entry = {}
    try:
        for kind in ("blob", "manifest", "tag"):
            before = used(client)
            await fill(index, kind, entries)
            per_entry[kind] = (used(client) - before) / entries
    finally:
        await index.aclose()
        client.close()
    return per_entry


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--entries", type=int, default=50_000)
    args = parser.parse_args()
    server = shutil.which("redis-server")
    if server is None:
        raise SystemExit("redis-server is not on PATH (apt-get install redis-server)")
    with tempfile.TemporaryDirectory() as workdir:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        proc = subprocess.Popen(
            [server, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--dir", workdir],
            stdout=subprocess.DEVNULL,
        )
        try:
            url = f"redis://127.0.0.1:{port}/0"
            for _ in range(100):
                try:
                    redis.Redis.from_url(url).ping()
                    break
                except redis.ConnectionError:
                    time.sleep(0.05)
            version = redis.Redis.from_url(url).info("server")["redis_version"]
            per_entry = asyncio.run(measure(url, args.entries))
        finally:
            proc.terminate()
            proc.wait()
    print(f"redis {version}, {args.entries} entries of each kind (bytes of used_memory):")
    for kind, size in per_entry.items():
        print(f"  {kind:9} {size:6.0f} bytes per entry")
    print(f"  (tag entries with a {len(ACCEPT)}-character Accept key, as skopeo and Docker send)")


if __name__ == "__main__":
    main()
