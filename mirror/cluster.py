"""Single flight for the whole cluster: one upstream download per digest, whichever
replica the clients reach.

A replica that misses a blob claims its lease in Redis (`lease:<digest>`, expiring
after `lease_ttl` unless renewed every third of it). The value names the holder's
peer URL.

- **Leader** (the claim succeeded): it downloads from the upstream as a lone mirror
  would, and streams the same bytes into the bucket (`BlobWrite.publish`).
- **Follower** (another replica holds the lease): its download's source is the
  leader's peer endpoint (`GET /_mirror/peer/blobs/<digest>`, with the shared
  secret), which streams the leader's in-flight download as it grows, holding back
  the last byte until the leader has verified the digest. The follower verifies the
  digest again itself, and fills its own L1.
- **A leader that dies** (kill -9) stops renewing: its lease expires within
  `lease_ttl`. The follower's stream breaks; it claims the lease and takes over,
  resuming from the upstream with `Range` at the byte it had reached.
- **Redis down**: no lease can be claimed, so each replica leads its own downloads
  (local single flight), as a lone mirror would.

The peer endpoint only ever serves a download already in flight or a blob already in
the local cache: it never starts a fetch, so it cannot be used as an open proxy.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Literal, TypeVar

import httpx

from mirror.diskstore import DiskStore
from mirror.downloads import Downloads, OpenSource
from mirror.errors import RegistryError, UpstreamError
from mirror.metrics import Metrics
from mirror.objects import ObjectStoreError
from mirror.ranges import parse_length
from mirror.redisindex import IndexUnavailable, RedisIndex
from mirror.reference import Digest
from mirror.sharedstore import ObjectBlob, SharedStore
from mirror.store import BlobSource, BlobWrite, OpenBlob
from mirror.upstream import RemoteStore

log = logging.getLogger(__name__)

T = TypeVar("T")

PEER_PATH = "/_mirror/peer/blobs/"
# A follower polls a lease held by a leader it cannot reach this often, until the
# lease expires (at most lease_ttl) or the leader answers again.
POLL = 0.2
# A leader that answers "nothing here", or streams nothing before breaking, this many
# times (its download failed or spilled, or it stalls) is given up on: the follower
# fetches from the upstream itself, from where it had got to.
MAX_FRUITLESS_PEERS = 3


class PeerBroke(Exception):
    """The leader's stream ended early (the leader went away, or stalled)."""


