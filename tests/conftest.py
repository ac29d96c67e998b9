from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import httpx
import pytest
from fakes.server import serve
from fakes.upstream import FakeUpstream
from fastapi import FastAPI
from harness import (
    Layout,
    Registry,
    TestImage,
    TokenServer,
    build_and_push_test_images,
    push,
    require_root,
    require_tool,
)
from harness.images import read_back
from harness.redisserver import RedisServer
from harness.rgw import RadosGateway
from prometheus_client import CollectorRegistry

from mirror.app import create_app
from mirror.config import Settings
from mirror.server import uvicorn_config


@dataclass
class RunningMirror:
    url: str
    app: FastAPI

    @property
    def registry(self) -> CollectorRegistry:
        registry: CollectorRegistry = self.app.state.metrics.registry
        return registry

    def metric(self, name: str, **labels: str) -> float:
        value = self.registry.get_sample_value(name, labels)
        return 0.0 if value is None else value


MirrorFactory = Callable[..., AbstractAsyncContextManager[RunningMirror]]


@pytest.fixture
def no_mirror_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """Settings from the test alone: no MIRROR_* variable of the machine leaks in."""
    for key in list(os.environ):
        if key.startswith("MIRROR_"):
            monkeypatch.delenv(key)


@pytest.fixture
def mirror(tmp_path: Path) -> MirrorFactory:
    """Start a mirror in the test's loop: `async with mirror(upstream_url, **settings)`."""

    @asynccontextmanager
    async def start(upstream: str, **overrides: Any) -> AsyncIterator[RunningMirror]:
        overrides.setdefault("cache_dir", tmp_path / "cache")
        clock = overrides.pop("clock", None)
        settings = Settings(upstream=upstream, **overrides)
        app = create_app(settings, clock=clock) if clock else create_app(settings)
        # The listener `mirror serve` runs (its connection guard, zero-copy sends).
        protocol = uvicorn_config(app, settings, app.state.metrics).http
        async with serve(app, http=protocol) as url:
            yield RunningMirror(url, app)

    return start


@pytest.fixture
async def fake() -> AsyncIterator[tuple[FakeUpstream, str]]:
    upstream = FakeUpstream()
    async with serve(upstream) as url:
        upstream.realm = f"{url}/token"
        yield upstream, url


@dataclass
class RealUpstream:
    """The real Distribution registry with token auth, holding the four test images."""

    tokens: TokenServer
    registry: Registry
    images: dict[str, TestImage]
    workdir: Path


@pytest.fixture(scope="module")
def real_upstream(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RealUpstream]:
    require_tool("docker-registry")
    require_tool("skopeo")
    workdir = tmp_path_factory.mktemp("upstream")
    with TokenServer(workdir) as tokens, Registry(workdir / "registry", tokens) as registry:
        images = build_and_push_test_images(workdir, registry)
        yield RealUpstream(tokens, registry, images, workdir)


@dataclass
class SecondUpstream:
    """Another real registry with its own token service, users and content ("regb").

    Private: pulls need bob's credentials. `team/app/oci:1.0` exists here too, with
    other content than on the first registry; `shared/app:1.0` is byte for byte the
    first registry's `team/app/oci:1.0`, so their blobs share digests.
    """

    NAME: ClassVar[str] = "regb.test:5000"
    CREDS: ClassVar[tuple[str, str]] = ("bob", "b-secret")

    tokens: TokenServer
    registry: Registry
    own: TestImage  # team/app/oci:1.0, different from the first registry's
    shared: TestImage  # shared/app:1.0, the same bytes as the first's team/app/oci:1.0


@pytest.fixture(scope="module")
def second_upstream(
    real_upstream: RealUpstream, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[SecondUpstream]:
    workdir = tmp_path_factory.mktemp("regb")
    pusher = ("pushb", "pushb-pass")
    users = dict([SecondUpstream.CREDS, pusher])
    with (
        TokenServer(
            workdir, users=users, issuer="auth.regb.test", service="regb", anonymous_pull=False
        ) as tokens,
        Registry(workdir / "registry", tokens) as registry,
    ):
        layout = Layout(workdir / "layout")
        own = layout.image([[("etc/which-registry", b"regb\n")]])
        layout.tag(own, "own")
        own_digest = push(layout.root, "own", registry, "team/app/oci", "1.0", creds=pusher)
        first = real_upstream.images["oci"]
        shared_digest = push(
            real_upstream.workdir / "layout", "oci", registry, "shared/app", "1.0", creds=pusher
        )
        assert shared_digest == first.digest
        yield SecondUpstream(
            tokens,
            registry,
            read_back(registry, "team/app/oci", "1.0", own_digest, SecondUpstream.CREDS),
            read_back(registry, "shared/app", "1.0", shared_digest, SecondUpstream.CREDS),
        )


async def get_when_cached(client: httpx.AsyncClient, path: str) -> httpx.Response:
    """GET `path` until the mirror answers from its cache (`X-Cache: HIT`).

    A client finishes once the blob's digest verifies; the commit into the cache
    (fsync, rename) follows a moment later, so "cached" is awaited, not assumed.
    """
    for _ in range(250):
        resp = await client.get(path)
        if resp.headers.get("x-cache") == "HIT":
            return resp
        await asyncio.sleep(0.02)
    pytest.fail(f"{path} never reached the cache")


async def until(condition: Callable[[], bool], what: str, timeout: float = 10.0) -> None:
    """Wait for a state another task reaches (a download ending, a metric moving)
    that no event announces to the test."""
    deadline = asyncio.get_running_loop().time() + timeout
    while not condition():
        if asyncio.get_running_loop().time() > deadline:
            pytest.fail(f"timed out waiting for {what}")
        await asyncio.sleep(0.01)


@pytest.fixture(scope="session")
def rgw() -> Iterator[RadosGateway]:
    """A real S3 store: Ceph's RADOS Gateway on loopback (one per session: ~3 s)."""
    require_root("run the Ceph daemons")
    require_tool("radosgw")
    with RadosGateway() as gateway:
        yield gateway


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    """A real Redis on loopback. Tests that stop it start it again."""
    require_tool("redis-server")
    with RedisServer(tmp_path_factory.mktemp("redis")) as server:
        yield server
