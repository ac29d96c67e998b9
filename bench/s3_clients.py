"""Which S3 client for the blob store: aiobotocore or obstore, measured against Ceph RGW.

A real RADOS Gateway (tests/harness/rgw.py: one mon, one OSD, one RGW on loopback) serves
both libraries in one run, the variants interleaved round by round (ABAB) so that they
share the noise of the 2-core machine. Per round:

  upload  a 1 GiB object of random bytes, streamed as the mirror would: 1 MiB chunks
          from an async source, parts of 16 (and 64) MiB uploaded as they fill, at most
          2 in flight, then CompleteMultipartUpload;
  get     a 1 GiB object streamed to a sink in ~1 MiB chunks, nothing kept;
  range   200 sequential GETs of 1 MiB at random offsets (the same offsets per library).

The aiobotocore and obstore packages are not project dependencies: run this with a
separate venv that has them (plus pytest and pyjwt, which tests/harness imports), as root
(the harness runs the Ceph daemons as `ceph`):

    python3 -m venv /tmp/s3bench/v
    /tmp/s3bench/v/bin/pip install aiobotocore obstore pytest 'pyjwt[crypto]'
    PYTHONPATH=/work/main:/work/main/tests /tmp/s3bench/v/bin/python bench/s3_clients.py

GB is 10**9 bytes. Client CPU is user + system time of this process (getrusage; it counts
obstore's tokio threads too); server CPU is that of ceph-osd + radosgw (/proc/PID/stat).
RSS growth is the peak (VmHWM, reset through /proc/self/clear_refs) minus the RSS before
the operation, after malloc_trim(0) so that memory kept from the previous one does not
hide it. Every uploaded object is checked (size and three ranges) outside the timing.
"""

from __future__ import annotations

import argparse
import asyncio
import ctypes
import functools
import hashlib
import json
import os
import random
import resource
import statistics
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol, cast

import aiobotocore
import botocore
import obstore
from aiobotocore.config import AioConfig
from aiobotocore.session import AioSession
from obstore.store import S3Store

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from harness.rgw import RadosGateway

from mirror.tuning import tune_malloc

GB = 1e9
MiB = 1 << 20
CHUNK = MiB  # what the mirror reads from upstream at a time
INFLIGHT = 2  # parts uploading at once
BUCKET = "bench"
SETTLE = 1.5  # seconds of quiet before each timed operation (RGW's gc runs every 5 s)

_CLK_TCK = os.sysconf("SC_CLK_TCK")
_libc = ctypes.CDLL(None)


# -- meters -----------------------------------------------------------------------------------


def client_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def client_sys() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_stime


def server_cpu(pids: list[int]) -> float:
    total = 0
    for pid in pids:
        # Fields after the ")" that closes the command name: utime and stime are 14 and 15.
        stat = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        total += int(stat[11]) + int(stat[12])
    return total / _CLK_TCK


def _status_kib(field_name: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field_name + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"no {field_name} in /proc/self/status")


def reset_peak_rss() -> int:
    """Return memory kept by malloc, reset the high-water mark; the RSS now, in bytes."""
    _libc.malloc_trim(0)
    Path("/proc/self/clear_refs").write_text("5")
    return _status_kib("VmRSS") * 1024


def peak_rss() -> int:
    return _status_kib("VmHWM") * 1024


@dataclass
class Sample:
    op: str  # upload-16, upload-64, get, range, source
    variant: str
    round: int
    nbytes: int
    seconds: float
    client_cpu: float
    server_cpu: float
    rss_growth: int
    client_sys: float = 0.0  # the kernel's part of client_cpu
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def gbps(self) -> float:
        return self.nbytes / GB / self.seconds

    @property
    def client_per_gb(self) -> float:
        return self.client_cpu / (self.nbytes / GB)

    @property
    def sys_per_gb(self) -> float:
        return self.client_sys / (self.nbytes / GB)

    @property
    def server_per_gb(self) -> float:
        return self.server_cpu / (self.nbytes / GB)


async def measure(
    op: str, variant: str, rnd: int, nbytes: int, pids: list[int], run: Callable[[], Awaitable[Any]]
) -> tuple[Sample, Any]:
    await asyncio.sleep(SETTLE)
    rss0 = reset_peak_rss()
    cpu0, sys0, srv0, t0 = client_cpu(), client_sys(), server_cpu(pids), time.perf_counter()
    result = await run()
    seconds = time.perf_counter() - t0
    sample = Sample(
        op,
        variant,
        rnd,
        nbytes,
        seconds,
        client_cpu() - cpu0,
        server_cpu(pids) - srv0,
        peak_rss() - rss0,
        client_sys() - sys0,
    )
    return sample, result