class Cluster:
    def __init__(
        self,
        index: RedisIndex,
        store: SharedStore,
        metrics: Metrics,
        client: httpx.AsyncClient,
        *,
        peer_url: str,
        secret: str,
        lease_ttl: float,
    ) -> None:
        self.index = index
        self.store = store
        self.metrics = metrics
        self.client = client
        self.peer_url = peer_url.rstrip("/")
        self.secret = secret
        self.lease_ttl = lease_ttl
        # The lease's value: the URL peers use, and a token unique to this process
        # (a restarted replica at the same URL is another owner).
        self.owner = f"{self.peer_url} {secrets.token_hex(8)}"

    def source(self, upstream: RemoteStore) -> OpenSource:
        async def open_source(
            repo: str, digest: Digest, max_bytes: int, write: BlobWrite
        ) -> BlobSource:
            source = SharedSource(self, upstream, repo, digest, max_bytes, write)
            try:
                await source.open()
            except BaseException:
                await source.aclose()
                raise
            return source

        return open_source

    async def once(
        self,
        name: str,
        work: Callable[[], Awaitable[T]],
        done_elsewhere: Callable[[], Awaitable[T | None]],
        wait: float,
    ) -> T:
        """Run `work` on one replica at a time: the one holding the lease `name`. The
        others poll `done_elsewhere` for its result; when the lease is free again
        without one (the holder failed, or died and its lease expired after `wait`),
        the next to claim it does the work. Redis down: just work."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + wait + self.lease_ttl
        while True:
            try:
                holder = await self.index.claim(name, self.owner, wait)
            except IndexUnavailable:
                return await work()
            if holder is None:
                try:
                    # Finished just before we claimed: while we waited, or before we
                    # ever asked (the caller read its state before another replica's
                    # work ended and released the lease).
                    if (result := await done_elsewhere()) is not None:
                        return result
                    return await work()
                finally:
                    with contextlib.suppress(IndexUnavailable):
                        await self.index.release(name, self.owner)
            if loop.time() > deadline:
                return await work()
            await asyncio.sleep(POLL / 2)
            result = await done_elsewhere()
            if result is not None:
                return result

    async def aclose(self) -> None:
        await self.client.aclose()


Role = Literal["leader", "follower", "alone"]


class SharedSource:
    """The bytes of one blob download, from whichever replica leads it; from the
    upstream (with the lease held and renewed) when this replica leads."""

    def __init__(
        self,
        cluster: Cluster,
        upstream: RemoteStore,
        repo: str,
        digest: Digest,
        max_bytes: int,
        write: BlobWrite,
    ) -> None:
        self._c = cluster
        self._upstream = upstream
        self._repo = repo
        self._digest = digest
        self._max = max_bytes
        self._write = write
        self._lease = f"lease:{digest}"
        self._held = False
        self._renewal: asyncio.Task[None] | None = None
        self._body: BlobSource | None = None
        self._offset = 0
        # Peers given up on: after MAX_FRUITLESS_PEERS answers or breaks that moved
        # nothing, or past the deadline, the bytes come from the upstream, alone.
        self._fruitless = 0
        self._deadline: float | None = None
        self._deadline_offset = 0
        self._peers_given_up = False
        self.size: int | None = None
        self.role: Role = "alone"

    async def open(self) -> None:
        self._body = await self._next()
        self.size = self._body.size

    async def __aiter__(self) -> AsyncIterator[bytes]:
        while True:
            assert self._body is not None
            before = self._offset
            try:
                async for chunk in self._body:
                    self._offset += len(chunk)
                    if self._offset > self._max:
                        # A peer (buggy or hostile) may not grow a blob past its bound.
                        raise UpstreamError(
                            "UNAVAILABLE", "upstream blob exceeds its size limit", status=502
                        )
                    yield chunk
                return
            except PeerBroke as exc:
                log.warning(
                    "stream of %s from the leading replica broke at %d bytes (%s); "
                    "taking over or following the next leader",
                    self._digest,
                    self._offset,
                    exc,
                )
                if self._offset == before:
                    self._fruitless += 1
                await self._body.aclose()
                self._body = await self._next()

    async def mismatched(self) -> None:
        if self._body is not None:
            await self._body.mismatched()

    async def aclose(self) -> None:
        if self._body is not None:
            await self._body.aclose()
        if self._renewal is not None:
            self._renewal.cancel()
            await asyncio.gather(self._renewal, return_exceptions=True)
            self._renewal = None
        if self._held:
            self._held = False
            self._c.metrics.leases_held.dec()
            with contextlib.suppress(IndexUnavailable):
                await self._c.index.release(self._lease, self._c.owner)

    # -- choosing where the bytes come from --------------------------------------------

    async def _next(self) -> BlobSource:
        """The source from `self._offset` on: the upstream if this replica leads (or
        Redis is down), else the leader, waiting out a dead leader's lease."""
        c = self._c
        loop = asyncio.get_running_loop()
        if self._deadline is None or self._offset > self._deadline_offset:
            # A dead leader's lease expires within lease_ttl; past this, go alone. Each
            # byte of progress earns a new deadline; a leader that keeps answering
            # without moving does not.
            self._deadline = loop.time() + 2 * c.lease_ttl + 2
            self._deadline_offset = self._offset
        while True:
            if self._peers_given_up:
                return await self._from_upstream("alone")
            try:
                holder = await c.index.claim(self._lease, c.owner, c.lease_ttl)
            except IndexUnavailable:
                # Alone: the bucket by digest first, as the lease holder would.
                shared = await self._from_bucket() if self._offset == 0 else None
                return shared or await self._from_upstream("alone")
            if holder is None:
                taken_over = self._offset > 0 or self.role == "follower"
                self._hold()
                c.metrics.leases.labels("taken_over" if taken_over else "acquired").inc()
                if self._offset == 0:
                    # The previous leader may have committed it just now.
                    shared = await self._from_bucket()
                    if shared is not None:
                        return shared
                return await self._from_upstream("leader")
            peer_url = holder.split(" ", 1)[0]
            try:
                body = await self._from_peer(peer_url)
            except PeerBroke as exc:
                log.debug("leader %s for %s unreachable: %s", peer_url, self._digest, exc)
                body = None
            else:
                if body is not None and self._fruitless < MAX_FRUITLESS_PEERS:
                    if self.role != "follower":
                        c.metrics.leases.labels("followed").inc()
                    self.role = "follower"
                    return body
                if body is not None:
                    await body.aclose()
                self._fruitless += 1
            if self._fruitless >= MAX_FRUITLESS_PEERS or loop.time() > self._deadline:
                log.warning(
                    "no replica could stream %s (lease held by %s); fetching it alone",
                    self._digest,
                    peer_url,
                )
                self._peers_given_up = True
                return await self._from_upstream("alone")
            await asyncio.sleep(POLL)

    def _hold(self) -> None:
        self._held = True
        self._c.metrics.leases_held.inc()
        self._renewal = asyncio.get_running_loop().create_task(self._renew())

    async def _renew(self) -> None:
        c = self._c
        while True:
            await asyncio.sleep(c.lease_ttl / 3)
            try:
                if not await c.index.renew(self._lease, c.owner, c.lease_ttl):
                    # Expired meanwhile (Redis restarted, or this process was paused):
                    # another replica may start the same download. Ours goes on.
                    c.metrics.leases.labels("lost").inc()
                    log.warning("lost the download lease of %s; finishing anyway", self._digest)
                    return
            except IndexUnavailable:
                continue  # Redis is down: nobody else can claim it either

    async def _from_upstream(self, role: Role) -> BlobSource:
        self.role = role
        self._write.publish()
        return await self._upstream.open_blob(self._repo, self._digest, self._max, self._offset)

    async def _from_bucket(self) -> BlobSource | None:
        """The blob, if the bucket has it (committed by another replica just now):
        opened here, so that a failing bucket means the upstream, not a failure."""
        size = await self._c.store.shared_size(self._digest)
        if size is None or size > self._max:
            return None
        objects = self._c.store.objects
        try:
            whole = await objects.open_blob(self._digest, 0, size) if size else None
        except ObjectStoreError:
            return None
        if whole is None and size:
            return None
        self.role = "follower"
        return ObjectBlob(objects, self._digest, size, whole).download()

    async def _from_peer(self, peer_url: str) -> PeerBody | None:
        """The leader's stream from `self._offset`; None if it has nothing for us."""
        c = self._c
        headers = {"Authorization": f"Bearer {c.secret}"}
        if self._offset:
            headers["Range"] = f"bytes={self._offset}-"
        request = c.client.build_request(
            "GET", f"{peer_url}{PEER_PATH}{self._digest}", headers=headers
        )
        try:
            resp = await c.client.send(request, stream=True)
        except httpx.HTTPError as exc:
            raise PeerBroke(str(exc) or type(exc).__name__) from None
        if resp.status_code in (401, 403):
            await resp.aclose()
            log.error(
                "replica %s refused this one's peer secret: the replicas' peer_secret "
                "settings differ; fetching %s alone",
                peer_url,
                self._digest,
            )
            self._peers_given_up = True
            return None
        expected = 206 if self._offset else 200
        if resp.status_code != expected or (
            self._offset
            and not resp.headers.get("content-range", "").startswith(f"bytes {self._offset}-")
        ):
            await resp.aclose()
            return None
        length = parse_length(resp.headers.get("content-length"))
        if length is not None and self._offset + length > self._max:
            await resp.aclose()
            raise UpstreamError("UNAVAILABLE", "upstream blob exceeds its size limit", status=502)
        return PeerBody(resp, length, c.metrics)


