"""The two plots of the docs section: the headline results, and peak RSS per workload."""

from __future__ import annotations

import os
from pathlib import Path

from .analysis import warm_metrics
from .runner import Bench
from .tables import Row


def _label(value: float) -> str:
    if not value or value != value:
        return "\u2013"
    return f"{value:.0f}" if value >= 100 else f"{value:.3g}"


def plots(bench: Bench, out_dir: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    warm1, warmn = warm_metrics(bench)
    nw, nc = bench.args.warm_clients, bench.args.cold_clients
    panels: list[tuple[str, list[tuple[str, Row]]]] = [
        (
            "Blob throughput, GB/s (higher is better)",
            [
                ("warm\n1 client", bench.row("warm", warm1)),
                (f"warm\n{nw} clients", bench.row("warm", warmn)),
                ("cold\n1 client", bench.row("cold1", "GB/s (median)")),
            ],
        ),
        (
            "Mirror CPU s per GB served (lower is better)",
            [
                ("warm\n1 client", bench.row("warm", "mirror CPU s/GB, 1 client")),
                (f"warm\n{nw} clients", bench.row("warm", f"mirror CPU s/GB, {nw} clients")),
                ("cold\n1 client", bench.row("cold1", "mirror CPU s/GB, cache fill included")),
            ],
        ),
        (
            f"{nc} cold clients (lower is better)",
            [
                ("wall time, s", bench.row("cold16", "wall time until all finish, s")),
                ("upstream bytes\n/ blob size", bench.row("cold16", "upstream bytes / blob size")),
            ],
        ),
        (
            f"Manifest by tag, req/s, {bench.args.manifest_conns} conns (higher is better)",
            [("requests/s", bench.row("tag", "requests/s"))],
        ),
        (
            "Latency, ms (lower is better)",
            [
                ("by tag, p99\n(closed loop)", bench.row("tag", "p99 latency, ms")),
                (
                    f"by digest, p99\nduring {nc} cold\ndownloads",
                    bench.row("latency", "p99 latency under load, ms"),
                ),
            ],
        ),
        (
            "skopeo pull, s (lower is better)",
            [
                ("cold", bench.row("skopeo", "cold pull, s")),
                ("warm", bench.row("skopeo", "warm pull, s")),
            ],
        ),
    ]
    out_dir.mkdir(parents=True, exist_ok=True)
    title = (
        f"mirror vs Distribution 2.8 proxy mode: {bench.blob_name()}, "
        f"{os.cpu_count()} vCPUs, loopback"
    )
    fig, axes = plt.subplots(2, 3, figsize=(16, 9))
    for ax, (name, bars) in zip(axes.flat, panels, strict=True):
        xs = list(range(len(bars)))
        width = 0.38
        refs = [b.ref if b.ref is not None else 0.0 for _, b in bars]
        ours = [b.ours if b.ours is not None else 0.0 for _, b in bars]
        r1 = ax.bar(
            [x - width / 2 for x in xs], refs, width, label="Distribution proxy", color="#9aa5b1"
        )
        r2 = ax.bar([x + width / 2 for x in xs], ours, width, label="ours", color="#2f6fde")
        for rects, values in ((r1, refs), (r2, ours)):
            ax.bar_label(rects, labels=[_label(x) for x in values], fontsize=8, padding=2)
        ax.set_xticks(xs, [label for label, _ in bars], fontsize=8)
        ax.set_title(name, fontsize=10)
        ax.margins(y=0.15)
    axes.flat[0].legend(fontsize=8)
    fig.suptitle(title, fontsize=12)
    fig.tight_layout()
    main = out_dir / "compare.png"
    fig.savefig(main, dpi=110)
    plt.close(fig)

    keys = list(bench.rss_rows)
    fig, ax = plt.subplots(figsize=(10, 0.5 * len(keys) + 1.5))
    ys = list(range(len(keys)))
    height = 0.38
    refs = [bench.rss_rows[k][0] or 0.0 for k in keys]
    ours = [bench.rss_rows[k][1] or 0.0 for k in keys]
    r1 = ax.barh(
        [y - height / 2 for y in ys], refs, height, label="Distribution proxy", color="#9aa5b1"
    )
    r2 = ax.barh([y + height / 2 for y in ys], ours, height, label="ours", color="#2f6fde")
    for rects, values in ((r1, refs), (r2, ours)):
        ax.bar_label(rects, labels=[_label(x) for x in values], fontsize=8, padding=2)
    ax.axvline(150, color="#d33", linestyle="--", linewidth=1, label="target for ours: 150 MiB")
    ax.set_yticks(ys, keys, fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel("peak RSS of the mirror process, MiB (lower is better)")
    ax.margins(x=0.12)
    ax.legend(fontsize=8, loc="lower right")
    ax.set_title(title, fontsize=10)
    fig.tight_layout()
    rss = out_dir / "compare-rss.png"
    fig.savefig(rss, dpi=110)
    plt.close(fig)
    return [main, rss]