# -- the source: what the mirror receives from upstream -----------------------------------------


async def chunks_of(data: bytes) -> AsyncIterator[bytes]:
    view = memoryview(data)
    for start in range(0, len(data), CHUNK):
        # A fresh bytes object per chunk, as a socket read hands over; the sleep makes the
        # source yield to the loop like a network read does.
        yield bytes(view[start : start + CHUNK])
        await asyncio.sleep(0)


async def drain(chunks: AsyncIterator[bytes]) -> None:
    async for _ in chunks:
        pass


# -- the clients --------------------------------------------------------------------------------


class Client(Protocol):
    name: str

    async def upload(self, key: str, chunks: AsyncIterator[bytes], part_size: int) -> None: ...

    async def get(self, key: str) -> tuple[int, int]: ...

    async def get_range(self, key: str, start: int, length: int) -> bytes: ...


class Boto:
    """aiobotocore: async-native (aiohttp); a streamed upload is ours to write."""

    def __init__(self, name: str, client: Any) -> None:
        self.name = name
        self.s3 = client

    async def upload(self, key: str, chunks: AsyncIterator[bytes], part_size: int) -> None:
        s3 = self.s3
        upload_id = (await s3.create_multipart_upload(Bucket=BUCKET, Key=key))["UploadId"]
        slots = asyncio.Semaphore(INFLIGHT)
        tasks: list[asyncio.Task[dict[str, Any]]] = []

        async def send(number: int, body: bytes) -> dict[str, Any]:
            try:
                reply = await s3.upload_part(
                    Bucket=BUCKET, Key=key, UploadId=upload_id, PartNumber=number, Body=body
                )
            finally:
                slots.release()
            return {"PartNumber": number, "ETag": reply["ETag"]}

        async def start_part(pending: list[bytes]) -> None:
            await slots.acquire()  # back-pressure: the source waits while 2 parts upload
            tasks.append(asyncio.create_task(send(len(tasks) + 1, b"".join(pending))))

        try:
            pending: list[bytes] = []
            filled = 0
            async for chunk in chunks:
                pending.append(chunk)
                filled += len(chunk)
                if filled >= part_size:
                    await start_part(pending)
                    pending, filled = [], 0
            if pending or not tasks:
                await start_part(pending)
            parts = await asyncio.gather(*tasks)
            await s3.complete_multipart_upload(
                Bucket=BUCKET, Key=key, UploadId=upload_id, MultipartUpload={"Parts": parts}
            )
        except BaseException:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            await s3.abort_multipart_upload(Bucket=BUCKET, Key=key, UploadId=upload_id)
            raise

    async def get(self, key: str) -> tuple[int, int]:
        reply = await self.s3.get_object(Bucket=BUCKET, Key=key)
        total = count = 0
        async with reply["Body"] as body:
            # read(n) hands over what aiohttp has buffered, up to n: chunks are often smaller.
            async for chunk in body.iter_chunks(CHUNK):
                total += len(chunk)
                count += 1
        return total, count

    async def get_range(self, key: str, start: int, length: int) -> bytes:
        reply = await self.s3.get_object(
            Bucket=BUCKET, Key=key, Range=f"bytes={start}-{start + length - 1}"
        )
        async with reply["Body"] as body:
            data: bytes = await body.read()
        return data


class Obstore:
    """obstore: Rust object_store behind a Python API; multipart buffering is built in."""

    def __init__(self, name: str, store: S3Store, writer: bool = True) -> None:
        self.name = name
        self.store = store
        self.writer = writer

    async def upload(self, key: str, chunks: AsyncIterator[bytes], part_size: int) -> None:
        if self.writer:
            # buffer_size is the part size; leaving the block on an exception aborts the
            # multipart upload (checked: no object, no pending upload left behind).
            async with obstore.open_writer_async(
                self.store, key, buffer_size=part_size, max_concurrency=INFLIGHT
            ) as writer:
                async for chunk in chunks:
                    await writer.write(chunk)
        else:
            await obstore.put_async(
                self.store, key, chunks, chunk_size=part_size, max_concurrency=INFLIGHT
            )

    async def get(self, key: str) -> tuple[int, int]:
        reply = await obstore.get_async(self.store, key)
        total = count = 0
        # The default (and plain `async for reply`) is 10 MB chunks.
        async for chunk in reply.stream(min_chunk_size=CHUNK):
            total += len(chunk)
            count += 1
        return total, count

    async def get_range(self, key: str, start: int, length: int) -> bytes:
        data = await obstore.get_range_async(self.store, key, start=start, length=length)
        return cast(bytes, data)  # obstore.Bytes: a buffer, compared as one


