"""The report of a run: printed at the end, and as the section of docs/benchmarks.md."""

from __future__ import annotations

import contextlib
import importlib.metadata
import os
import platform
from pathlib import Path

from . import REPO_ROOT
from .analysis import analysis, targets
from .goals import goals_table
from .processes import tool_output
from .runner import Bench
from .sampling import kib_field
from .tables import Row, Table, wrap

SECTION = "## Side by side with Distribution's proxy mode"
IMG_DIR = REPO_ROOT / "docs" / "img"
DOC = REPO_ROOT / "docs" / "benchmarks.md"


def machine(mirror_version: str = "") -> list[str]:
    cpu = "?"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    mem = kib_field("/proc/meminfo", "MemTotal") / (1 << 20)
    versions = ", ".join(
        f"{name} {importlib.metadata.version(name)}"
        for name in ("uvicorn", "uvloop", "httpx", "httpx-aiohttp", "aiohttp", "fastapi")
    )
    commit = tool_output(["git", "-C", str(REPO_ROOT), "rev-parse", "--short", "HEAD"])
    dirty = tool_output(["git", "-C", str(REPO_ROOT), "status", "--porcelain", "--", "mirror"])
    commit = f"the working tree at {commit}" + (" with uncommitted changes" if dirty else "")
    if mirror_version:
        commit = mirror_version
    return [
        f"{os.cpu_count()} vCPUs ({cpu}), {mem:.0f} GiB RAM, Linux {platform.release()}, "
        "loopback networking, ext4 on a virtual disk",
        f"Python {platform.python_version()}; {versions}",
        f"{tool_output(['docker-registry', '--version'])}; "
        f"{tool_output(['skopeo', '--version'])}; our mirror: {commit}",
    ]


def rss_table(bench: Bench) -> Table:
    return Table(
        "rss",
        "Peak RSS of each mirror process, per workload",
        [
            Row(f"{key}, MiB", ref, ours, fmt="{:.0f}")
            for key, (ref, ours) in bench.rss_rows.items()
        ],
        [
            "VmHWM of the mirror's process (reset with /proc/PID/clear_refs before each step) "
            "and VmRSS sampled every 10 ms; the page cache is not part of it"
        ],
    )


def targets_table(bench: Bench) -> list[str]:
    return [
        "| target | measured | met |",
        "|---|---:|---|",
        *[
            f"| {name} | {value} | {'yes' if ok else '**no**'} |"
            for name, value, ok in targets(bench)
        ],
    ]


def print_report(bench: Bench, seconds: float) -> None:
    """Everything a run found, for the terminal; `section` writes the docs' version."""
    print()
    print(
        f"# {SECTION[3:]} ({'quick' if bench.args.quick else 'full'} run, {seconds / 60:.1f} min)"
    )
    print()
    for line in machine(bench.mirror_version):
        print(line)
    print()
    print("### Goals of issue 18")
    print()
    for line in goals_table(bench):
        print(line)
    print()
    for table in [*bench.tables, rss_table(bench)]:
        print(table.markdown())
        print()
    for line in targets_table(bench):
        print(line)
    print()
    for item in analysis(bench):
        print(f"- {item}")
    print()
    for s in bench.blob_subjects:
        print(
            f"{s.title} access log: "
            + ", ".join(f"{k}: {v}" for k, v in sorted(s.statuses.items()))
        )
        for line, count in s.findings.most_common(15):
            print(f"  {count:5d} x {line}")


