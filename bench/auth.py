"""What client authentication costs on the hit path.

A real `mirror serve` process on 127.0.0.1 in front of the in-process fake upstream, and
an httpx client asking for a cached manifest (a tag hit) and a cached 4 KiB blob, N
times each, sequentially, per mode:

- open: no authentication (the default);
- basic: htpasswd Basic credentials on every request (bcrypt cost 10, verified once,
  then remembered);
- bearer: a token from the mirror's realm on every request (HS256 verify);
- robot: a static robot token (one SHA-256);
- rules: bearer plus 20 access rules to match.

CPU seconds of the mirror process alone per request (from /proc), reported as a ratio
against `open` measured in the same run. Plus the first
bcrypt check of a login, which the cache then saves.

    .venv/bin/python bench/auth.py [--requests 3000]
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import hashlib
import json
import sys
import tempfile
import time
from pathlib import Path

import bcrypt

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT / "tests"))

from fakes.server import serve  # noqa: E402
from fakes.upstream import FakeUpstream  # noqa: E402
from mirrorproc import cpu_seconds, mirror_process  # noqa: E402

from mirror.mediatypes import DOCKER_MANIFEST_V2  # noqa: E402

ROBOT = "bench-robot-token-0123456789abcdef"


async def run_mode(mode: str, upstream_url: str, tmp: Path, n: int) -> tuple[float, float]:
    env: dict[str, str] = {}
    headers: dict[str, str] = {}
    if mode != "open":
        env["MIRROR_AUTH_HTPASSWD"] = str(tmp / "htpasswd")
        robots = [{"name": "robot", "sha256": hashlib.sha256(ROBOT.encode()).hexdigest()}]
        env["MIRROR_AUTH_TOKENS"] = json.dumps(robots)
    if mode == "rules":
        rules = [{"users": [f"user{i}"], "repositories": [f"team{i}/*"]} for i in range(19)]
        rules.append({"users": ["alice", "robot"], "repositories": ["library/*"]})
        env["MIRROR_ACCESS"] = json.dumps(rules)
    async with mirror_process(upstream_url, tmp / mode, env) as (c, pid):
        if mode == "basic":
            headers["Authorization"] = "Basic " + base64.b64encode(b"alice:wonderland").decode()
        elif mode in ("bearer", "rules"):
            got = await c.get(
                "/auth/token",
                params={"scope": "repository:library/app:pull"},
                auth=("alice", "wonderland"),
            )
            headers["Authorization"] = f"Bearer {got.json()['token']}"
        elif mode == "robot":
            headers["Authorization"] = f"Bearer {ROBOT}"
        manifest = "/v2/library/app/manifests/1"
        first = await c.get(manifest, headers=headers)
        assert first.status_code == 200, first.text
        blob = f"/v2/library/app/blobs/{BLOB_DIGEST}"
        while (await c.get(blob, headers=headers)).headers.get("x-cache") != "HIT":
            await asyncio.sleep(0.01)
        results = []
        for path in (manifest, blob):
            cpu = cpu_seconds(pid)
            for _ in range(n):
                r = await c.get(path, headers=headers)
                assert r.status_code == 200 and r.headers["x-cache"] == "HIT"
            results.append((cpu_seconds(pid) - cpu) / n)
        return results[0], results[1]


BLOB = bytes(range(256)) * 16
BLOB_DIGEST = "sha256:" + hashlib.sha256(BLOB).hexdigest()


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--requests", type=int, default=3000)
    args = parser.parse_args()
    upstream = FakeUpstream()
    upstream.add_blob(BLOB)
    manifest = {"schemaVersion": 2, "mediaType": DOCKER_MANIFEST_V2, "layers": []}
    upstream.add_manifest(DOCKER_MANIFEST_V2, manifest, tag="1")
    with tempfile.TemporaryDirectory(prefix="bench-auth-") as scratch:
        tmp = Path(scratch)
        hashed = bcrypt.hashpw(b"wonderland", bcrypt.gensalt(rounds=10))
        (tmp / "htpasswd").write_text(f"alice:{hashed.decode()}\n")
        started = time.perf_counter()
        bcrypt.checkpw(b"wonderland", hashed)
        first_login = time.perf_counter() - started
        async with serve(upstream) as upstream_url:
            upstream.realm = f"{upstream_url}/token"
            figures = {}
            for mode in ("open", "basic", "bearer", "robot", "rules"):
                figures[mode] = await run_mode(mode, upstream_url, tmp, args.requests)
    base_m, base_b = figures["open"]
    rows = [
        {
            "mode": mode,
            "manifest_hit_cpu_us": round(m * 1e6, 1),
            "manifest_ratio": round(m / base_m, 3),
            "blob_hit_cpu_us": round(b * 1e6, 1),
            "blob_ratio": round(b / base_b, 3),
        }
        for mode, (m, b) in figures.items()
    ]
    print(
        json.dumps(
            {
                "requests": args.requests,
                "bcrypt_cost10_first_login_s": round(first_login, 4),
                "modes": rows,
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    asyncio.run(main())
