"""Replicas sharing one cache: three real `mirror serve` processes on one real Ceph RGW
(the bucket) and one real Redis (the index and the leases), in front of the real
Distribution registry with token auth."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import secrets
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import obstore
import pytest
from conftest import RealUpstream, until
from harness import require_root, require_tool
from harness.daemon import free_port
from harness.images import Layout, push
from harness.mirror import MirrorProcess, skopeo_copy
from harness.redisserver import RedisServer
from harness.rgw import RadosGateway
from harness.throttle import ThrottledRelay
from obstore.store import S3Store

pytestmark = pytest.mark.e2e

MiB = 1 << 20


@dataclass
class Shared:
    rgw: RadosGateway
    redis: RedisServer


@dataclass
class BigImage:
    repo: str
    tag: str
    layer: str  # the large layer's digest
    size: int


@pytest.fixture(scope="module")
def shared(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Shared]:
    require_root("run the Ceph daemons")
    require_tool("radosgw")
    require_tool("redis-server")
    with (
        RadosGateway() as rgw,
        RedisServer(tmp_path_factory.mktemp("redis")) as redis,
    ):
        yield Shared(rgw, redis)


@pytest.fixture(scope="module")
def big(real_upstream: RealUpstream, tmp_path_factory: pytest.TempPathFactory) -> BigImage:
    """An image with one 48 MiB layer of random bytes (gzip cannot shrink it)."""
    layout = Layout(tmp_path_factory.mktemp("big") / "layout")
    image = layout.image([[("big.bin", os.urandom(48 * MiB))]])
    layout.tag(image, "big")
    push(layout.root, "big", real_upstream.registry, "big/one", "1")
    manifest = layout.read(image["digest"])
    layers = json.loads(manifest)["layers"]
    largest = max(layers, key=lambda d: d["size"])
    return BigImage("big/one", "1", largest["digest"], largest["size"])


class Replicas:
    """N replicas on their own bucket and Redis prefix; each keeps its port (its peer
    URL) across restarts."""

    def __init__(
        self, shared: Shared, workdir: Path, upstream: str, n: int = 3, **env: str
    ) -> None:
        self.shared = shared
        self.workdir = workdir
        self.upstream = upstream
        self.bucket = f"t{uuid.uuid4().hex[:12]}"
        shared.rgw.create_bucket(self.bucket)
        self.ports = [free_port() for _ in range(n)]
        self.generation = [0] * n
        self.secret = secrets.token_hex(16)
        self.env = env
        self.procs: list[MirrorProcess | None] = [None] * n

    def environment(self, i: int) -> dict[str, str]:
        creds = self.shared.rgw.credentials
        return {
            "MIRROR_STORE": "s3",
            "MIRROR_S3_BUCKET": self.bucket,
            "MIRROR_S3_ENDPOINT": self.shared.rgw.endpoint,
            "MIRROR_S3_PATH_STYLE": "true",
            "MIRROR_S3_ACCESS_KEY_ID": creds.access_key,
            "MIRROR_S3_SECRET_ACCESS_KEY": creds.secret_key,
            "MIRROR_REDIS_URL": self.shared.redis.url,
            "MIRROR_REDIS_PREFIX": f"{self.bucket}:",
            "MIRROR_PEER_URL": f"http://127.0.0.1:{self.ports[i]}",
            "MIRROR_PEER_SECRET": self.secret,
            "MIRROR_LEASE_TTL": "3",
            "MIRROR_LOG_FORMAT": "json",
            **self.env,
        }

    def start(self, i: int, *, fresh: bool = False) -> MirrorProcess:
        """Start replica i; `fresh`: with an empty L1 (a new pod)."""
        if fresh:
            self.generation[i] += 1
        proc = MirrorProcess(
            self.workdir / f"r{i}-{self.generation[i]}",
            self.upstream,
            env=self.environment(i),
            port=self.ports[i],
        )
        proc.start()
        self.procs[i] = proc
        return proc

    def __getitem__(self, i: int) -> MirrorProcess:
        proc = self.procs[i]
        assert proc is not None
        return proc

    def __enter__(self) -> Replicas:
        for i in range(len(self.ports)):
            self.start(i)
        return self

    def __exit__(self, *exc: object) -> None:
        for proc in self.procs:
            if proc is not None:
                proc.stop()

    def idle(self) -> bool:
        return all(p is None or p.metric("mirror_downloads_in_flight") == 0 for p in self.procs)

    def objects(self) -> dict[str, bytes]:
        """Every object in the bucket: key -> bytes."""
        store = self.s3()
        keys = [meta["path"] for batch in obstore.list(store) for meta in batch]
        return {key: bytes(obstore.get(store, key).bytes()) for key in keys}

    def s3(self) -> S3Store:
        creds = self.shared.rgw.credentials
        return S3Store(
            self.bucket,
            endpoint=self.shared.rgw.endpoint,
            access_key_id=creds.access_key,
            secret_access_key=creds.secret_key,
            region="us-east-1",
            virtual_hosted_style_request=False,
            client_options={"allow_http": True},
        )


def assert_bucket_verified(replicas: Replicas) -> dict[str, bytes]:
    """Every object hashes to the digest its key names."""
    objects = replicas.objects()
    for key, data in objects.items():
        kind, algorithm, hexdigest = key.split("/")
        assert kind in ("blobs", "manifests"), key
        assert hashlib.new(algorithm, data).hexdigest() == hexdigest, key
    return objects


def upstream_gets(real_upstream: RealUpstream, digest: str) -> int:
    return sum(
        1
        for r in real_upstream.registry.requests()
        if r.method == "GET" and r.path.endswith(f"/blobs/{digest}") and r.status in (200, 206)
    )


@dataclass
class Pull:
    replica: int
    digest: str
    first_byte: float
    done: float


async def pull(client: httpx.AsyncClient, replica: MirrorProcess, i: int, path: str) -> Pull:
    h = hashlib.sha256()
    first = 0.0
    async with client.stream("GET", replica.url + path) as r:
        assert r.status_code == 200, r.status_code
        async for chunk in r.aiter_raw():
            if not first:
                first = time.monotonic()
            h.update(chunk)
    return Pull(i, "sha256:" + h.hexdigest(), first, time.monotonic())


async def test_a_cold_burst_over_three_replicas_is_one_upstream_get_and_followers_stream(
    shared: Shared, big: BigImage, real_upstream: RealUpstream, tmp_path: Path
) -> None:
    registry = real_upstream.registry
    host, port = registry.host.split(":")
    # ~30 MB/s: the 48 MiB download lasts about 1.5 s, long enough to see followers
    # stream before it ends.
    with (
        ThrottledRelay(host, int(port), 30e6) as relay,
        Replicas(shared, tmp_path, relay.url) as replicas,
    ):
        registry.clear_log()
        path = f"/v2/{big.repo}/blobs/{big.layer}"
        async with httpx.AsyncClient(timeout=60) as c:
            pulls = await asyncio.gather(
                *(pull(c, replicas[i % 3], i % 3, path) for i in range(16))
            )
        assert {p.digest for p in pulls} == {big.layer}
        assert upstream_gets(real_upstream, big.layer) == 1
        leaders = [
            i
            for i in range(3)
            if replicas[i].metric("mirror_download_leases_total", event="acquired") == 1
        ]
        assert len(leaders) == 1, leaders
        followers = [p for p in pulls if p.replica != leaders[0]]
        assert followers
        ended = min(p.done for p in pulls)
        assert all(p.first_byte < ended for p in followers), "followers waited for the end"
        assert sum(replicas[i].metric("mirror_peer_bytes_total", direction="received")
                   for i in range(3)) >= 2 * big.size  # fmt: skip
        # The commit (and the upload) ends after the last byte.
        await until(lambda: replicas.idle(), "every replica's commits")
        objects = assert_bucket_verified(replicas)
        assert f"blobs/sha256/{big.layer.removeprefix('sha256:')}" in objects, replicas[
            leaders[0]
        ].log_tail()


async def test_what_one_replica_cached_another_serves_without_the_upstream(
    shared: Shared, real_upstream: RealUpstream, tmp_path: Path
) -> None:
    image = real_upstream.images["oci"]
    with Replicas(shared, tmp_path, real_upstream.registry.url) as replicas:
        first = skopeo_copy(
            f"docker://{replicas[0].host}/{image.reference}", f"dir:{tmp_path / 'a'}"
        )
        assert first.returncode == 0, first.stderr
        real_upstream.registry.clear_log()
        second = skopeo_copy(
            f"docker://{replicas[1].host}/{image.reference}", f"dir:{tmp_path / 'b'}"
        )
        assert second.returncode == 0, second.stderr
        assert real_upstream.registry.requests() == []
        assert replicas[1].metric("mirror_shared_cache_hits_total", tier="shared") >= len(
            image.layer_digests
        )
        assert_bucket_verified(replicas)
        # A new pod (empty L1) behind the same bucket and Redis: still no upstream.
        replicas[2].stop()
        fresh = replicas.start(2, fresh=True)
        third = skopeo_copy(f"docker://{fresh.host}/{image.reference}", f"dir:{tmp_path / 'c'}")
        assert third.returncode == 0, third.stderr
        assert real_upstream.registry.requests() == []
    for d in ("a", "b", "c"):
        assert (tmp_path / d / "manifest.json").read_bytes() == image.manifest
