"""`mirror serve --workers 2`: two processes behind one port, as an operator sees them.

Which worker answers a connection is the kernel's choice; the tests make it theirs by
stopping the other worker (SIGSTOP: it accepts nothing until SIGCONT), and tell the
workers apart by the `[worker N]` of each access-log line.
"""

from __future__ import annotations

import asyncio
import fcntl
import hashlib
import os
import re
import signal
import subprocess
import time
from pathlib import Path

import httpx
import pytest
from conftest import RealUpstream
from fakes.server import serve
from fakes.upstream import FakeUpstream, Fault
from harness import free_port, require_tool
from harness.mirror import MirrorProcess, skopeo_copy
from harness.prometheus import Prometheus

pytestmark = pytest.mark.e2e

BLOB_ROUTE = {"route": "/v2/{name}/blobs/{digest}", "method": "GET", "status": "200"}


def access_lines(mirror: MirrorProcess, worker: int, path: str) -> int:
    return len(
        re.findall(rf"\[worker {worker}\] mirror\.access: GET {re.escape(path)} 200", mirror.log())
    )


def wait_for_log(mirror: MirrorProcess, pattern: str, timeout: float = 20) -> re.Match[str]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = re.search(pattern, mirror.log())
        if found:
            return found
        time.sleep(0.05)
    pytest.fail(f"no log line matching {pattern!r}:\n{mirror.log_tail()}")


def wait_for_metric(mirror: MirrorProcess, name: str, value: float, **labels: str) -> None:
    deadline = time.monotonic() + 10
    while (seen := mirror.metric(name, **labels)) != value:
        assert time.monotonic() < deadline, f"{name}{labels} = {seen}, expected {value}"
        time.sleep(0.05)


def get_blob(mirror: MirrorProcess, path: str) -> tuple[int, str]:
    # A new connection per request: a kept-alive one would stay with its worker.
    r = httpx.get(mirror.url + path, timeout=20)
    return r.status_code, "sha256:" + hashlib.sha256(r.content).hexdigest()


async def test_both_workers_answer_and_metrics_count_the_whole_group(tmp_path: Path) -> None:
    upstream = FakeUpstream()
    digest = upstream.add_blob(os.urandom(300_000))
    path = f"/v2/a/blobs/{digest}"
    async with serve(upstream) as url:
        env = {"MIRROR_EVICTION_INTERVAL": "0.2"}
        with MirrorProcess(tmp_path / "m", url, workers=2, env=env) as mirror:

            def run() -> None:
                assert sorted(mirror.worker_pids()) == [1, 2]
                with mirror.only(1):
                    assert get_blob(mirror, path) == (200, digest)  # the miss
                    for _ in range(2):
                        assert get_blob(mirror, path) == (200, digest)
                with mirror.only(2):
                    for _ in range(4):
                        assert get_blob(mirror, path) == (200, digest)
                assert access_lines(mirror, 1, path) == 3
                assert access_lines(mirror, 2, path) == 4
                # Scraped twice: each scrape may be answered by either worker, and
                # both see the whole group.
                for worker in (1, 2):
                    with mirror.only(worker):
                        assert mirror.metric("mirror_http_requests_total", **BLOB_ROUTE) == 7
                        hits = mirror.metric(
                            "mirror_cache_requests_total", kind="blob", result="hit"
                        )
                        miss = mirror.metric(
                            "mirror_cache_requests_total", kind="blob", result="miss"
                        )
                        assert (hits, miss) == (6, 1)
                        assert mirror.metric("mirror_downloads_in_flight") == 0
                        # The store's collector: once, not once per worker. Worker 2
                        # learns of worker 1's commit at its next eviction round.
                        wait_for_metric(mirror, "mirror_cache_entries", 1, kind="blob")
                        assert mirror.metric("mirror_cache_size_bytes") == 300_000

            await asyncio.to_thread(run)
    assert upstream.count("GET", f"/blobs/{digest}") == 1


async def test_a_killed_worker_is_restarted_and_its_counts_stay(tmp_path: Path) -> None:
    upstream = FakeUpstream()
    digest = upstream.add_blob(os.urandom(100_000))
    path = f"/v2/a/blobs/{digest}"
    async with serve(upstream) as url:
        with MirrorProcess(tmp_path / "m", url, workers=2) as mirror:

            def run() -> None:
                with mirror.only(2) as old:
                    for _ in range(3):
                        assert get_blob(mirror, path) == (200, digest)
                os.kill(old, signal.SIGKILL)
                wait_for_log(mirror, rf"worker 2 \(pid {old}\) was killed by SIGKILL.*restarting")
                # The restarted worker's "ready" line comes after the crash's.
                wait_for_log(mirror, rf"restarting[\s\S]*worker 2 ready \(pid (?!{old}\))")
                new = mirror.worker_pids()[2]
                assert new != old
                with mirror.only(2) as pid:
                    assert pid == new
                    assert get_blob(mirror, path) == (200, digest)
                assert access_lines(mirror, 2, path) == 4
                # The dead worker's requests are still counted: no counter reset.
                assert mirror.metric("mirror_http_requests_total", **BLOB_ROUTE) == 4
                assert mirror.running  # the group itself never stopped

            await asyncio.to_thread(run)