class PeerBody:
    """The leader's stream of a download; any break is `PeerBroke`."""

    def __init__(self, resp: httpx.Response, size: int | None, metrics: Metrics) -> None:
        self._resp = resp
        self.size = size
        self._received = metrics.peer_bytes.labels("received")

    async def __aiter__(self) -> AsyncIterator[bytes]:
        got = 0
        try:
            async for chunk in self._resp.aiter_raw():
                got += len(chunk)
                if self.size is not None and got > self.size:
                    raise PeerBroke(f"sent more than its {self.size} bytes")
                self._received.inc(len(chunk))
                yield chunk
        except httpx.HTTPError as exc:
            raise PeerBroke(str(exc) or type(exc).__name__) from None
        finally:
            await self._resp.aclose()
        if self.size is not None and got < self.size:
            raise PeerBroke(f"ended after {got} of {self.size} bytes")

    async def mismatched(self) -> None:
        pass  # the leader verifies its own bytes; it keeps nothing that failed

    async def aclose(self) -> None:
        await self._resp.aclose()


async def open_for_peer(
    downloads: list[Downloads], l1: DiskStore, digest: Digest
) -> OpenBlob | None:
    """What a peer may read of `digest` here: a download in flight, or the blob in
    the local cache. Never starts a fetch (the endpoint is no open proxy)."""
    for table in downloads:
        dl = table.active(digest)
        if dl is None or dl.spilled:
            continue
        reader = dl.reader()
        try:
            await dl.ready()
        except RegistryError:
            await reader.aclose()
            continue
        except BaseException:
            await reader.aclose()
            raise
        return reader
    return await l1.open_blob(digest)
