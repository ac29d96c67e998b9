"""`mirror admin ...` against the in-process mirror: what a person reads in the terminal."""

from __future__ import annotations

import asyncio
import json
import re
from typing import Any

import httpx
from click.testing import CliRunner, Result
from conftest import MirrorFactory
from fakes.upstream import FakeUpstream
from test_admin import admin, built, cached_blobs, image, pull

from mirror.admincli import ago, table
from mirror.cli import main
from mirror.units import human_bytes


def test_tables_and_units_read_well() -> None:
    assert table(["A", "LONGER"], [["xyz", "1"], ["p", "22"]]).splitlines() == [
        "A    LONGER",
        "xyz  1",
        "p    22",
    ]
    assert [human_bytes(n) for n in (0, 1536, 5 << 20, 3 << 30)] == [
        "0 B",
        "1.5 KiB",
        "5.0 MiB",
        "3.0 GiB",
    ]
    assert [ago(t, 10_000.0) for t in (None, 9_990.0, 9_000.0, 10_000.0 - 7200)] == [
        "-",
        "10s ago",
        "16m ago",
        "2h ago",
    ]


async def _cli(*args: str, **env: Any) -> Result:
    # The mirror serves in this loop: the (blocking) CLI runs in a thread.
    return await asyncio.to_thread(CliRunner().invoke, main, list(args), env=env or None)


async def test_images_purge_pin_and_warm_from_the_terminal(
    mirror: MirrorFactory, fake: tuple[FakeUpstream, str]
) -> None:
    upstream, url = fake
    base = b"base " * 2000
    a = image(upstream, "1", [base, b"a " * 3000])
    b = image(upstream, "2", [base, b"b " * 3000], arch="arm64")
    async with mirror(url) as m, admin(m) as api, httpx.AsyncClient(base_url=m.url) as c:
        await pull(c, "library/app", "1")
        await pull(c, "library/tool", "2")
        name = built(m).router.names[0]
        at = str(api.base_url)

        shown = await _cli("admin", "images", "--admin", at)
        assert shown.exit_code == 0, shown.output
        lines = shown.output.splitlines()
        assert lines[0].split() == [
            "UPSTREAM", "REPOSITORY", "TAG", "DIGEST", "PLATFORMS", "SIZE", "CACHED", "PULLS",
            "LAST", "PULL", "PIN",
        ]  # fmt: skip
        app = lines[1].split()
        assert app[:5] == [name, "library/app", "1", a["digest"][7:19], "linux/amd64"]
        assert app[7:9] == ["all", "1"]
        assert lines[-1] == "2 images"
        shown = await _cli("admin", "images", "tool", "--admin", at)
        assert "library/tool" in shown.output and "library/app" not in shown.output
        assert shown.output.splitlines()[-1] == "1 image"
        # For scripts: the API's rows as they are, with nothing to parse out of cells.
        shown = await _cli("admin", "images", "--json", "--admin", at)
        rows = json.loads(shown.output)
        assert [(r["repository"], r["reference"], r["pulls"]) for r in rows] == [
            ("library/app", "1", 1),
            ("library/tool", "2", 1),
        ]
        assert rows[0]["digest"] == a["digest"] and rows[0]["platforms"] == ["linux/amd64"]

        done = await _cli("admin", "purge", f"{name}/library/app:1", "--admin", at)
        assert done.exit_code == 0, done.output
        assert done.output.startswith(f"purged {name}/library/app:1: 1 tag, 1 manifest, 2 blobs")
        assert done.output.rstrip().endswith("1 blob kept (used by other images)")
        assert a["layers"][0] in cached_blobs(m) and a["layers"][1] not in cached_blobs(m)

        # The default upstream needs no name.
        done = await _cli("admin", "pin", "library/tool:2", "--admin", at)
        assert done.exit_code == 0, done.output
        assert done.output.startswith(f"pinned {name}/library/tool:2")
        pins = await _cli("admin", "pins", "--admin", at)
        assert pins.output.splitlines()[1].split()[:3] == [name, "library/tool", "2"]
        assert "pinned" in (await _cli("admin", "images", "--admin", at)).output
        done = await _cli("admin", "unpin", "library/tool:2", "--admin", at)
        assert (
            done.exit_code == 0
            and "pinned" not in (await _cli("admin", "images", "--admin", at)).output
        )

        warmed = await _cli("admin", "warm", "library/app:1", "--admin", at)
        assert warmed.exit_code == 0, warmed.output
        assert warmed.output.splitlines()[-1].startswith("job warm-")
        assert " done: 3/3 blobs" in warmed.output
        assert {a["config"], *a["layers"]} <= cached_blobs(m)
        job_id = warmed.output.splitlines()[0].split()[1]  # "job warm-… started"
        assert re.fullmatch(r"warm-[0-9a-f]{8}", job_id), warmed.output
        listed = await _cli("admin", "jobs", "--admin", at)
        assert listed.output.splitlines()[1].split()[:3] == [job_id, "done", "3/3"]
        failed = await _cli("admin", "warm", "nothing/here:missing", "--admin", at)
        assert failed.exit_code == 1, failed.output
        assert "nothing/here:missing: " in failed.output
        shown = await _cli("admin", "downloads", "--admin", at)
        assert shown.output.splitlines() == [
            "UPSTREAM  REPOSITORY  DIGEST  BYTES  DONE  RATE  READERS"
        ]
        assert b["layers"][1] in cached_blobs(m)


async def test_errors_are_one_line(mirror: MirrorFactory, fake: tuple[FakeUpstream, str]) -> None:
    _, url = fake
    async with mirror(url) as m:
        # The registry listener refuses writes without authentication.
        done = await _cli("admin", "purge", "--digest", "sha256:" + "0" * 64, "--admin", m.url)
        assert done.exit_code == 1
        assert done.output.startswith("Error: DENIED: purge, pins and warm jobs are on the admin")
        assert "Traceback" not in done.output
    done = await _cli("admin", "images", "--admin", "http://127.0.0.1:9")
    assert done.exit_code == 1 and done.output.startswith("Error: cannot reach the mirror")
    done = await _cli("admin", "purge", "--admin", "http://127.0.0.1:9")
    assert done.exit_code == 2 and "give one of IMAGE" in done.output
