"""`mirror admin` against real pulls: a mirror process in front of the real registry
with token auth, skopeo pulling through it, and the CLI run as a person would.

Purging a tag frees its unique blobs while a base layer another image uses stays; a
pinned image survives the size-cap eviction round a bigger pull sets off.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from conftest import RealUpstream
from harness import Layout, free_port, push
from harness.images import seeded_bytes
from harness.mirror import MirrorProcess, skopeo_copy

from mirror.admincli import counted
from mirror.units import human_bytes

pytestmark = pytest.mark.e2e

KiB = 1024


@dataclass(frozen=True)
class Pushed:
    reference: str  # repository:tag
    digest: str
    blobs: dict[str, int]  # digest -> size: config, then layers in order

    @property
    def repo(self) -> str:
        return self.reference.split(":")[0]

    @property
    def config(self) -> str:
        return next(iter(self.blobs))

    @property
    def layers(self) -> list[str]:
        return list(self.blobs)[1:]

    @property
    def size(self) -> int:
        return sum(self.blobs.values())


@pytest.fixture(scope="module")
def images(real_upstream: RealUpstream) -> dict[str, Pushed]:
    """a and b share a 300 KiB base layer; c is a bigger image with nothing shared."""
    layout = Layout(real_upstream.workdir / "admin-layout")
    base = [("usr/lib/base.bin", seeded_bytes("admin-base", 300 * KiB))]
    plan = {
        "a": [base, [("opt/a.bin", seeded_bytes("admin-a", 64 * KiB))]],
        "b": [base, [("opt/b.bin", seeded_bytes("admin-b", 100 * KiB))]],
        "c": [[("opt/c.bin", seeded_bytes("admin-c", 1024 * KiB))]],
    }
    pushed = {}
    for name, layers in plan.items():
        descriptor = layout.image(layers)
        layout.tag(descriptor, name)
        digest = push(layout.root, name, real_upstream.registry, f"shared/{name}", "1")
        assert digest == descriptor["digest"]
        manifest = json.loads(layout.read(digest))
        blobs = {d["digest"]: d["size"] for d in [manifest["config"], *manifest["layers"]]}
        pushed[name] = Pushed(f"shared/{name}:1", digest, blobs)
    assert pushed["a"].layers[0] == pushed["b"].layers[0]  # the shared base
    return pushed


class AdminMirror(MirrorProcess):
    """The mirror with an admin listener: /admin/v1 and /metrics are there."""

    def __init__(
        self, workdir: Path, upstream: str, env: dict[str, str], workers: int | None = None
    ) -> None:
        self.admin_host = f"127.0.0.1:{free_port()}"
        super().__init__(
            workdir,
            upstream,
            env={**env, "MIRROR_ADMIN_LISTEN": self.admin_host},
            workers=workers,
        )

    @property
    def admin_url(self) -> str:
        return f"http://{self.admin_host}"

    @property
    def metrics_url(self) -> str:
        return f"{self.admin_url}/metrics"

    def admin(self, *args: str) -> str:
        """`mirror admin ARGS` as a user runs it; what it printed."""
        run = subprocess.run(
            [sys.executable, "-m", "mirror", "admin", *args, "--admin", self.admin_url],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert run.returncode == 0, run.stdout + run.stderr
        assert "Traceback" not in run.stderr
        return run.stdout

    def cache(self, repo: str, digest: str) -> str:
        """X-Cache of a HEAD: HIT when cached; a MISS (asked upstream) caches nothing."""
        r = httpx.head(f"{self.url}/v2/{repo}/blobs/{digest}", timeout=30)
        assert r.status_code == 200, (repo, digest, r.status_code)
        return r.headers["x-cache"]

    def blob_bytes(self) -> int:
        summary = httpx.get(f"{self.admin_url}/admin/v1/summary", timeout=10).json()
        cached: int = summary["cache"]["blob_bytes"]
        return cached

    def until(self, condition: Callable[[], bool], what: str, timeout: float = 15) -> None:
        """Wait for what the mirror does after a client is done (a blob's commit follows
        its last byte; an eviction round comes every interval)."""
        deadline = time.monotonic() + timeout
        while not condition():
            assert time.monotonic() < deadline, f"timed out waiting for {what}"
            time.sleep(0.05)

    def pull(self, image: Pushed, dest: Path) -> None:
        result = skopeo_copy(f"docker://{self.host}/{image.reference}", f"oci:{dest}:x")
        assert result.returncode == 0, result.stderr


COLUMNS = (
    *("UPSTREAM", "REPOSITORY", "TAG", "DIGEST", "PLATFORMS"),
    *("SIZE", "CACHED", "PULLS", "LAST PULL", "PIN"),
)


def _image_rows(listing: str) -> dict[str, dict[str, str]]:
    """`mirror admin images` rows by REPOSITORY:TAG, each by column: the table's columns
    start where their headers do (cells such as "1.5 KiB" hold spaces)."""
    header, *rows, count = listing.splitlines()
    assert count == counted(len(rows), "image"), listing
    starts = [header.index(name) for name in COLUMNS]
    assert starts == sorted(starts), header
    found = {}
    for line in rows:
        cells = [line[i:j].strip() for i, j in zip(starts, [*starts[1:], None], strict=True)]
        row = dict(zip(COLUMNS, cells, strict=True))
        found[f"{row['REPOSITORY']}:{row['TAG']}"] = row
    return found


def test_purge_keeps_shared_blobs_and_a_pin_survives_a_size_cap_round(
    real_upstream: RealUpstream, images: dict[str, Pushed], tmp_path: Path
) -> None:
    a, b, c = images["a"], images["b"], images["c"]
    a_own = a.size - a.blobs[a.layers[0]]  # a's config and layer; its base is b's too
    # c alone fits, and so do a and b together; b and c together do not.
    cap = c.size + b.size // 2
    assert a_own + b.size < cap < b.size + c.size
    env = {"MIRROR_MAX_SIZE": str(cap), "MIRROR_EVICTION_INTERVAL": "0.2"}
    with AdminMirror(tmp_path / "m", real_upstream.registry.url, env) as mirror:
        for image in (a, b):
            mirror.pull(image, tmp_path / image.repo.replace("/", "_"))
        mirror.until(lambda: mirror.blob_bytes() == a_own + b.size, "a and b in the cache")

        rows = _image_rows(mirror.admin("images", "shared/"))
        assert set(rows) == {a.reference, b.reference}
        for image in (a, b):
            row = rows[image.reference]
            assert row["DIGEST"] == image.digest[7:19], row
            assert row["PLATFORMS"] == "linux/amd64", row
            assert row["SIZE"] == human_bytes(image.size), row
            assert (row["CACHED"], row["PULLS"], row["PIN"]) == ("all", "1", ""), row
        upstream = rows[a.reference]["UPSTREAM"]

        purged = mirror.admin("purge", a.reference).strip()
        assert purged.startswith(
            f"purged {upstream}/{a.reference}: 1 tag, 1 manifest, "
            f"2 blobs ({human_bytes(a_own)} freed)"
        ), purged
        assert purged.endswith("; 1 blob kept (used by other images)"), purged
        assert set(_image_rows(mirror.admin("images"))) == {b.reference}
        assert mirror.blob_bytes() == b.size
        # What the registry API of the mirror answers: the base through b, from the
        # cache; a's own layer and config, from the upstream again.
        assert mirror.cache(b.repo, b.layers[0]) == "HIT"
        for digest in (a.config, a.layers[1]):
            assert mirror.cache(a.repo, digest) == "MISS", digest

        assert mirror.admin("pin", b.reference).startswith(f"pinned {upstream}/{b.reference}")
        pins = mirror.admin("pins").splitlines()
        assert [p.split()[:3] for p in pins[1:]] == [[upstream, b.repo, "1"]]
        assert _image_rows(mirror.admin("images"))[b.reference]["PIN"] == "pinned"

        # c is the most recent pull, yet b, pinned, is what stays.
        mirror.pull(c, tmp_path / "c")
        mirror.until(
            lambda: (
                mirror.metric("mirror_evictions_total", kind="blob", reason="size") > 0
                and mirror.blob_bytes() <= cap
            ),
            f"an eviction round to bring the cache under {cap} bytes",
        )
        for digest in b.blobs:
            assert mirror.cache(b.repo, digest) == "HIT", digest
        assert mirror.cache(c.repo, c.layers[0]) == "MISS"
        rows = _image_rows(mirror.admin("images", "shared/"))
        assert (rows[b.reference]["CACHED"], rows[b.reference]["PIN"]) == ("all", "pinned")
        assert rows[c.reference]["CACHED"] != "all", rows[c.reference]


def test_warm_jobs_are_answered_for_by_every_worker(
    real_upstream: RealUpstream, images: dict[str, Pushed], tmp_path: Path
) -> None:
    """With `workers: 2` both processes answer the one admin port: each `mirror admin`
    run reaches either. A job runs in the worker its POST reached, and the other
    answers for it (the other worker is stopped meanwhile, so each run reaches the one
    named)."""
    with AdminMirror(tmp_path / "m", real_upstream.registry.url, {}, workers=2) as mirror:

        def warm(name: str) -> str:
            out = mirror.admin("warm", images[name].reference, "--wait").splitlines()
            job_id = out[0].split()[1]  # "job warm-… started"
            assert out[-1].startswith(f"job {job_id} done: "), out
            return job_id

        def listed() -> dict[str, str]:
            rows = mirror.admin("jobs").splitlines()[1:]
            return {row.split()[0]: row.split()[1] for row in rows}

        with mirror.only(1):
            a = warm("a")
        with mirror.only(2):
            assert listed() == {a: "done"}  # run by worker 1, shown by worker 2
            b = warm("b")
        with mirror.only(1):
            assert listed() == {a: "done", b: "done"}
            job = httpx.get(f"{mirror.admin_url}/admin/v1/jobs/{b}", timeout=10).json()
            assert (job["state"], job["blobs_done"]) == ("done", len(images["b"].blobs))
        for name in ("a", "b"):
            assert all(mirror.cache(images[name].repo, d) == "HIT" for d in images[name].blobs)
