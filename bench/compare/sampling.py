"""What the machine and its processes did, from /proc, and the statistics over samples."""

from __future__ import annotations

import contextlib
import os
import statistics
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType

from . import GB, MiB


def proc_cpu(pid: int) -> float:
    """User + system CPU seconds of a running process, from /proc (10 ms resolution)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def children(pid: int) -> list[int]:
    """The live child processes of `pid`, from /proc/PID/task/*/children."""
    out: list[int] = []
    with contextlib.suppress(OSError):
        for task in Path(f"/proc/{pid}/task").iterdir():
            with contextlib.suppress(OSError):
                out += [int(c) for c in (task / "children").read_text().split()]
    return out


def tree_cpu(pid: int) -> float:
    """CPU seconds of a process and all its live descendants, plus the children it reaped.

    nginx's master and its workers, or a mirror's worker processes, count as one server.
    """
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    # utime, stime, cutime, cstime: fields 14-17 of proc(5), [11:15] after the name.
    own = sum(int(f) for f in fields[11:15]) / os.sysconf("SC_CLK_TCK")
    return own + sum(tree_cpu(child) for child in children(pid))


def tree_io_read(pid: int) -> int:
    """Bytes a process and its live descendants made the block layer read (/proc/PID/io)."""
    own = 0
    with contextlib.suppress(OSError):
        for line in Path(f"/proc/{pid}/io").read_text().splitlines():
            if line.startswith("read_bytes:"):
                own = int(line.split()[1])
    return own + sum(tree_io_read(child) for child in children(pid))


def cpu_times() -> tuple[float, float]:
    """(busy, total) jiffies of all CPUs together, from /proc/stat."""
    values = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = values[3] + values[4]  # idle + iowait
    total = sum(values[:8])  # guest time is already counted in user
    return total - idle, total


def kib_field(path: str, key: str) -> int:
    """A `Key:   123 kB` line of /proc/meminfo or /proc/PID/status; 0 if it is gone."""
    with contextlib.suppress(OSError):
        for line in Path(path).read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1])
    return 0


def rss_mib(pid: int) -> float:
    return kib_field(f"/proc/{pid}/status", "VmRSS") / 1024


class PeakRss:
    """Peak resident set of one process over a `with` block, in MiB.

    VmHWM is reset at the start (`clear_refs` 5) and read at the end; a 10 ms VmRSS
    sampler backs it up in case the reset is not permitted.
    """

    def __init__(self, pid: int, interval: float = 0.01) -> None:
        self.pid = pid
        self.interval = interval
        self.peak_kib = 0
        self._status = f"/proc/{pid}/status"
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, name="rss-sampler", daemon=True)

    def _sample(self) -> None:
        while not self._stop.wait(self.interval):
            self.peak_kib = max(self.peak_kib, kib_field(self._status, "VmRSS"))

    def __enter__(self) -> PeakRss:
        with contextlib.suppress(OSError):
            Path(f"/proc/{self.pid}/clear_refs").write_text("5")
        self.peak_kib = kib_field(self._status, "VmRSS")
        self._thread.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._stop.set()
        self._thread.join(5)
        self.peak_kib = max(self.peak_kib, kib_field(self._status, "VmHWM"))

    @property
    def mib(self) -> float:
        return self.peak_kib / 1024


def pct(values: Sequence[float], q: float) -> float:
    """The q-th percentile (0..100), nearest rank; NaN for no values."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    rank = max(1, min(len(ordered), round(q / 100 * len(ordered) + 0.5)))
    return ordered[rank - 1]


def median(values: Sequence[float]) -> float:
    return statistics.median(values) if values else float("nan")


def disk_write_rate(directory: Path, size: int = 256 * MiB) -> float:
    """GB/s of writing `size` bytes to a new file there and fsyncing it."""
    path = directory / "disk-probe"
    block = os.urandom(4 * MiB)
    started = time.monotonic()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        for _ in range(size // len(block)):
            os.write(fd, block)
        os.fsync(fd)
    finally:
        os.close(fd)
    seconds = time.monotonic() - started
    path.unlink()
    return size / seconds / GB
