"""How many CPUs this process may use: what `workers: auto` resolves to.

`os.cpu_count()` is the machine's count, which is wrong in two common places: a
container with a CPU limit (Kubernetes `resources.limits.cpu` becomes the cgroup v2
`cpu.max` quota) and a process pinned with taskset/cpusets (its affinity mask). The
answer is the smaller of the two, rounded down: a 1.5-CPU limit gets 1 worker, as
a second one would only be throttled.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterable
from pathlib import Path

CGROUP_ROOT = Path("/sys/fs/cgroup")


def affinity() -> int:
    """CPUs in this process's affinity mask (all CPUs where there is no such call)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def parse_cpu_max(text: str) -> float | None:
    """`200000 100000` -> 2.0 CPUs; `max 100000` (no quota) or junk -> None."""
    fields = text.split()
    if len(fields) != 2 or fields[0] == "max":
        return None
    try:
        quota, period = int(fields[0]), int(fields[1])
    except ValueError:
        return None
    return quota / period if quota > 0 and period > 0 else None


def cgroup_quota(
    root: Path = CGROUP_ROOT, proc_cgroup: Path = Path("/proc/self/cgroup")
) -> float | None:
    """The tightest `cpu.max` quota of this process's cgroup v2 and its ancestors, in
    CPUs; None without cgroup v2 or without a quota. A limit set on a parent (a pod's
    cgroup above its container's) binds as much as one set on the cgroup itself."""
    try:
        lines = proc_cgroup.read_text(encoding="utf-8").splitlines()
    except OSError:
        return None
    # cgroup v2 is the `0::/path` line; inside a container's namespace the path is `/`.
    paths = [line[3:] for line in lines if line.startswith("0::")]
    if not paths:
        return None
    here = root / paths[0].lstrip("/")
    return _tightest(_read(d / "cpu.max") for d in (here, *here.parents) if d.is_relative_to(root))


def _read(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except OSError:
        return ""


def _tightest(texts: Iterable[str]) -> float | None:
    quotas = [q for q in map(parse_cpu_max, texts) if q is not None]
    return min(quotas) if quotas else None


def available(cpus_in_mask: int, quota: float | None) -> int:
    """Whole CPUs usable: the affinity mask, capped by the quota; at least 1."""
    usable = cpus_in_mask if quota is None else min(cpus_in_mask, math.floor(quota))
    return max(1, usable)


def available_cpus() -> int:
    return available(affinity(), cgroup_quota())