def section(bench: Bench, images: list[Path], seconds: float) -> str:
    a = bench.args
    setup = [
        "**Upstream:** the real Distribution registry with Docker-Hub-style token auth (the "
        "test harness's `Registry` and `TokenServer`). It holds an image whose single layer "
        f"is the {bench.blob_name()}: an uncompressed tar of seeded-random bytes "
        f"({bench.layer_size} bytes). A second image with {a.pull_layers} such layers of "
        f"{a.pull_layer_mib} MiB is the one skopeo pulls.",
        "**Reference:** the same `docker-registry` binary in proxy mode: `proxy.remoteurl` "
        "and the upstream credentials, filesystem storage, the `blobdescriptor: inmemory` "
        "cache, no client auth.",
        "**nginx:** a third reference, the practical floor for serving from the page cache: "
        "`proxy_cache` in front of the upstream, as rpardini/docker-registry-proxy does "
        "(`bench/compare/nginx.py`): cache key the URI, `proxy_cache_valid 200`, "
        "`proxy_cache_lock on` for cold misses, hits sent with `sendfile on`, one worker "
        "process (its CPU is the master's and the worker's together). It forwards every "
        "request with a bearer token the bench fetched from the token server beforehand. It "
        "runs in the blob workloads only, and verifies nothing.",
        "**Ours:** the real `mirror serve` process, with the same upstream credentials.",
        "**Counting fronts:** each mirror reaches the upstream through its own front "
        "(`bench/front.py`), a splice(2)-based HTTP/1.1 reverse proxy in its own process "
        "that records every upstream request and its body bytes. The mirrors fetch tokens "
        "from the token server directly.",
        "**Clients:** blob clients are threads in a separate process, one raw socket each. "
        "Each blob workload runs twice: with clients that hash every body with sha256 as it "
        "streams, and with clients that only count the bytes, like curl (the issue's goals "
        "are stated with those). Manifest clients (uvloop, raw HTTP/1.1) check every "
        "body's digest. Any failure is listed at the end.",
        "**Cold** means a fresh mirror process with an empty cache directory. Both mirrors "
        f"cache on the same ext4 disk, which wrote and fsynced 256 MiB at {bench.disk_gbs:.2f} "
        "GB/s at the start of this run.",
    ]
    lines = [
        SECTION,
        "",
        wrap(
            "`bench/compare/` runs our mirror, Distribution's own pull-through proxy and "
            "nginx's `proxy_cache` side by side against one upstream. Everything runs on "
            "127.0.0.1 on one machine, so clients, mirrors, fronts and the upstream share the "
            "same 2 vCPUs. Read the ratios, not the absolute numbers."
        ),
        "",
        "### Goals of issue 18",
        "",
        *goals_table(bench),
        "",
        wrap(
            "Ratios from this one run. 'Counting bytes' clients do not hash; CPU-s/GB is "
            "user + system time from /proc of all the server's processes over the bytes "
            "the clients received."
        ),
        "",
        *[wrap(item, bullet=True) for item in setup],
        "",
        "Machine and versions:",
        "",
        *[wrap(line, bullet=True) for line in machine(bench.mirror_version)],
        "",
        "Rerun:",
        "",
        "    .venv/bin/python -m bench.compare                   # full run, rewrites this section",
        "    .venv/bin/python -m bench.compare --quick           # 128 MiB smoke run, prints only",
        "    .venv/bin/python -m bench.compare --mirror-rev HEAD # our mirror as committed",
        "",
        wrap(
            f"This run: `--size-mib {a.size_mib}`, medians of {a.repeat} runs "
            f"({a.repeat_cold_many} for the {a.cold_clients}-client cold miss), "
            f"{seconds / 60:.1f} minutes. A quick run takes a few minutes."
        ),
        "",
        *[f"![{p.stem}]({p.relative_to(DOC.parent)})\n" for p in images],
        "### Targets",
        "",
        *targets_table(bench),
        "",
        "### What limits the results",
        "",
        *[wrap(item, bullet=True) for item in analysis(bench)],
        "",
    ]
    if bench.capacity is not None:
        lines += [bench.capacity.markdown(), ""]
    for table in [*bench.tables, rss_table(bench)]:
        lines += [table.markdown(), ""]
    if bench.problems:
        lines += ["### Problems seen in this run", ""]
        lines += [wrap(p, bullet=True) for p in bench.problems]
        lines.append("")
    else:
        lines += [
            wrap(
                "No problems in this run: every body's digest matched, every answer was 200, "
                "our mirror's log had no warnings or errors, and it fetched each blob from "
                "the upstream once."
            ),
            "",
        ]
    return "\n".join(lines)


def write_doc(text: str) -> None:
    doc = DOC.read_text()
    start = doc.find(SECTION)
    if start < 0:
        doc = doc.rstrip("\n") + "\n\n" + text
    else:
        nxt = doc.find("\n## ", start + len(SECTION))
        doc = doc[:start] + text + (doc[nxt + 1 :] if nxt >= 0 else "")
    DOC.write_text(doc.rstrip("\n") + "\n")