# -- the run ------------------------------------------------------------------------------------


async def verify(admin: Any, key: str, data: bytes, rng: random.Random) -> None:
    head = await admin.head_object(Bucket=BUCKET, Key=key)
    if head["ContentLength"] != len(data):
        raise RuntimeError(f"{key}: {head['ContentLength']} bytes stored, {len(data)} sent")
    for _ in range(3):
        start = rng.randrange(len(data) - MiB)
        reply = await admin.get_object(
            Bucket=BUCKET, Key=key, Range=f"bytes={start}-{start + MiB - 1}"
        )
        async with reply["Body"] as body:
            if await body.read() != data[start : start + MiB]:
                raise RuntimeError(f"{key}: bytes differ at {start}")


def boto_config(checksums: str) -> AioConfig:
    return AioConfig(
        s3={"addressing_style": "path"},
        request_checksum_calculation=checksums,
        response_checksum_validation=checksums,
        max_pool_connections=10,
    )


async def run(args: argparse.Namespace, rgw: RadosGateway) -> list[Sample]:
    pids = [d.pid for d in rgw._daemons if d._binary in ("ceph-osd", "radosgw") and d.pid]
    creds = rgw.credentials
    session = AioSession()

    def boto_client(checksums: str) -> Any:
        return session.create_client(
            "s3",
            endpoint_url=rgw.endpoint,
            region_name="us-east-1",
            aws_access_key_id=creds.access_key,
            aws_secret_access_key=creds.secret_key,
            config=boto_config(checksums),
        )

    def store(unsigned: bool) -> S3Store:
        return S3Store(
            BUCKET,
            endpoint=rgw.endpoint,
            access_key_id=creds.access_key,
            secret_access_key=creds.secret_key,
            region="us-east-1",
            virtual_hosted_style_request=False,  # path style
            unsigned_payload=unsigned,
            client_options={"allow_http": True},
        )

    size = args.size_mib * MiB
    print(f"generating {args.size_mib} MiB of random bytes", flush=True)
    data = os.urandom(size)
    samples: list[Sample] = []

    def log(sample: Sample, note: str = "") -> None:
        samples.append(sample)
        print(
            f"r{sample.round} {sample.op:9} {sample.variant:21} {sample.gbps:6.3f} GB/s "
            f"client {sample.client_per_gb:5.2f} (sys {sample.sys_per_gb:4.2f}) "
            f"CPU-s/GB  server {sample.server_per_gb:5.2f} "
            f"CPU-s/GB  RSS +{sample.rss_growth / MiB:6.1f} MiB {note}",
            flush=True,
        )

    async with (
        boto_client("when_required") as s3,
        boto_client("when_supported") as s3_default,
    ):
        await s3.create_bucket(Bucket=BUCKET)
        uploaders: list[Client] = [
            Boto("aiobotocore", s3),
            Obstore("obstore", store(unsigned=False)),
            Boto("aiobotocore-crc32", s3_default),  # botocore's 1.36+ defaults: CRC32 too
            Obstore("obstore-put_async", store(unsigned=False), writer=False),
            Obstore("obstore-unsigned", store(unsigned=True)),
        ]
        readers = uploaders[:2]
        # One reference object for every GET, so both libraries read the same bytes.
        await Boto("setup", s3).upload("reference", chunks_of(data), 64 * MiB)
        await verify(s3, "reference", data, random.Random(0))

        for rnd in range(1, args.rounds + 1):
            sample, _ = await measure(
                "source", "-", rnd, size, pids, lambda: drain(chunks_of(data))
            )
            log(sample)
            # What SigV4 payload signing costs: botocore always signs payloads over http.
            sample, _ = await measure(
                "sha256", "-", rnd, size, pids, lambda: asyncio.to_thread(hashlib.sha256, data)
            )
            log(sample)
            for part_mib in args.part_mib:
                for client in uploaders:
                    key = f"up-{client.name}-{part_mib}-{rnd}"
                    upload = functools.partial(client.upload, key, chunks_of(data), part_mib * MiB)
                    sample, _ = await measure(
                        f"upload-{part_mib}", client.name, rnd, size, pids, upload
                    )
                    log(sample)
                    await verify(s3, key, data, random.Random(rnd))
                    await s3.delete_object(Bucket=BUCKET, Key=key)
            for client in readers:
                get = functools.partial(client.get, "reference")
                sample, (total, count) = await measure("get", client.name, rnd, size, pids, get)
                if total != size:
                    raise RuntimeError(f"{client.name}: GET gave {total} bytes of {size}")
                sample.extra["mean_chunk_kib"] = total / count / 1024
                log(sample, f"mean chunk {total / count / 1024:.0f} KiB")
            offsets = random.Random(1000 + rnd).sample(range(size - MiB), args.ranges)
            for client in readers:
                await asyncio.sleep(SETTLE)
                latencies = []
                cpu = srv = 0.0
                for start in offsets:
                    srv0, cpu0, t0 = server_cpu(pids), client_cpu(), time.perf_counter()
                    piece = await client.get_range("reference", start, MiB)
                    latencies.append(time.perf_counter() - t0)
                    cpu += client_cpu() - cpu0
                    srv += server_cpu(pids) - srv0
                    # Outside the meters: comparing memoryviews takes 1.7 ms per MiB.
                    if bytes(piece) != data[start : start + MiB]:
                        raise RuntimeError(f"{client.name}: range at {start} differs")
                latencies.sort()
                sample = Sample(
                    "range",
                    client.name,
                    rnd,
                    MiB * len(offsets),
                    sum(latencies),
                    cpu,
                    srv,
                    0,
                    extra={"latencies_ms": [x * 1000 for x in latencies]},
                )
                samples.append(sample)
                print(
                    f"r{rnd} range     {client.name:21} p50 {percentile(latencies, 50) * 1e3:.2f} "
                    f"ms  p99 {percentile(latencies, 99) * 1e3:.2f} ms",
                    flush=True,
                )
    return samples


