"""Replicas sharing one cache: three real `mirror serve` processes on one real Ceph RGW
(the bucket) and one real Redis (the index and the leases), in front of the real
Distribution registry with token auth."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import secrets
import signal
import subprocess
import sys
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import httpx
import obstore
import pytest
from conftest import RealUpstream, until
from harness import TestImage, require_tool
from harness.containerd import Containerd, write_hosts_toml
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


@pytest.fixture
def shared(rgw: RadosGateway, redis_server: RedisServer) -> Shared:
    return Shared(rgw, redis_server)


def _push_big(real_upstream: RealUpstream, root: Path, repo: str) -> BigImage:
    """An image with one 48 MiB layer of random bytes (gzip cannot shrink it)."""
    layout = Layout(root)
    image = layout.image([[("big.bin", os.urandom(48 * MiB))]])
    layout.tag(image, "big")
    push(layout.root, "big", real_upstream.registry, repo, "1")
    layers = json.loads(layout.read(image["digest"]))["layers"]
    largest = max(layers, key=lambda d: d["size"])
    return BigImage(repo, "1", largest["digest"], largest["size"])


@pytest.fixture(scope="module")
def big(real_upstream: RealUpstream, tmp_path_factory: pytest.TempPathFactory) -> BigImage:
    return _push_big(real_upstream, tmp_path_factory.mktemp("big") / "layout", "big/one")


@pytest.fixture(scope="module")
def big2(real_upstream: RealUpstream, tmp_path_factory: pytest.TempPathFactory) -> BigImage:
    return _push_big(real_upstream, tmp_path_factory.mktemp("big2") / "layout", "big/two")


class Replicas:
    """N replicas on their own bucket and Redis prefix; each keeps its port (its peer
    URL) across restarts."""

    def __init__(
        self, shared: Shared, workdir: Path, upstream: str | None, n: int = 3, **env: str
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
        return all(
            p is None or not p.running or p.metric("mirror_downloads_in_flight") == 0
            for p in self.procs
        )

    def sizes(self) -> dict[str, int]:
        """Every object in the bucket: key -> size."""
        return {meta["path"]: meta["size"] for batch in obstore.list(self.s3()) for meta in batch}

    def objects(self) -> dict[str, bytes]:
        """Every object in the bucket: key -> bytes (those still there once listed)."""
        store = self.s3()
        found = {}
        for key in self.sizes():
            try:
                found[key] = bytes(obstore.get(store, key).bytes())
            except FileNotFoundError:
                continue  # evicted meanwhile
        return found

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


def skopeo_pull(replica: MirrorProcess, image: TestImage, dest: Path) -> None:
    """skopeo copy of `image` through `replica` into a dir: layout; it must succeed."""
    result = skopeo_copy(f"docker://{replica.host}/{image.reference}", f"dir:{dest}")
    assert result.returncode == 0, result.stderr


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


async def test_a_killed_leader_is_taken_over_and_the_bucket_holds_only_verified_bytes(
    shared: Shared, big: BigImage, real_upstream: RealUpstream, tmp_path: Path
) -> None:
    registry = real_upstream.registry
    host, port = registry.host.split(":")
    path = f"/v2/{big.repo}/blobs/{big.layer}"
    # ~16 MB/s: the download lasts about 3 s.
    with (
        ThrottledRelay(host, int(port), 16e6) as relay,
        Replicas(shared, tmp_path, relay.url) as replicas,
        httpx.Client(timeout=60) as c,
    ):
        registry.clear_log()
        started: dict[int, threading.Event] = {i: threading.Event() for i in range(3)}
        outcome: dict[int, str] = {}

        def client(i: int) -> None:
            h = hashlib.sha256()
            try:
                with c.stream("GET", replicas[i].url + path) as r:
                    for chunk in r.iter_raw():
                        started[i].set()
                        h.update(chunk)
                outcome[i] = "sha256:" + h.hexdigest()
            except httpx.HTTPError as exc:
                outcome[i] = f"cut: {exc!r}"
            finally:
                started[i].set()

        threads = [threading.Thread(target=client, args=(0,))]
        threads[0].start()
        assert started[0].wait(30)  # replica 0 leads: its client has bytes
        for i in (1, 2):
            threads.append(threading.Thread(target=client, args=(i,)))
            threads[-1].start()
            assert started[i].wait(30)  # following replica 0
        leader_pid = replicas[0].pid
        assert leader_pid is not None
        replicas[0].stop(signal.SIGKILL)
        for t in threads:
            t.join(60)
        assert outcome[0].startswith("cut"), outcome[0]
        for i in (1, 2):
            # Completed after a take-over, or cut (then a retry succeeds); never wrong.
            assert outcome[i] in (big.layer,) or outcome[i].startswith("cut"), outcome[i]
            if outcome[i] != big.layer:
                r = c.get(replicas[i].url + path)
                assert "sha256:" + hashlib.sha256(r.content).hexdigest() == big.layer
        taken = sum(
            replicas[i].metric("mirror_download_leases_total", event="taken_over") for i in (1, 2)
        )
        assert taken == 1
        # One GET from the dead leader, then one resume with Range by the new one.
        gets = [
            r.status
            for r in registry.requests()
            if r.method == "GET" and r.path.endswith(f"/blobs/{big.layer}") and r.status != 401
        ]
        assert gets == [200, 206], gets
        await until(lambda: replicas.idle(), "the new leader's commit")
        objects = assert_bucket_verified(replicas)
        assert f"blobs/sha256/{big.layer.removeprefix('sha256:')}" in objects


async def test_pulls_go_on_while_redis_is_down_and_coordination_resumes_after(
    shared: Shared, big: BigImage, real_upstream: RealUpstream, tmp_path: Path
) -> None:
    image = real_upstream.images["oci"]
    with Replicas(shared, tmp_path, real_upstream.registry.url) as replicas:
        shared.redis.stop()
        try:
            skopeo_pull(replicas[0], image, tmp_path / "a")
            assert (tmp_path / "a" / "manifest.json").read_bytes() == image.manifest
            assert replicas[0].metric("mirror_shared_degraded", dependency="redis") == 1
            ready = httpx.get(replicas[0].url + "/readyz")
            assert ready.status_code == 200
            assert "redis: unreachable" in ready.json()["checks"]["cache"]
            assert replicas[0].log().count("redis unavailable") == 1  # logged once
        finally:
            shared.redis.start()

        def coordinating() -> bool:
            return all(
                "redis: ok" in httpx.get(replicas[i].url + "/readyz").json()["checks"]["cache"]
                for i in range(3)
            )

        await until(coordinating, "every replica to see Redis again")
        real_upstream.registry.clear_log()
        path = f"/v2/{big.repo}/blobs/{big.layer}"
        async with httpx.AsyncClient(timeout=60) as c:
            pulls = await asyncio.gather(*(pull(c, replicas[i % 3], i % 3, path) for i in range(6)))
        assert {p.digest for p in pulls} == {big.layer}
        assert upstream_gets(real_upstream, big.layer) == 1


async def test_with_the_bucket_down_l1_hits_serve_and_misses_stream_uncached(
    shared: Shared, real_upstream: RealUpstream, tmp_path: Path
) -> None:
    image = real_upstream.images["oci"]
    with Replicas(shared, tmp_path, real_upstream.registry.url) as replicas:
        skopeo_pull(replicas[0], image, tmp_path / "a")
        await until(lambda: replicas.idle(), "commits")
        shared.rgw.stop_gateway()
        try:
            real_upstream.registry.clear_log()
            skopeo_pull(replicas[0], image, tmp_path / "b")
            assert real_upstream.registry.requests() == []  # L1 served it all
            miss = skopeo_copy(
                f"docker://{replicas[1].host}/{image.reference}", f"dir:{tmp_path / 'c'}"
            )
            assert miss.returncode == 0, miss.stderr  # fetched upstream, bucket or not
            for digest in image.layer_digests:
                assert upstream_gets(real_upstream, digest) == 1
            assert replicas[1].metric("mirror_shared_degraded", dependency="s3") == 1
        finally:
            shared.rgw.start_gateway()
    for d in ("a", "b", "c"):
        assert (tmp_path / d / "manifest.json").read_bytes() == image.manifest


async def test_the_cluster_wide_size_cap_holds(
    shared: Shared, big: BigImage, big2: BigImage, real_upstream: RealUpstream, tmp_path: Path
) -> None:
    cap = big.size + big.size // 2  # room for one of the two big layers
    with Replicas(
        shared,
        tmp_path,
        real_upstream.registry.url,
        MIRROR_MAX_SIZE=str(cap),
        MIRROR_EVICTION_INTERVAL="0.3",
    ) as replicas:
        async with httpx.AsyncClient(timeout=60) as c:
            await pull(c, replicas[0], 0, f"/v2/{big.repo}/blobs/{big.layer}")
            await until(lambda: replicas.idle(), "the first commit")
            await pull(c, replicas[1], 1, f"/v2/{big2.repo}/blobs/{big2.layer}")
            await until(lambda: replicas.idle(), "the second commit")

        def blob_bytes() -> int:
            return sum(size for key, size in replicas.sizes().items() if key.startswith("blobs/"))

        await until(lambda: blob_bytes() <= cap, "the bucket to shrink under the cap")
        keys = replicas.sizes().keys()
        # Least recently used went: the first layer.
        assert f"blobs/sha256/{big2.layer.removeprefix('sha256:')}" in keys
        assert f"blobs/sha256/{big.layer.removeprefix('sha256:')}" not in keys
        evicted = sum(
            replicas[i].metric("mirror_evictions_total", kind="blob", reason="size")
            for i in range(3)
        )
        assert evicted == 1


async def test_what_one_replica_cached_others_serve_without_the_upstream_even_after_restarts(
    shared: Shared, real_upstream: RealUpstream, tmp_path: Path
) -> None:
    image = real_upstream.images["oci"]
    with Replicas(shared, tmp_path, real_upstream.registry.url) as replicas:
        skopeo_pull(replicas[0], image, tmp_path / "a")
        await until(lambda: replicas.idle(), "commits")
        real_upstream.registry.clear_log()
        skopeo_pull(replicas[1], image, tmp_path / "b")
        assert real_upstream.registry.requests() == []
        assert replicas[1].metric("mirror_shared_cache_hits_total", tier="shared") >= len(
            image.layer_digests
        )
        assert_bucket_verified(replicas)
        # A rolling restart of every replica, each a new pod with an empty L1.
        for i in range(3):
            replicas[i].stop()
            replicas.start(i, fresh=True)
        for i in range(3):
            warm = skopeo_copy(
                f"docker://{replicas[i].host}/{image.reference}", f"dir:{tmp_path / f'w{i}'}"
            )
            assert warm.returncode == 0, warm.stderr
            assert (tmp_path / f"w{i}" / "manifest.json").read_bytes() == image.manifest
        assert real_upstream.registry.requests() == []
        # The CLI sees the cluster's cache, from any replica's settings.
        stats = subprocess.run(
            [
                sys.executable,
                "-m",
                "mirror",
                "cache",
                "stats",
                "--cache-dir",
                str(replicas[0].cache_dir),
            ],
            env={**os.environ, **replicas.environment(0)},
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert stats.returncode == 0, stats.stderr
        in_bucket = [k for k in replicas.sizes() if k.startswith("blobs/")]
        assert len(in_bucket) >= len(image.layer_digests)
        assert f"blobs:      {len(in_bucket)}\n" in stats.stdout
        assert f"shared:     s3://{replicas.bucket}/" in stats.stdout
        # No credential ever reaches a log.
        creds = shared.rgw.credentials
        logs = "".join(p.log() for p in replicas.procs if p is not None)
        for secret in (creds.secret_key, replicas.secret):
            assert secret not in logs
    for d in ("a", "b"):
        assert (tmp_path / d / "manifest.json").read_bytes() == image.manifest


async def test_the_peer_endpoint_needs_the_secret_and_never_fetches(
    shared: Shared, real_upstream: RealUpstream, tmp_path: Path
) -> None:
    image = real_upstream.images["oci"]
    layer = image.layer_digests[0]
    with Replicas(shared, tmp_path, real_upstream.registry.url, n=1) as replicas:
        url = f"{replicas[0].url}/_mirror/peer/blobs/{layer}"
        real_upstream.registry.clear_log()
        async with httpx.AsyncClient(timeout=30) as c:
            for auth in (None, "Bearer wrong", f"Basic {replicas.secret}"):
                r = await c.get(url, headers={"Authorization": auth} if auth else {})
                assert r.status_code == 403
                assert r.json()["errors"][0]["code"] == "DENIED"
            right = {"Authorization": f"Bearer {replicas.secret}"}
            r = await c.get(url, headers=right)
            assert r.status_code == 404  # not here: never fetched on a peer's behalf
            assert r.json()["errors"][0]["code"] == "BLOB_UNKNOWN"
            assert real_upstream.registry.requests() == []
            # Once cached here, a peer may read it, also by range.
            pulled = await c.get(f"{replicas[0].url}/v2/{image.repo}/blobs/{layer}")
            assert pulled.status_code == 200
            await until(lambda: replicas.idle(), "the commit")
            r = await c.get(url, headers=right)
            assert (r.status_code, r.content) == (200, pulled.content)
            r = await c.get(url, headers={**right, "Range": "bytes=10-"})
            assert (r.status_code, r.content) == (206, pulled.content[10:])


@pytest.mark.parametrize("swr", [False, True], ids=["waiting", "stale-while-revalidate"])
async def test_a_tag_is_fetched_and_revalidated_once_for_the_whole_cluster(
    shared: Shared, real_upstream: RealUpstream, tmp_path: Path, swr: bool
) -> None:
    image = real_upstream.images["oci"]
    path = f"/v2/{image.repo}/manifests/{image.tag}"
    accept = {"Accept": image.media_type}
    registry = real_upstream.registry

    def manifest_requests(method: str) -> int:
        return sum(
            1
            for r in registry.requests()
            if r.method == method and r.path.endswith(f"/manifests/{image.tag}") and r.status == 200
        )

    window = "1h" if swr else "0"
    with Replicas(
        shared,
        tmp_path,
        registry.url,
        MIRROR_TAG_TTL="2",
        MIRROR_STALE_WHILE_REVALIDATE=window,
    ) as replicas:
        registry.clear_log()
        async with httpx.AsyncClient(timeout=30) as c:

            async def burst() -> set[str]:
                rs = await asyncio.gather(
                    *(c.get(replicas[i % 3].url + path, headers=accept) for i in range(9))
                )
                assert {r.status_code for r in rs} == {200}
                assert {r.content for r in rs} == {image.manifest}
                return {r.headers["x-cache"] for r in rs}

            await burst()  # cold on every replica
            assert (manifest_requests("GET"), manifest_requests("HEAD")) == (1, 0)
            fetched = time.monotonic()
            await asyncio.sleep(max(0.0, fetched + 2.2 - time.monotonic()))  # the TTL passes
            results = await burst()  # expired on every replica
            if swr:
                # Answered at once everywhere; each replica's background check ends,
                # one by asking the registry, the others by finding its answer.
                assert results == {"UPDATING"}
                await until(
                    lambda: (
                        sum(
                            replicas[i].metric(
                                "mirror_background_revalidations_total",
                                upstream=registry.url.removeprefix("http://"),
                                result="unchanged",
                            )
                            for i in range(3)
                        )
                        == 3
                    ),
                    "every replica's background revalidation",
                    timeout=30,
                )
            assert (manifest_requests("GET"), manifest_requests("HEAD")) == (1, 1)


async def test_redirect_sends_committed_blobs_to_a_presigned_url_and_nothing_else(
    shared: Shared, real_upstream: RealUpstream, tmp_path: Path
) -> None:
    image = real_upstream.images["oci"]
    layer = image.layer_digests[0]
    path = f"/v2/{image.repo}/blobs/{layer}"
    with Replicas(
        shared, tmp_path, real_upstream.registry.url, n=2, MIRROR_S3_REDIRECT="true"
    ) as replicas:
        async with httpx.AsyncClient(timeout=30) as c:
            cold = await c.get(replicas[0].url + path)
            assert cold.status_code == 200  # not in the bucket yet: streamed
            await until(lambda: replicas.idle(), "the commit")
            for i in range(2):
                r = await c.get(replicas[i].url + path)
                assert r.status_code == 307
                location = r.headers["location"]
                assert location.startswith(f"{shared.rgw.endpoint}/{replicas.bucket}/blobs/")
                assert "X-Amz-Signature=" in location
                fetched = await c.get(location)
                assert fetched.status_code == 200
                assert "sha256:" + hashlib.sha256(fetched.content).hexdigest() == layer
            head = await c.head(replicas[1].url + path)  # a HEAD is answered here
            assert (head.status_code, head.headers["content-length"]) == (
                200,
                str(len(cold.content)),
            )
        skopeo_pull(replicas[1], image, tmp_path / "p")
    assert (tmp_path / "p" / "manifest.json").read_bytes() == image.manifest


async def test_skopeo_and_containerd_pull_through_different_replicas(
    shared: Shared, real_upstream: RealUpstream, tmp_path: Path
) -> None:
    require_tool("containerd")
    image = real_upstream.images["schema2"]
    registry = real_upstream.registry
    # The replicas stand in for docker.io, which here is the real registry on loopback.
    upstreams = json.dumps([{"name": "docker.io", "url": registry.url}])
    with Replicas(shared, tmp_path, None, n=2, MIRROR_UPSTREAMS=upstreams) as replicas:
        skopeo_pull(replicas[0], image, tmp_path / "a")
        await until(lambda: replicas.idle(), "commits")
        registry.clear_log()
        hosts = tmp_path / "hosts"
        write_hosts_toml(hosts, "docker.io", replicas[1].url, server="http://127.0.0.1:9")
        ref = f"docker.io/{image.repo}:{image.tag}"
        with Containerd(tmp_path / "containerd") as containerd:
            pulled = containerd.pull(ref, hosts)
            assert pulled.returncode == 0, f"{pulled.stderr}\n{replicas[1].log_tail()}"
            assert containerd.image_digest(ref) == image.digest
            assert containerd.check(ref).status == "complete"
        # Replica 1 had nothing locally: every blob came from the bucket. (The tag is
        # asked for once more: containerd negotiates another Accept set than skopeo.)
        asked = {(r.method, r.path.rsplit("/", 2)[-2]) for r in registry.requests()}
        assert asked <= {("GET", "manifests")}, asked
        assert replicas[1].metric("mirror_shared_cache_hits_total", tier="shared") >= len(
            image.layer_digests
        )


async def test_damaged_bytes_in_the_bucket_are_never_served_whole_and_are_fetched_anew(
    shared: Shared, real_upstream: RealUpstream, tmp_path: Path
) -> None:
    image = real_upstream.images["oci"]
    layer = image.layer_digests[0]
    path = f"/v2/{image.repo}/blobs/{layer}"
    with Replicas(shared, tmp_path, real_upstream.registry.url, n=2) as replicas:
        async with httpx.AsyncClient(timeout=30) as c:
            good = (await c.get(replicas[0].url + path)).content
            await until(lambda: replicas.idle(), "the commit")
            key = f"blobs/sha256/{layer.removeprefix('sha256:')}"
            obstore.put(replicas.s3(), key, bytes(len(good)))  # same size, wrong bytes
            real_upstream.registry.clear_log()
            try:
                r = await c.get(replicas[1].url + path)
                broken = r.status_code != 200 or r.content != good
                assert broken and r.content != bytes(len(good)), "damaged bytes served whole"
            except httpx.HTTPError:
                pass  # cut: the client retries
            await until(lambda: key not in replicas.sizes(), "the damaged object to go")
            retry = await c.get(replicas[1].url + path)
            assert (retry.status_code, retry.content) == (200, good)
            assert upstream_gets(real_upstream, layer) == 1  # fetched anew
