"""The plots of the docs section: the headline results, the goals, peak RSS per workload."""

from __future__ import annotations

import os
import textwrap
from pathlib import Path

from .goals import goals
from .runner import Bench
from .tables import Row

SERIES = (
    ("Distribution proxy", "#9aa5b1", "ref"),
    ("nginx proxy_cache (1 worker)", "#f4a259", "nginx"),
    ("ours", "#2f6fde", "ours"),
)


def _label(value: float) -> str:
    if not value or value != value:
        return "\u2013"
    return f"{value:.0f}" if value >= 100 else f"{value:.3g}"


def plots(bench: Bench, out_dir: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    nw, nc = bench.args.warm_clients, bench.args.cold_clients

    def both(key: str, metric: str) -> list[tuple[str, Row]]:
        """The row with sha256-checking clients, and with clients counting bytes only."""
        return [
            ("sha256\nclients", bench.row(key, metric)),
            ("counting\nclients", bench.row(key + "_bare", metric)),
        ]

    def warm_pair(metric: str, n: int) -> list[tuple[str, Row]]:
        m = metric.format(n=f"{n} client" + "s" * (n > 1))
        return [
            (f"{n} sha256\nclient{'s' * (n > 1)}", bench.row("warm", m)),
            (f"{n} counting\nclient{'s' * (n > 1)}", bench.row("warm_bare", m)),
        ]

    panels: list[tuple[str, list[tuple[str, Row]]]] = [
        (
            "Warm hit, GB/s (higher is better)",
            warm_pair("GB/s, {n}", 1) + warm_pair("GB/s, {n}", nw),
        ),
        (
            "Warm hit, server CPU s per GB (lower is better)",
            warm_pair("mirror CPU s/GB, {n}", 1) + warm_pair("mirror CPU s/GB, {n}", nw),
        ),
        ("Cold miss, 1 client, GB/s (higher is better)", both("cold1", "GB/s (median)")),
        (
            "Cold miss, 1 client, server CPU s/GB with the cache fill (lower is better)",
            both("cold1", "mirror CPU s/GB, cache fill included"),
        ),
        (
            f"{nc} cold clients, wall time s (lower is better)",
            both("cold16", "wall time until all finish, s"),
        ),
        (
            f"{nc} cold clients, upstream bytes / blob size (lower is better)",
            both("cold16", "upstream bytes / blob size"),
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
        f"mirror vs Distribution 2.8 proxy mode and nginx: {bench.blob_name()}, "
        f"{os.cpu_count()} vCPUs, loopback"
    )
    fig, axes = plt.subplots(3, 3, figsize=(16, 13))
    for ax, (name, bars) in zip(axes.flat, panels, strict=True):
        xs = list(range(len(bars)))
        # nginx only where the panel's rows have its figures (the blob workloads).
        series = [(label, color, attr) for label, color, attr in SERIES if attr != "nginx"]
        if any(b.nginx is not None for _, b in bars):
            series = list(SERIES)
        width = 0.8 / len(series)
        for i, (label, color, attr) in enumerate(series):
            values = [getattr(b, attr) or 0.0 for _, b in bars]
            offset = (i - (len(series) - 1) / 2) * width
            rects = ax.bar([x + offset for x in xs], values, width, label=label, color=color)
            ax.bar_label(rects, labels=[_label(x) for x in values], fontsize=7, padding=2)
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
    return [main, goals_plot(bench, out_dir), rss]


def goals_plot(bench: Bench, out_dir: Path) -> Path:
    """One small panel per goal of issue 18: the measured value against its goal line."""
    import matplotlib.pyplot as plt

    items = goals(bench)
    cols = 5
    rows = -(-len(items) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 3.2 * rows))
    for ax, g in zip(axes.flat, items, strict=False):
        ax.set_title(textwrap.fill(g.measure, 34), fontsize=7)
        ax.set_xticks([])
        if g.met is None or g.value is None:
            ax.text(0.5, 0.5, textwrap.fill(g.na, 28), ha="center", va="center", fontsize=8)
            ax.set_yticks([])
            continue
        color = "#2a9d4b" if g.met else "#d33"
        # The bar on the left half, the goal's label on the right: they never overlap.
        rect = ax.bar([-0.25], [g.value], 0.4, color=color)
        ax.bar_label(rect, labels=[f"{g.value:.2f}"], fontsize=8, padding=2)
        ax.axhline(g.threshold, color="#333", linestyle="--", linewidth=1)
        ax.text(0.02, g.threshold, f"goal {g.goal}", fontsize=7, va="bottom", ha="left")
        ax.set_xlim(-0.6, 0.6)
        ax.set_ylim(0, max(g.value, g.threshold) * 1.3)
        ax.set_ylabel(g.unit, fontsize=7)
        ax.tick_params(labelsize=7)
    for ax in list(axes.flat)[len(items) :]:
        ax.axis("off")
    fig.suptitle(
        f"Goals of issue 18 in one run: {bench.blob_name()}, {os.cpu_count()} vCPUs "
        "(green: met, red: not met, dashed: the goal)",
        fontsize=11,
    )
    fig.tight_layout()
    path = out_dir / "compare-goals.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