def percentile(values: list[float], pct: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(pct / 100 * (len(ordered) - 1)))]


def report(samples: list[Sample]) -> None:
    print()
    print(
        "| operation | variant | GB/s median (min-max) | client CPU-s/GB (sys) | "
        "server CPU-s/GB | RSS growth MiB |"
    )
    print("|---|---|---:|---:|---:|---:|")
    keys = dict.fromkeys((s.op, s.variant) for s in samples if s.op != "range")
    for op, variant in keys:
        group = [s for s in samples if (s.op, s.variant) == (op, variant)]
        rates = [s.gbps for s in group]
        print(
            f"| {op} | {variant} | {statistics.median(rates):.3f} "
            f"({min(rates):.3f}-{max(rates):.3f}) "
            f"| {statistics.median(s.client_per_gb for s in group):.2f} "
            f"({statistics.median(s.sys_per_gb for s in group):.2f}) "
            f"| {statistics.median(s.server_per_gb for s in group):.2f} "
            f"| {statistics.median(s.rss_growth for s in group) / MiB:.0f} |"
        )
    print()
    print("| range GET 1 MiB | p50 ms | p99 ms | client CPU ms/req | server CPU ms/req |")
    print("|---|---:|---:|---:|---:|")
    for variant in dict.fromkeys(s.variant for s in samples if s.op == "range"):
        group = [s for s in samples if (s.op, s.variant) == ("range", variant)]
        latencies: list[float] = [x for s in group for x in s.extra["latencies_ms"]]
        requests = len(latencies)
        print(
            f"| {variant} | {percentile(latencies, 50):.2f} | {percentile(latencies, 99):.2f} "
            f"| {sum(s.client_cpu for s in group) / requests * 1e3:.2f} "
            f"| {sum(s.server_cpu for s in group) / requests * 1e3:.2f} |"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--size-mib", type=int, default=1024)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--part-mib", type=int, nargs="+", default=[16, 64])
    parser.add_argument("--ranges", type=int, default=200)
    parser.add_argument("--json", type=Path, help="write every sample here")
    args = parser.parse_args()
    print(f"mirror.tuning.tune_malloc() applied: {tune_malloc()}")
    print(
        f"aiobotocore {aiobotocore.__version__}, botocore "
        f"{botocore.__version__}, obstore {obstore.__version__}, "
        f"Python {sys.version.split()[0]}"
    )
    started = time.monotonic()
    with RadosGateway() as rgw:  # tcp_nodelay=1 on its frontend (see the harness)
        samples = asyncio.run(run(args, rgw))
    report(samples)
    print(f"\ntotal {time.monotonic() - started:.0f} s")
    if args.json:
        args.json.write_text(json.dumps([asdict(s) for s in samples], indent=1))


if __name__ == "__main__":
    main()