async def test_sigterm_drains_a_blob_in_flight_and_the_group_exits_0(tmp_path: Path) -> None:
    upstream = FakeUpstream()
    data = os.urandom(8 << 20)
    digest = upstream.add_blob(data)
    upstream.faults[digest] = Fault(chunk=256 * 1024, delay=0.06)  # ~2 s of body
    async with serve(upstream) as url:
        mirror = MirrorProcess(
            tmp_path / "m", url, workers=2, env={"MIRROR_SHUTDOWN_TIMEOUT": "20"}
        )
        await asyncio.to_thread(mirror.start)
        try:
            received = 0
            first_bytes = asyncio.Event()
            loop = asyncio.get_running_loop()

            def pull() -> tuple[int, str]:
                nonlocal received
                h = hashlib.sha256()
                with httpx.stream("GET", f"{mirror.url}/v2/a/blobs/{digest}", timeout=30) as r:
                    for chunk in r.iter_raw():
                        h.update(chunk)
                        received += len(chunk)
                        loop.call_soon_threadsafe(first_bytes.set)
                    return r.status_code, "sha256:" + h.hexdigest()

            client = asyncio.create_task(asyncio.to_thread(pull))
            await asyncio.wait_for(first_bytes.wait(), 10)
            assert received < len(data)  # mid-body
            code = await asyncio.to_thread(mirror.terminate, signal.SIGTERM)
            status, got = await client
        finally:
            await asyncio.to_thread(mirror.stop)
    assert code == 0, mirror.log()
    assert (status, got) == (200, digest)
    log = mirror.log()
    assert "SIGTERM: stopping 2 workers" in log
    assert "all workers stopped" in log and "exit codes" not in log
    assert "restarting" not in log  # a stop is not a crash
    assert not any((mirror.cache_dir / "tmp").iterdir())


def test_workers_from_a_config_file(tmp_path: Path) -> None:
    # The settings of a --config file travel to the workers too (they are pickled).
    config = tmp_path / "mirror.yaml"
    config.write_text("workers: 2\nlog_format: json\n")
    env = {"MIRROR_CONFIG": str(config)}
    with MirrorProcess(tmp_path / "m", "http://127.0.0.1:1", env=env) as mirror:
        wait_for_log(mirror, r"worker 2 ready")
        assert sorted(mirror.worker_pids()) == [1, 2]
        assert httpx.get(mirror.url + "/v2/", timeout=10).status_code == 200
        code = mirror.terminate()
    assert code == 0, mirror.log_tail()
    assert '"worker": 2' in mirror.log()


async def test_sigterm_during_start_up_stops_the_group_with_0(tmp_path: Path) -> None:
    # Started by hand: the signal comes before the group is ready, which start() awaits.
    mirror = MirrorProcess(tmp_path / "m", "http://127.0.0.1:1", workers=2)
    with (tmp_path / "log").open("wb") as log:
        proc = subprocess.Popen(
            mirror.command(), stdout=log, stderr=subprocess.STDOUT, env=mirror.environment()
        )
    try:
        deadline = time.monotonic() + 20
        while "starting 2 workers" not in (tmp_path / "log").read_text():
            assert time.monotonic() < deadline and proc.poll() is None
            await asyncio.sleep(0.02)
        proc.send_signal(signal.SIGTERM)
        code = await asyncio.to_thread(proc.wait, 30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert code == 0, (tmp_path / "log").read_text()


def test_skopeo_copy_through_two_workers_and_prometheus_sees_the_group(
    real_upstream: RealUpstream, tmp_path: Path
) -> None:
    require_tool("prometheus")
    image = real_upstream.images["oci"]
    admin = f"127.0.0.1:{free_port()}"
    with (
        MirrorProcess(
            tmp_path / "m",
            real_upstream.registry.url,
            workers=2,
            env={"MIRROR_ADMIN_LISTEN": admin},
        ) as mirror,
        Prometheus(tmp_path / "prom", [admin]) as prom,
    ):
        # The cold pull through worker 1, the warm one through worker 2.
        for worker, round_ in ((1, "cold"), (2, "warm")):
            with mirror.only(worker):
                result = skopeo_copy(
                    f"docker://{mirror.host}/{image.repo}:{image.tag}",
                    f"oci:{tmp_path / round_}:x",
                )
            assert result.returncode == 0, result.stderr
        blob_get = r"\[worker {}\] mirror\.access: GET /v2/\S+/blobs/\S+ 200"
        served = [len(re.findall(blob_get.format(w), mirror.log())) for w in (1, 2)]
        assert min(served) > 0, served
        total = sum(served)
        # Prometheus scrapes the admin listener (either worker answers) and sees every
        # blob request of the group: as many as the access log of both workers.
        expr = 'sum(mirror_http_requests_total{route="/v2/{name}/blobs/{digest}"})'
        deadline = time.monotonic() + 30
        seen = 0.0
        while time.monotonic() < deadline:
            found = prom.query(expr)["result"]
            seen = float(found[0]["value"][1]) if found else 0.0
            if seen == total:
                break
            time.sleep(0.25)
        assert seen == total
        up = prom.query('up{job="mirror"}')["result"]
        assert [float(s["value"][1]) for s in up] == [1.0]


def _another_process_would_be_alone(cache_dir: Path) -> bool:
    """What a new `mirror serve` on the same cache directory would conclude at its
    recovery: that nobody else serves from it (and remove their downloads)."""
    fd = os.open(cache_dir / "locks" / "serving.lock", os.O_RDWR | os.O_CREAT)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    finally:
        os.close(fd)
    return True


async def test_after_worker_1_restarts_the_group_still_marks_the_cache_as_in_use(
    tmp_path: Path,
) -> None:
    upstream = FakeUpstream()
    async with serve(upstream) as url:
        with MirrorProcess(tmp_path / "m", url, workers=2) as mirror:

            def run() -> None:
                assert not _another_process_would_be_alone(mirror.cache_dir)
                old = mirror.worker_pids()[1]
                os.kill(old, signal.SIGKILL)  # the worker that recovered the cache first
                wait_for_log(mirror, rf"restarting[\s\S]*worker 1 ready \(pid (?!{old}\))")
                assert not _another_process_would_be_alone(mirror.cache_dir)

            await asyncio.to_thread(run)
