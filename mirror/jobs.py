"""Warm jobs inside the mirror: fetch images into the cache, with progress.

`mirror warm` (mirror.warm) is a client of a running mirror; a job here does the same
work in the mirror itself, through the same proxies a pull goes through (single flight,
digest verification, per-upstream isolation), so the admin API, the status page and
pins can start one and watch it. Blob bodies are drained without reading them: a cached
blob's body is spans of its file, and a download's is the download itself.

A job runs in the process that started it; its record is written to the store (the
disk index, or Redis with `store: s3`) when it starts, every PUBLISH_EVERY while it
runs, and when it ends, so any worker or replica answering the admin API can show it:
`mirror admin warm --wait` polls whichever one its requests reach. The last MAX_KEPT
finished ones are kept: a job is an operator's action, and its record is for watching
it, not an audit log. A record left "running" by a process that died is shown failed
once it has not been written for ORPHANED seconds.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import secrets
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, Literal

from mirror.errors import AbortResponse, RegistryError
from mirror.filespan import FileSpan
from mirror.inventory import refs
from mirror.mediatypes import MANIFEST_TYPES, AcceptSet
from mirror.reference import Digest, Reference
from mirror.routing import Router
from mirror.store import ImageKey, Store
from mirror.warm import parse_image, platform_wanted

log = logging.getLogger(__name__)

MAX_KEPT = 100
PUBLISH_EVERY = 1.0  # seconds between a running job's record writes
ORPHANED = 30.0  # a running record not written this long: its process is gone
# Blobs of one job fetched at once: a warm must not take every cold-fetch slot.
PARALLEL_BLOBS = 2
ACCEPT = AcceptSet.from_headers([", ".join(sorted(MANIFEST_TYPES))])

State = Literal["running", "done", "failed"]
Kind = Literal["warm", "refresh"]


@dataclass
class Job:
    id: str
    kind: Kind
    images: list[str]
    platforms: list[str] | None
    started: float
    state: State = "running"
    finished: float | None = None
    blobs_total: int = 0
    blobs_done: int = 0
    bytes_total: int = 0
    bytes_done: int = 0
    error: str | None = None
    failed_images: dict[str, str] = field(default_factory=dict)
    ended: asyncio.Event = field(default_factory=asyncio.Event, repr=False)

    def as_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "kind": self.kind,
            "images": self.images,
            "platforms": self.platforms,
            "state": self.state,
            "started": self.started,
            "finished": self.finished,
            "blobs_total": self.blobs_total,
            "blobs_done": self.blobs_done,
            "bytes_total": self.bytes_total,
            "bytes_done": self.bytes_done,
            "error": self.error,
            "failed_images": self.failed_images,
        }


class Jobs:
    def __init__(
        self,
        router: Router,
        store: Store,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._router = router
        self._store = store
        self._clock = clock
        self._jobs: dict[str, Job] = {}
        self._tasks: set[asyncio.Task[None]] = set()

    def mine(self) -> list[Job]:
        """This process's jobs, newest first."""
        return sorted(self._jobs.values(), key=lambda j: j.started, reverse=True)

    def get(self, job_id: str) -> Job | None:
        """One of this process's jobs."""
        return self._jobs.get(job_id)

    async def records(self) -> list[dict[str, Any]]:
        """Every process's jobs, newest first: this one's as they are, the others' as
        last written."""
        stored = await asyncio.to_thread(self._store.jobs)
        found: dict[str, dict[str, Any]] = {}
        now = self._clock()
        for job_id, text in stored.items():
            record = _parse(text)
            if record is None:
                continue
            if record["state"] == "running" and now - record.get("updated", 0) > ORPHANED:
                record = {**record, "state": "failed", "error": "its process stopped"}
            found[job_id] = record
        for job in self._jobs.values():
            found[job.id] = job.as_json()
        return sorted(found.values(), key=lambda r: r.get("started", 0), reverse=True)

    async def record(self, job_id: str) -> dict[str, Any] | None:
        own = self._jobs.get(job_id)
        if own is not None:
            return own.as_json()
        return next((r for r in await self.records() if r["id"] == job_id), None)

    @property
    def running(self) -> int:
        """This process's running jobs (the limit on them is per process)."""
        return sum(1 for j in self._jobs.values() if j.state == "running")

    async def start(
        self, images: Iterable[str], platforms: Iterable[str] | None, kind: Kind
    ) -> Job:
        """Check every image name now (a bad one is the caller's 400), then run. Its
        record is written before this returns: any worker asked next knows the job."""
        names = list(images)
        for image in names:
            try:
                parse_image(image)
            except (ValueError, RegistryError) as exc:
                message = exc.message if isinstance(exc, RegistryError) else str(exc)
                raise RegistryError(
                    "NAME_INVALID", f"{image!r}: {message}", detail={"image": image[:256]}
                ) from None
        wanted = sorted(set(platforms)) if platforms else None
        # Random, not counted: workers and replicas write to one place.
        job = Job(f"{kind}-{secrets.token_hex(4)}", kind, names, wanted, self._clock())
        self._jobs[job.id] = job
        self._trim()
        await self._publish(job)
        task = asyncio.create_task(self._run(job))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return job

    async def wait(self, job: Job) -> Job:
        """Until the job has ended (tests, and callers that need it done)."""
        await job.ended.wait()
        return job

    async def aclose(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    def _trim(self) -> None:
        done = [j for j in self.mine() if j.state != "running"]
        for job in done[MAX_KEPT:]:
            self._jobs.pop(job.id, None)

    async def _publish(self, job: Job) -> None:
        record = {**job.as_json(), "updated": self._clock()}
        try:
            await asyncio.to_thread(self._store.put_job, job.id, json.dumps(record))
        except Exception as exc:  # shown by this process still; others lag behind
            log.warning("%s job %s: its record could not be written: %s", job.kind, job.id, exc)

    async def _publishing(self, job: Job, stop: asyncio.Event) -> None:
        # Stopped by an event, not cancelled: a write cancelled in its thread would
        # still land, maybe after the final one.
        while not stop.is_set():  # written once already, by `start`
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), PUBLISH_EVERY)
            if not stop.is_set():
                await self._publish(job)

    async def _forget_old(self) -> None:
        """Past MAX_KEPT finished records in the store, the oldest go."""
        try:
            stored = await asyncio.to_thread(self._store.jobs)
            done = [r for r in map(_parse, stored.values()) if r and r["state"] != "running"]
            done.sort(key=lambda r: r.get("started", 0), reverse=True)
            old = [r["id"] for r in done[MAX_KEPT:]]
            if old:
                await asyncio.to_thread(self._store.drop_jobs, old)
        except Exception as exc:
            log.warning("old job records could not be dropped: %s", exc)

    async def _run(self, job: Job) -> None:
        stop = asyncio.Event()
        publisher = asyncio.create_task(self._publishing(job, stop))
        try:
            await self._work(job)
        finally:
            stop.set()
            try:
                await publisher
                await self._publish(job)  # the final state, after the last progress
            finally:
                job.ended.set()  # ended for every process that reads the record too
            await self._forget_old()

    async def _work(self, job: Job) -> None:
        try:
            for image in job.images:
                try:
                    await self._warm(job, image)
                except RegistryError as exc:
                    job.failed_images[image] = exc.message
                    log.warning("%s job %s: %s: %s", job.kind, job.id, image, exc.message)
            if job.failed_images:
                job.state = "failed"
                job.error = "; ".join(f"{i}: {m}" for i, m in job.failed_images.items())
            else:
                job.state = "done"
        except asyncio.CancelledError:
            job.state, job.error = "failed", "the mirror stopped"
            raise
        except Exception as exc:  # a job's failure is reported, never crashes the mirror
            log.exception("%s job %s failed", job.kind, job.id)
            job.state, job.error = "failed", f"internal error: {type(exc).__name__}"
        finally:
            job.finished = self._clock()

    async def _warm(self, job: Job, image: str) -> None:
        registry, name, ref = parse_image(image)
        route = self._router.route(registry, name)
        proxy = route.proxy
        top = await proxy.manifest(route.name, Reference.parse(ref), ACCEPT)
        repo = proxy.repo(route.name)
        self._store.record_pull(ImageKey(proxy.name, repo, ref), top.stored.digest)
        manifests = [top.stored]
        found = refs(top.stored)
        if found.manifests:
            wanted = [
                d
                for d, platform in found.manifests
                if platform is not None and platform_wanted(platform, job.platforms)
            ]
            if not wanted:
                available = ", ".join(sorted({p for _, p in found.manifests if p}))
                raise RegistryError(
                    "MANIFEST_UNKNOWN",
                    f"no platform matches {', '.join(job.platforms or [])} (the image has: "
                    f"{available})",
                )
            for digest in wanted:
                child = await proxy.manifest(route.name, Reference(digest=digest), ACCEPT)
                manifests.append(child.stored)
        blobs: dict[Digest, int] = {}
        for stored in manifests:
            blobs.update(refs(stored).blobs)
        job.blobs_total += len(blobs)
        job.bytes_total += sum(blobs.values())
        slots = asyncio.Semaphore(PARALLEL_BLOBS)

        async def fetch(digest: Digest) -> None:
            async with slots:
                blob = await proxy.blob(route.name, digest, None, head=False)
                if blob.body is not None:
                    try:
                        async for chunk in blob.body:
                            job.bytes_done += (
                                chunk.count if isinstance(chunk, FileSpan) else len(chunk)
                            )
                    finally:
                        await blob.body.aclose()
                    await proxy.downloads.settled(digest)  # done means cached
                else:  # a redirect to the bucket: cached already
                    job.bytes_done += blobs[digest]
                job.blobs_done += 1

        results = await asyncio.gather(*(fetch(d) for d in blobs), return_exceptions=True)
        for result in results:
            if isinstance(result, RegistryError):
                raise result
            if isinstance(result, AbortResponse):  # the download failed mid-body
                raise RegistryError("UNAVAILABLE", str(result), status=502)
            if isinstance(result, BaseException):
                raise result


def _parse(text: str) -> dict[str, Any] | None:
    try:
        record = json.loads(text)
    except ValueError:
        return None
    if not isinstance(record, dict) or "id" not in record or "state" not in record:
        return None
    return record
