"""Side by side: our mirror against CNCF Distribution's proxy mode and nginx's proxy_cache.

Everything runs on 127.0.0.1, on free ports, and is stopped again at the end:

- the upstream: the real Distribution registry (`docker-registry`) behind the test token
  server (Docker-Hub-style bearer tokens), holding an image with one seeded-random layer
  of `--size-mib` (an uncompressed tar, so building it costs no gzip time) and a
  multi-layer image for the skopeo workload;
- the reference: the SAME `docker-registry` binary in proxy mode (`proxy.remoteurl`, the
  upstream credentials, its own storage directory, no client auth);
- nginx: `proxy_cache` in front of the upstream with `sendfile on`, one worker, a bearer
  token fetched beforehand (bench/compare/nginx.py); in the blob workloads only;
- ours: the real `mirror serve` process (`harness.mirror.MirrorProcess`);
- a counting front per mirror (bench/front.py, its own process): a streaming HTTP/1.1
  reverse proxy between that mirror and the upstream that records every upstream
  request (method, path, status, body bytes). Tokens come from the token server directly.

Load comes from worker processes (bench/loadgen.py): blob clients hash every body with
sha256 as it streams, and again with clients that only count bytes (like curl: the goals
of issue 18 are stated with those); manifest clients check every body's digest. Peak RSS
of the mirror under test is sampled from /proc (VmRSS every 10 ms, plus VmHWM after
resetting it); CPU time is that of the server's whole process tree.
Any failure (wrong digest, bad status, error in a log, a second upstream GET of a blob in
our mirror) is collected and printed at the end, and makes the exit status 1.

From the repository root (`bench` is found through the current directory):

    .venv/bin/python -m bench.compare                    # full run; docs + plots
    .venv/bin/python -m bench.compare --quick            # smoke run, a few min; prints only
    .venv/bin/python -m bench.compare --mirror-rev HEAD  # ours from a commit, not the tree

The modules: `__main__` (flags, the order of the steps, exit status), `processes` (the
mirrors under test, worker and helper processes), `images` (the test images), `sampling`
(/proc), `runner` (the shared state and how one step is observed), `nginx` (the third
reference), the workloads `capacity`, `cold`, `warm`, `manifests`, `skopeo`, `disk`
(reads that miss the page cache), `workers`, and the output: `tables`, `goals`,
`analysis`, `report`, `plots`.

GB is 10**9 bytes; MiB and GiB are powers of two.
"""

from __future__ import annotations

import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
# The test harness, and bench/'s own modules (loadgen, front) by their top-level names:
# worker processes unpickle their functions by those names, and mypy checks bench/ with
# bench/ itself as the package base.
sys.path[:0] = [str(REPO_ROOT / "tests"), str(REPO_ROOT / "bench")]

MiB = 1 << 20
GB = 1e9
