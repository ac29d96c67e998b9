"""Content in an S3-compatible bucket, by digest: the shared store's bytes.

The one module that imports obstore (chosen by measurement against Ceph RGW: a third
less upload CPU and 40% of aiobotocore's memory; docs/benchmarks.md). Layout under
the configured prefix::

    blobs/<alg>/<hex>       one object per blob, shared by every upstream and replica
    manifests/<alg>/<hex>   one object per manifest (Content-Type: its media type)

Only verified bytes are ever visible under these keys: a blob is a multipart upload
that completes after its digest has verified (`Upload`), and is aborted otherwise.

A bucket that cannot be reached costs a request at most once per `BACKOFF` seconds:
then every call fails fast with `ObjectStoreError` (an OSError, which the cache paths
already treat as "the cache cannot help now") until the back-off ends. The state
change is logged once each way and exported as `mirror_shared_degraded{dependency="s3"}`.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import obstore
from obstore.exceptions import BaseError, NotFoundError
from obstore.store import S3Store

from mirror.errors import RegistryError
from mirror.health import Health
from mirror.metrics import Metrics, S3Operation
from mirror.reference import Digest
from mirror.store import READ_CHUNK

if TYPE_CHECKING:
    from obstore.store import ClientConfig, RetryConfig

log = logging.getLogger(__name__)

T = TypeVar("T")

# Parts of 16 MiB, two in flight: measured against RGW (bench/s3_clients.py), the
# same CPU per GB as 64 MiB parts with a quarter of the memory per upload.
PART_SIZE = 16 << 20
PARTS_IN_FLIGHT = 2
# What an upload reads from the growing local file at a time.
UPLOAD_READ = 1 << 20
# After a failure, calls fail fast this long before the bucket is tried again.
BACKOFF = 5.0


class ObjectStoreError(OSError):
    """The bucket could not be used (unreachable, refused, or backing off)."""


class Objects:
    def __init__(
        self, store: S3Store, metrics: Metrics, *, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self._store = store
        self._metrics = metrics
        self.health = Health(
            "s3",
            metrics,
            backoff=BACKOFF,
            down="object store unavailable (%s); serving from the local cache, "
            "new content uncached in the bucket",
            up="object store reachable again",
            clock=clock,
        )

    @classmethod
    def connect(
        cls,
        *,
        bucket: str,
        prefix: str,
        endpoint: str | None,
        region: str,
        path_style: bool,
        ca_bundle: Path | None,
        access_key_id: str | None,
        secret_access_key: str | None,
        connect_timeout: float,
        read_timeout: float,
        metrics: Metrics,
    ) -> Objects:
        """A client for the bucket. No request is made here (the app factory does no I/O)."""
        client: ClientConfig = {
            "connect_timeout": timedelta(seconds=connect_timeout),
            # reqwest's `timeout` covers a whole response body: a 10 GB blob streamed to
            # a slow client takes long. Stalls are caught by the read timeout instead.
            "timeout": timedelta(days=1),
            "read_timeout": timedelta(seconds=read_timeout),
            "allow_http": endpoint is not None and endpoint.startswith("http://"),
        }
        if ca_bundle is not None:
            client["root_certificate"] = ca_bundle.read_bytes()
        # The default retries for up to 3 minutes: a dependency that is down must cost
        # a request a second or two, then the back-off takes over.
        retry: RetryConfig = {
            "max_retries": 2,
            "retry_timeout": timedelta(seconds=10),
            "backoff": {"init_backoff": timedelta(milliseconds=100), "max_backoff": timedelta(1)},
        }
        config: dict[str, Any] = {
            "region": region,
            "virtual_hosted_style_request": not path_style,
        }
        if endpoint is not None:
            config["endpoint"] = endpoint
        if access_key_id is not None and secret_access_key is not None:
            config["access_key_id"] = access_key_id
            config["secret_access_key"] = secret_access_key
        store = S3Store(
            bucket,
            prefix=prefix.strip("/") or None,
            config=config,  # type: ignore[arg-type]
            client_options=client,
            retry_config=retry,
        )
        return cls(store, metrics)

    # -- keys -------------------------------------------------------------------------

    @staticmethod
    def blob_key(digest: Digest) -> str:
        return f"blobs/{digest.algorithm}/{digest.hex}"

    @staticmethod
    def manifest_key(digest: Digest) -> str:
        return f"manifests/{digest.algorithm}/{digest.hex}"

    # -- health -----------------------------------------------------------------------

    @property
    def reachable(self) -> bool:
        return self.health.reachable

    async def _call(self, op: S3Operation, request: Callable[[], Awaitable[T]]) -> T | None:
        """Run one request: timed, counted, NotFound as None, failures as
        ObjectStoreError (and the start of a back-off). A factory, not an awaitable:
        obstore starts a request when it is called, and a backing-off call makes none."""
        if self.health.backing_off():
            raise ObjectStoreError(f"object store unavailable (retrying in {BACKOFF:.0f} s)")
        started = time.perf_counter()
        try:
            result = await request()
        # A missing object is the builtin FileNotFoundError (measured with S3 on RGW);
        # NotFoundError is what obstore documents. Either is an answer, not a failure.
        except (NotFoundError, FileNotFoundError):
            self._observe(op, "missing", started)
            self._up()
            return None
        except (BaseError, OSError, RuntimeError, ValueError) as exc:
            self._observe(op, "error", started)
            raise self._failed(op, exc) from None
        self._observe(op, "ok", started)
        self._up()
        return result

    def _observe(self, op: S3Operation, result: str, started: float) -> None:
        self._metrics.s3_requests.labels(op, result).inc()
        self._metrics.s3_duration.labels(op).observe(time.perf_counter() - started)

    def _failed(self, op: str, exc: BaseException) -> ObjectStoreError:
        message = _one_line(exc)
        self.health.failed(f"{op}: {message}")
        return ObjectStoreError(f"object store {op} failed: {message}")

    def _up(self) -> None:
        self.health.ok()

    # -- blobs ------------------------------------------------------------------------

    async def blob_size(self, digest: Digest) -> int | None:
        key = self.blob_key(digest)
        meta = await self._call("head", lambda: obstore.head_async(self._store, key))
        return None if meta is None else int(meta["size"])

    async def open_blob(self, digest: Digest, start: int, end: int) -> ObjectBody | None:
        """Bytes [start, end) of a committed blob (end > start), streaming."""
        options: Any = {"range": (start, end)}
        key = self.blob_key(digest)
        result = await self._call(
            "get", lambda: obstore.get_async(self._store, key, options=options)
        )
        return None if result is None else ObjectBody(self, result.stream(READ_CHUNK))

    def upload(self, digest: Digest, path: Path) -> Upload:
        return Upload(self, digest, path)

    async def sign(self, digest: Digest, ttl: float) -> str | None:
        key = self.blob_key(digest)
        url = await self._call(
            "sign",
            lambda: obstore.sign_async(self._store, "GET", key, timedelta(seconds=ttl)),
        )
        return None if url is None else str(url)

    def list_blobs(self) -> list[tuple[Digest, int, float]]:
        """Every blob object: (digest, size, last modified), from a worker thread."""
        started = time.perf_counter()
        found = []
        try:
            for batch in obstore.list(self._store, prefix="blobs/", chunk_size=1000):
                for meta in batch:
                    # blobs/<alg>/<hex>; anything else is not ours.
                    parts = str(meta["path"]).split("/")
                    try:
                        digest = Digest.parse(":".join(parts[1:]))
                    except RegistryError:
                        continue
                    found.append((digest, int(meta["size"]), meta["last_modified"].timestamp()))
        except (BaseError, OSError, RuntimeError) as exc:
            self._observe("list", "error", started)
            raise ObjectStoreError(f"object store list failed: {_one_line(exc)}") from None
        self._observe("list", "ok", started)
        return found

    def hash_blob(self, digest: Digest) -> tuple[str, int] | None:
        """Re-read a blob object and hash it (`mirror cache verify`, a worker thread):
        (hex digest, size), or None if it is not there."""
        started = time.perf_counter()
        h = hashlib.new(digest.algorithm)
        size = 0
        try:
            result = obstore.get(self._store, self.blob_key(digest))
            for chunk in result.stream(UPLOAD_READ):
                h.update(chunk)
                size += len(chunk)
        except (NotFoundError, FileNotFoundError):
            self._observe("get", "missing", started)
            return None
        except (BaseError, OSError, RuntimeError) as exc:
            self._observe("get", "error", started)
            raise ObjectStoreError(f"object store get failed: {_one_line(exc)}") from None
        self._observe("get", "ok", started)
        return h.hexdigest(), size

    def delete(self, keys: list[str]) -> None:
        """Remove objects (from a worker thread: the lifecycle round's)."""
        if keys:
            started = time.perf_counter()
            try:
                obstore.delete(self._store, keys)
            except (NotFoundError, FileNotFoundError):
                pass
            except (BaseError, OSError, RuntimeError) as exc:
                self._observe("delete", "error", started)
                raise ObjectStoreError(f"object store delete failed: {_one_line(exc)}") from None
            self._observe("delete", "ok", started)

    # -- manifests --------------------------------------------------------------------

    async def get_manifest(self, digest: Digest) -> tuple[str, bytes] | None:
        key = self.manifest_key(digest)
        result = await self._call("get", lambda: obstore.get_async(self._store, key))
        if result is None:
            return None
        body = bytes(await result.bytes_async())
        if hashlib.new(digest.algorithm, body).hexdigest() != digest.hex:
            # Never served: only verified manifests are ever put, so this is damage.
            log.error("manifest %s in the bucket does not match its digest; ignored", digest)
            return None
        media_type = str(result.attributes.get("Content-Type", ""))
        return media_type, body

    async def put_manifest(self, digest: Digest, media_type: str, body: bytes) -> None:
        key = self.manifest_key(digest)
        await self._call(
            "put",
            lambda: obstore.put_async(
                self._store, key, body, attributes={"Content-Type": media_type}
            ),
        )

    async def close(self) -> None:
        pass  # obstore's client holds no open resources that need closing


class ObjectBody:
    """A ranged GET of a blob object, streamed in READ_CHUNK pieces."""

    def __init__(self, objects: Objects, stream: Any) -> None:
        self._objects = objects
        self._stream = stream

    async def __aiter__(self) -> AsyncIterator[bytes]:
        try:
            async for chunk in self._stream:
                yield bytes(chunk)
        except BaseError as exc:
            raise self._objects._failed("get", exc) from None

    def discard(self) -> None:
        """Drop the response unread (its connection is closed, not reused)."""
        self._stream = _empty()

    async def aclose(self) -> None:
        self.discard()


async def _empty() -> AsyncIterator[bytes]:
    return
    yield  # pragma: no cover


class Upload:
    """A multipart upload fed from a local file while a download writes it.

    `wrote(size)` says how far the file is written; the upload follows, a part at a
    time, and waits at the end. Only `complete(size)`, called once the digest has
    verified, lets it finish the multipart upload: until then nothing is visible under
    the key, and `abort()` (or any failure) discards the parts.
    """

    def __init__(self, objects: Objects, digest: Digest, path: Path) -> None:
        self._objects = objects
        self._digest = digest
        self._path = path
        self._available = 0
        self._final: int | None = None
        self._changed = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run())

    def wrote(self, size: int) -> None:
        self._available = size
        self._changed.set()

    async def complete(self, size: int) -> bool:
        """Finish once `size` bytes are sent; True if the object is now in the bucket."""
        if self._task is None:
            return False
        self._final = self._available = size
        self._changed.set()
        try:
            await asyncio.shield(self._task)
        except asyncio.CancelledError:
            raise
        except ObjectStoreError as exc:
            log.error("blob %s not stored in the bucket: %s", self._digest, exc)
            return False
        except Exception as exc:
            log.error("blob %s not stored in the bucket: %s", self._digest, _one_line(exc))
            return False
        return True

    async def abort(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            # Cancelled if running; if it had failed already, its error is taken here
            # (logged once by Objects), never left for asyncio to report.
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)

    async def _run(self) -> None:
        objects = self._objects
        started = time.perf_counter()
        # Opened now, by the temp name: the descriptor survives the rename into L1.
        try:
            fd = os.open(self._path, os.O_RDONLY)
        except OSError as exc:  # no local file (a full or read-only L1): not shared
            raise ObjectStoreError(f"cannot read the local file of {self._digest}: {exc}") from None
        try:
            writer = obstore.open_writer_async(
                objects._store,
                objects.blob_key(self._digest),
                buffer_size=PART_SIZE,
                max_concurrency=PARTS_IN_FLIGHT,
            )
            # Leaving the block with an exception (cancelled: aborted) aborts the
            # multipart upload; leaving it normally completes it.
            async with writer:
                pos = 0
                while self._final is None or pos < self._final:
                    if pos < self._available:
                        # A page-cache read of 1 MiB: tens of µs, inline like FileBody.
                        chunk = os.pread(fd, min(UPLOAD_READ, self._available - pos), pos)
                        if not chunk:
                            raise ObjectStoreError(f"local file of {self._digest} shrank")
                        await writer.write(chunk)
                        pos += len(chunk)
                        continue
                    self._changed.clear()
                    if self._final is None and pos >= self._available:
                        await self._changed.wait()
        except (BaseError, RuntimeError, ValueError) as exc:
            objects._observe("upload", "error", started)
            raise objects._failed("upload", exc) from None
        except OSError as exc:  # reading the local file
            raise ObjectStoreError(f"cannot read the local file of {self._digest}: {exc}") from None
        finally:
            os.close(fd)
        objects._observe("upload", "ok", started)
        objects._up()


def _one_line(exc: BaseException) -> str:
    """obstore's errors carry multi-line Rust debug output: the first line says it."""
    text = str(exc).strip() or type(exc).__name__
    return text.splitlines()[0][:300]
