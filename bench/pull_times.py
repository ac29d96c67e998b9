"""Wall time of a full `skopeo copy`: straight from the upstream registry, and through the
mirror cold (fresh cache) and warm (same mirror, second pull).

The upstream is the test harness's real Distribution registry behind its token server,
holding the multi-layer OCI test image (~2 MiB) plus one extra image with a single
seeded-random layer (256 MiB by default). Each pull goes to a fresh `oci:` layout whose
index digest is checked, then deleted. CPU time of skopeo, the registry and the mirror is
recorded per pull, and the mirror's log is scanned for warnings, errors and 4xx/5xx.
Repeats are interleaved (direct, cold, warm, ...), and every cold pull gets a new mirror
process with an empty cache directory.

    .venv/bin/python bench/pull_times.py [--repeat 3] [--big-mib 256] [--mirror-env K=V]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import resource
import shutil
import statistics
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT / "tests"))

# mypy finds the harness through mypy_path = tests (pyproject.toml).
from harness import (  # noqa: E402
    Layout,
    Registry,
    TestImage,
    TokenServer,
    build_and_push_test_images,
    push,
)
from harness.images import read_back, seeded_bytes  # noqa: E402
from harness.mirror import MirrorProcess, skopeo_copy  # noqa: E402

MODES = ("direct", "mirror cold", "mirror warm")
# uvicorn's access log: `... "GET /v2/... HTTP/1.1" 200` (the reason phrase may follow).
_ACCESS = re.compile(r'"(?P<method>[A-Z]+) (?P<path>\S+) HTTP/[\d.]+" (?P<status>\d{3})')
_ACCESS_PEER = re.compile(r"127\.0\.0\.1:\d+ - ")
_TROUBLE = re.compile(r"\b(WARNING|ERROR|CRITICAL)\b|Traceback|Exception")
_TIMESTAMP = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d+ ")
# skopeo with --src-tls-verify=false tries HTTPS first; the plain-HTTP server sees a
# TLS ClientHello and uvicorn logs this, then skopeo falls back to HTTP.
_KNOWN = {"WARNING:  Invalid HTTP request received.": "skopeo's HTTPS probe before HTTP"}


@dataclass
class Run:
    seconds: float
    skopeo_cpu: float
    registry_cpu: float
    mirror_cpu: float
    upstream_blob_gets: int
    upstream_manifest_reqs: int


@dataclass
class Target:
    label: str
    image: TestImage
    size: int
    runs: dict[str, list[Run]] = field(default_factory=lambda: {m: [] for m in MODES})


def _image_size(image: TestImage) -> int:
    manifest = json.loads(image.manifest)
    return int(manifest["config"]["size"]) + sum(int(la["size"]) for la in manifest["layers"])


def _build_big(workdir: Path, registry: Registry, mib: int) -> TestImage:
    layout = Layout(workdir / "big-layout")
    started = time.perf_counter()
    # randbytes() overflows at 256 MiB (2**31 bits), so the payload is built in pieces.
    piece = 32 << 20
    payload = b"".join(
        seeded_bytes(f"bench-big-{i}", min(piece, (mib << 20) - start))
        for i, start in enumerate(range(0, mib << 20, piece))
    )
    descriptor = layout.image([[("opt/big/payload.bin", payload)]])
    del payload
    layout.tag(descriptor, "big")
    repo, tag = "bench/big", "1.0"
    digest = push(layout.root, "big", registry, repo, tag)
    if digest != descriptor["digest"]:
        raise RuntimeError(f"big image: pushed {digest}, layout has {descriptor['digest']}")
    shutil.rmtree(layout.root)  # the registry holds it now
    print(f"built and pushed the {mib} MiB image in {time.perf_counter() - started:.1f}s")
    return read_back(registry, repo, tag, digest)


def _cpu(pid: int | None) -> float:
    """User + system CPU seconds of a running process, from /proc (10 ms resolution)."""
    if pid is None:
        return 0.0
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def _pull(
    src_host: str,
    image: TestImage,
    dest: Path,
    registry: Registry,
    mirror: MirrorProcess | None = None,
) -> Run:
    # The harness keeps its processes private; their pids give per-pull CPU time.
    registry_pid = registry._proc.pid if registry._proc else None
    mirror_pid = mirror._proc.pid if mirror and mirror._proc else None
    registry.clear_log()
    before = (_children_cpu(), _cpu(registry_pid), _cpu(mirror_pid))
    started = time.perf_counter()
    result = skopeo_copy(f"docker://{src_host}/{image.repo}:{image.tag}", f"oci:{dest}:x")
    seconds = time.perf_counter() - started
    # skopeo has been waited for, so RUSAGE_CHILDREN now includes it (and only it).
    skopeo_cpu = _children_cpu() - before[0]
    registry_cpu = _cpu(registry_pid) - before[1]
    mirror_cpu = _cpu(mirror_pid) - before[2]
    if result.returncode != 0:
        raise RuntimeError(f"skopeo copy from {src_host} failed:\n{result.stderr}")
    index = json.loads((dest / "index.json").read_text())
    if index["manifests"][0]["digest"] != image.digest:
        raise RuntimeError(f"pulled {index['manifests'][0]['digest']}, expected {image.digest}")
    shutil.rmtree(dest)
    time.sleep(0.3)  # Distribution writes its access log line after the response
    requests = registry.requests()
    blob_gets = [r for r in requests if r.method == "GET" and "/blobs/" in r.path]
    manifests = [r for r in requests if "/manifests/" in r.path]
    return Run(seconds, skopeo_cpu, registry_cpu, mirror_cpu, len(blob_gets), len(manifests))


def _scan_log(text: str, statuses: Counter[str], trouble: Counter[str]) -> None:
    for line in text.splitlines():
        match = _ACCESS.search(line)
        if match:
            statuses[f"{match['method']} {match['status']}"] += 1
            if int(match["status"]) >= 400:
                trouble[_ACCESS_PEER.sub("", line.strip())] += 1
        elif _TROUBLE.search(line):
            trouble[_TIMESTAMP.sub("", line.strip())] += 1


def _fmt_size(size: int) -> str:
    return f"{size / (1 << 20):.1f} MiB"


def _report(targets: list[Target], repeat: int, mirror_env: dict[str, str]) -> None:
    print()
    print(f"skopeo copy to a fresh oci: layout; medians of {repeat} runs")
    if mirror_env:
        print("mirror environment: " + " ".join(f"{k}={v}" for k, v in mirror_env.items()))
    print("CPU s = user + system seconds during the pull (skopeo / registry / mirror)")
    print()
    header = ("image", "size", "path", "wall s", "min-max s", "vs direct", "CPU s", "upstream")
    print("| " + " | ".join(header) + " |")
    print("|---|---:|---|---:|---:|---:|---:|---|")
    for target in targets:
        direct = statistics.median(r.seconds for r in target.runs["direct"])
        for mode in MODES:
            runs = target.runs[mode]
            times = [r.seconds for r in runs]
            median = statistics.median(times)
            cpu = " / ".join(
                f"{statistics.median(getattr(r, f) for r in runs):.2f}"
                for f in ("skopeo_cpu", "registry_cpu", "mirror_cpu")
            )
            gets = sorted(
                {f"{r.upstream_manifest_reqs} manifest, {r.upstream_blob_gets} blob" for r in runs}
            )
            print(
                f"| {target.label} | {_fmt_size(target.size)} | {mode} | {median:.3f} "
                f"| {min(times):.3f}-{max(times):.3f} | {median / direct:.2f}\u00d7 "
                f"| {cpu} | {' / '.join(gets)} |"
            )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--repeat", type=int, default=3, help="runs per image and path")
    parser.add_argument("--big-mib", type=int, default=256, help="size of the big layer (MiB)")
    parser.add_argument(
        "--mirror-env",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="extra environment for the mirror process (repeatable)",
    )
    args = parser.parse_args()
    mirror_env = dict(item.split("=", 1) for item in args.mirror_env)
    for tool in ("skopeo", "docker-registry"):
        if shutil.which(tool) is None:
            sys.exit(f"{tool} is not on PATH (bash scripts/system-deps.sh)")

    statuses: Counter[str] = Counter()
    trouble: Counter[str] = Counter()
    with (
        tempfile.TemporaryDirectory(prefix="pull-times-") as tmp,
        TokenServer(Path(tmp)) as tokens,
        Registry(Path(tmp) / "registry", tokens) as registry,
    ):
        work = Path(tmp)
        oci = build_and_push_test_images(work / "images", registry)["oci"]
        big = _build_big(work, registry, args.big_mib)
        targets = [
            Target(f"oci test image ({len(oci.layer_digests) - 1} layers)", oci, _image_size(oci)),
            Target(f"big ({len(big.layer_digests) - 1} layer)", big, _image_size(big)),
        ]
        for target in targets:
            for i in range(args.repeat):
                dest = work / "pulled"
                target.runs["direct"].append(_pull(registry.host, target.image, dest, registry))
                mirror = MirrorProcess(
                    work / f"mirror-{target.image.repo.replace('/', '_')}-{i}",
                    registry.url,
                    env=mirror_env,
                )
                with mirror:
                    for mode in ("mirror cold", "mirror warm"):
                        target.runs[mode].append(
                            _pull(mirror.host, target.image, dest, registry, mirror)
                        )
                _scan_log(mirror.log(), statuses, trouble)
                shutil.rmtree(mirror.cache_dir)
                print(
                    f"{target.label} #{i + 1}: "
                    + ", ".join(f"{m} {target.runs[m][-1].seconds:.3f}s" for m in MODES),
                    flush=True,
                )
    _report(targets, args.repeat, mirror_env)
    print()
    print(
        "mirror access log, all runs: "
        + ", ".join(f"{k}: {v}" for k, v in sorted(statuses.items()))
    )
    if not trouble:
        print("mirror log: no warnings, errors or 4xx/5xx answers")
    else:
        print("mirror log lines worth a look (count x line):")
    for line, count in trouble.most_common(40):
        known = f"  <- {_KNOWN[line]}" if line in _KNOWN else ""
        print(f"  {count:4d} x {line[:200]}{known}")


if __name__ == "__main__":
    main()
