"""A real client's full pull: `skopeo copy` of the multi-layer image, cold and then warm."""

from __future__ import annotations

import hashlib
import json
import shutil
import time
from pathlib import Path
from typing import Any

from harness.mirror import skopeo_copy

from . import MiB
from .processes import OURS, REF
from .runner import Bench, Obs, each, peak_rss
from .sampling import median
from .tables import Row, Table

MODES = ("cold", "warm")


def skopeo(bench: Bench) -> None:
    bench.log("workload 5: skopeo pull of the multi-layer image")
    times: dict[str, dict[str, list[float]]] = {k: {m: [] for m in MODES} for k in (REF, OURS)}
    reqs: dict[str, dict[str, list[int]]] = {k: {m: [] for m in MODES} for k in (REF, OURS)}
    pulls: dict[str, list[Obs[Any]]] = {REF: [], OURS: []}
    for i in range(bench.args.repeat):
        for s in bench.subjects:
            s.fresh()
            for mode in MODES:
                dest = bench.work / "pulled"
                shutil.rmtree(dest, ignore_errors=True)
                ref = f"docker://{s.host}/{bench.multi.repo}:{bench.multi.tag}"

                def step(ref: str = ref, dest: Path = dest) -> tuple[float, str]:
                    started = time.monotonic()
                    # Without the flag skopeo gzips uncompressed layers on the way into
                    # an oci: layout, and the pull would time gzip, not the mirror.
                    result = skopeo_copy(
                        ref, f"oci:{dest}:x", extra=["--dest-oci-accept-uncompressed-layers"]
                    )
                    seconds = time.monotonic() - started
                    return seconds, "" if result.returncode == 0 else result.stderr

                obs = bench.observe(s, step)
                seconds, error = obs.result
                if error:
                    bench.problem(f"skopeo {mode} via {s.label}: {error.strip()[-500:]}")
                else:
                    verify_layout(bench, dest, f"skopeo {mode} via {s.label}")
                shutil.rmtree(dest, ignore_errors=True)
                times[s.label][mode].append(seconds)
                reqs[s.label][mode].append(len(obs.upstream))
                pulls[s.label].append(obs)
                if (
                    mode == "warm"
                    and s.label == OURS
                    and any("/blobs/" in r.path for r in obs.upstream)
                ):
                    bench.problem("skopeo warm via ours fetched blobs upstream")
            bench.log(
                f"  {s.label} #{i + 1}: cold {times[s.label]['cold'][-1]:.2f} s, "
                f"warm {times[s.label]['warm'][-1]:.2f} s"
            )

    def med(by: dict[str, dict[str, list[Any]]], mode: str) -> tuple[float, float]:
        return each(by, lambda by_mode: median(by_mode[mode]))

    bench.tables.append(
        Table(
            "skopeo",
            f"Full pull with skopeo: "
            f"{bench.args.pull_layers} layers, "
            f"{bench.multi_size / MiB:.0f} MiB",
            [
                Row("cold pull, s", *med(times, "cold")),
                Row("warm pull, s", *med(times, "warm")),
                Row("upstream requests, cold", *med(reqs, "cold"), fmt="{:.0f}", ratio=False),
                Row("upstream requests, warm", *med(reqs, "warm"), fmt="{:.0f}", ratio=False),
                Row("peak RSS, MiB", *peak_rss(pulls), fmt="{:.0f}"),
            ],
            [
                "`skopeo copy` to a fresh `oci:` directory; median of "
                f"{bench.args.repeat} runs, "
                "each cold pull on a fresh mirror, the warm pull right after it; every blob in "
                "the result re-hashed"
            ],
        )
    )
    bench.note_rss("skopeo pulls", pulls)


def verify_layout(bench: Bench, dest: Path, what: str) -> None:
    index = json.loads((dest / "index.json").read_text())
    if index["manifests"][0]["digest"] != bench.multi.digest:
        bench.problem(f"{what}: pulled {index['manifests'][0]['digest']}")
    for blob in (dest / "blobs" / "sha256").iterdir():
        hasher = hashlib.sha256()
        with blob.open("rb") as f:
            while chunk := f.read(4 * MiB):
                hasher.update(chunk)
        if hasher.hexdigest() != blob.name:
            bench.problem(f"{what}: blob {blob.name[:12]} has the wrong sha256")
