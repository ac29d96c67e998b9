"""Soak: many clients through the real `mirror serve` against an upstream that injects
faults at random. Bounded (`--seconds`), not part of `make test`.

The upstream speaks raw HTTP from this process (tests/fakes/rawupstream.py), serving
blobs of 64 KiB-4 MiB and tagged manifests, with Range for resumes. Per request it may:
cut the body mid-way, flip bytes, answer 500, answer garbage, stall, leave a stray
response on the idle connection, or put a body after a HEAD answer. A small cache
(`max_size`) and a 1 s tag TTL keep misses and revalidations coming.

Every 200 body is checked by sha256 against its digest. What must hold, and makes the
exit status 1 otherwise: no 500, no request that hangs (a client timeout), no body that
fails its digest, and the mirror's RSS and open descriptors back near where they were
after warm-up.

    .venv/bin/python bench/soak.py --seconds 120 --clients 64
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import os
import random
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT / "tests"), str(ROOT)]

from fakes.rawupstream import RawUpstream, Request, Script, Step, response  # noqa: E402
from harness.mirror import MirrorProcess  # noqa: E402

OCI = "application/vnd.oci.image.manifest.v1+json"
FAULTS = ("cut", "flip", "500", "garbage", "stall", "stray", "none")


class Upstream:
    def __init__(self, rng: random.Random, fault_rate: float) -> None:
        self.rng = rng
        self.fault_rate = fault_rate
        self.blobs: dict[str, bytes] = {}
        for _ in range(24):
            data = rng.randbytes(rng.randrange(64 << 10, 4 << 20))
            self.blobs["sha256:" + hashlib.sha256(data).hexdigest()] = data
        self.manifests: dict[str, bytes] = {}
        digests = list(self.blobs)
        for i in range(8):
            body = json.dumps(
                {
                    "schemaVersion": 2,
                    "mediaType": OCI,
                    "config": {"mediaType": "x/y+json", "digest": digests[i], "size": 1},
                    "layers": [],
                }
            ).encode()
            self.manifests[f"t{i}"] = body
        self.injected: Counter[str] = Counter()

    def answer(self, request: Request) -> Script:
        fault = "none"
        if self.rng.random() < self.fault_rate:
            fault = self.rng.choice(FAULTS[:-1])
        self.injected[fault] += 1
        ref = request.path.rsplit("/", 1)[-1]
        if "/manifests/" in request.path:
            body = self.manifests.get(ref)
            digest = "sha256:" + hashlib.sha256(body or b"").hexdigest()
            headers = {"content-type": OCI, "docker-content-digest": digest}
            if body is None:
                return Script([response(404, b"{}")])
            payload = b"" if request.method == "HEAD" else body
            if fault == "stray":  # a HEAD answer that carries the body anyway
                payload = body
        else:
            data = self.blobs.get(ref)
            if data is None:
                return Script([response(404, b"{}")])
            start = 0
            rng = request.headers.get("range", "")
            if rng.startswith("bytes="):
                start = int(rng[6:].split("-")[0])
            headers = {"docker-content-digest": ref}
            if start:
                headers["content-range"] = f"bytes {start}-{len(data) - 1}/{len(data)}"
            payload = b"" if request.method == "HEAD" else data[start:]
            if fault == "flip" and payload:
                payload = bytes([payload[0] ^ 0xFF]) + payload[1:]
        status = 206 if "content-range" in headers else 200
        full = response(status, payload, headers)
        if request.method == "HEAD" and fault != "stray":
            full = response(
                status, b"", {**headers, "content-length": str(len(payload))}, length=False
            )
        faulty: dict[str, list[Step]] = {
            "cut": [full[: len(full) - max(1, len(payload) // 2)], None],
            "500": [response(500, b"{}"), None],
            "garbage": [b"HTTP/1.1 2OO no\r\nx: \x00\r\n\r\n", None],
            "stall": [full[:200], 1.5, full[200:]],
        }
        steps = faulty.get(fault, [full])
        return Script(steps, after=response(200, b"stray") if fault == "stray" else b"")


def sample(pid: int | None) -> tuple[int, int]:
    assert pid is not None, "the mirror is running"
    status = Path(f"/proc/{pid}/status").read_text()
    rss = next(int(line.split()[1]) for line in status.splitlines() if line.startswith("VmRSS"))
    return rss // 1024, len(os.listdir(f"/proc/{pid}/fd"))


async def client(
    mirror: str, up: Upstream, rng: random.Random, until: float, seen: Counter[str]
) -> None:
    blobs, tags = list(up.blobs), list(up.manifests)
    async with httpx.AsyncClient(base_url=mirror, timeout=60) as c:
        while time.monotonic() < until:
            if rng.random() < 0.3:
                path, want = f"/v2/app/manifests/{rng.choice(tags)}", None
            else:
                digest = rng.choice(blobs)
                path, want = f"/v2/app/blobs/{digest}", digest
            try:
                r = await c.get(path, headers={"Accept": OCI})
            except httpx.TimeoutException:
                seen["hang"] += 1
                continue
            except httpx.TransportError:
                seen["cut (retried by real clients)"] += 1
                continue
            if r.status_code == 200:
                ok = want is None or "sha256:" + hashlib.sha256(r.content).hexdigest() == want
                seen["200 verified" if ok else "WRONG BYTES"] += 1
            elif r.status_code in (502, 503, 504) and "errors" in r.json():
                seen[f"{r.status_code} in the OCI envelope"] += 1
            else:
                seen[f"status {r.status_code}"] += 1


async def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    p.add_argument("--seconds", type=float, default=60)
    p.add_argument("--clients", type=int, default=32)
    p.add_argument("--fault-rate", type=float, default=0.2)
    p.add_argument("--seed", type=int, default=1)
    args = p.parse_args()
    rng = random.Random(args.seed)
    up = Upstream(rng, args.fault_rate)
    seen: Counter[str] = Counter()
    with tempfile.TemporaryDirectory(prefix="soak-") as tmp:
        raw = RawUpstream(up.answer)
        async with raw.serve() as url:
            env = {
                "MIRROR_MAX_SIZE": "24MiB",
                "MIRROR_TAG_TTL": "1",
                "MIRROR_READ_TIMEOUT": "3",
                "MIRROR_FETCH_TIMEOUT": "10",
                "MIRROR_EVICTION_INTERVAL": "2",
                "MIRROR_ACCESS_LOG": "false",
            }
            with MirrorProcess(Path(tmp), url, env=env) as mirror:
                warm_until = time.monotonic() + min(10.0, args.seconds / 4)
                await asyncio.gather(
                    *(
                        client(mirror.url, up, random.Random(i), warm_until, Counter())
                        for i in range(args.clients)
                    )
                )
                before = sample(mirror.pid)
                until = time.monotonic() + args.seconds
                await asyncio.gather(
                    *(
                        client(mirror.url, up, random.Random(100 + i), until, seen)
                        for i in range(args.clients)
                    )
                )
                await asyncio.sleep(3)  # downloads the clients left finish or fail
                after = sample(mirror.pid)
                log = mirror.log()
    print(f"{args.clients} clients, {args.seconds:.0f} s, fault rate {args.fault_rate}")
    print("faults injected:", dict(up.injected))
    print("client saw:", dict(seen))
    print(f"mirror RSS MiB / open fds after warm-up {before}, at the end {after}")
    tracebacks = log.count("Traceback")
    print(f"tracebacks in the mirror's log: {tracebacks}")
    bad = (
        seen["hang"]
        + seen["WRONG BYTES"]
        + sum(n for k, n in seen.items() if k.startswith("status "))
        + tracebacks
    )
    flat = after[0] <= before[0] * 1.5 + 20 and after[1] <= before[1] + 16
    print("PASS" if bad == 0 and flat else "FAIL")
    return 0 if bad == 0 and flat else 1


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
