"""The goals of issue 18, as ratios measured in one run, from the tables of that run."""

from __future__ import annotations

import operator
from collections.abc import Callable
from dataclasses import dataclass

from . import disk, workers
from .runner import Bench

_OPS: dict[str, Callable[[float, float], bool]] = {
    "\u2264": operator.le,
    "\u2265": operator.ge,
    "<": operator.lt,
    ">": operator.gt,
}


@dataclass
class Goal:
    measure: str
    op: str  # one of _OPS
    threshold: float
    unit: str  # the multiplication sign for a ratio, else the value's unit
    value: float | None  # None: not measured in this run (`na` says why)
    detail: str = ""  # the figures the value comes from
    na: str = "n/a"

    @property
    def goal(self) -> str:
        if self.unit == "\u00d7":
            return f"{self.op} {self.threshold:.1f}\u00d7"
        number = f"{self.threshold:.1f}" if self.threshold < 10 else f"{self.threshold:g}"
        return f"{self.op} {number} {self.unit}"

    @property
    def met(self) -> bool | None:
        if self.value is None or self.value != self.value:
            return None
        return _OPS[self.op](self.value, self.threshold)

    def measured(self) -> str:
        if self.met is None:
            return self.na
        unit = self.unit if self.unit == "\u00d7" else f" {self.unit}"
        text = {"MiB": "{:.0f}", "ms": "{:.1f}"}.get(self.unit, "{:.2f}").format(self.value)
        text += unit
        return f"{text} ({self.detail})" if self.detail else text

    def cells(self) -> list[str]:
        met = {None: "\u2013", True: "yes", False: "**no**"}[self.met]
        return [self.measure, self.goal, self.measured(), met]


def goals(bench: Bench) -> list[Goal]:
    """Every goal of the issue, measured or marked n/a; never raises for a missing step."""
    nw, nc, ns = bench.args.warm_clients, bench.args.cold_clients, bench.args.rss_streams

    def cell(key: str, metric: str, column: str) -> float | None:
        if not bench.has_table(key):
            return None
        try:
            value: float | None = getattr(bench.table(key).row(metric), column)
        except StopIteration:
            return None
        return value

    def ratio(
        measure: str, op: str, goal: float, key: str, metric: str, base: str, unit: str
    ) -> Goal:
        ours, other = cell(key, metric, "ours"), cell(key, metric, base)
        if ours is None or not other:
            return Goal(measure, op, goal, "\u00d7", None)
        name = "nginx" if base == "nginx" else "Distribution"
        detail = f"ours {ours:.2f}, {name} {other:.2f} {unit}"
        return Goal(measure, op, goal, "\u00d7", ours / other, detail)

    out = [
        ratio(
            f"warm hit CPU-s/GB, {n} client{'s' * (n > 1)} counting bytes: ours / nginx (1 worker)",
            "\u2264",
            1.3,
            "warm_bare",
            f"mirror CPU s/GB, {n} client{'s' * (n > 1)}",
            "nginx",
            "CPU-s/GB",
        )
        for n in (1, nw)
    ]
    out += [
        ratio(
            f"warm throughput, {n} client{'s' * (n > 1)} counting bytes: ours / Distribution",
            "\u2265",
            1.5,
            "warm_bare",
            f"GB/s, {n} client{'s' * (n > 1)}",
            "ref",
            "GB/s",
        )
        for n in (1, nw)
    ]
    fill = cell("cold1_bare", "mirror CPU s/GB, cache fill included", "ours")
    out.append(
        Goal(
            "cold miss, 1 client: CPU-s/GB of the mirror process, verifying, cache fill included",
            "\u2264",
            1.0,
            "CPU-s/GB",
            fill,
        )
    )
    out.append(
        ratio(
            "cold miss, 1 client counting bytes: throughput, ours / Distribution",
            "\u2265",
            1.0,
            "cold1_bare",
            "GB/s (median)",
            "ref",
            "GB/s",
        )
    )
    out.append(
        ratio(
            f"cold miss, {nc} clients counting bytes: wall time, ours / Distribution",
            "\u2264",
            0.5,
            "cold16_bare",
            "wall time until all finish, s",
            "ref",
            "s",
        )
    )
    p99 = bench.goal_values.get(disk.KEY)
    out.append(
        Goal(
            f"manifest p99 latency while {nw} clients read distinct blobs not in the page cache",
            "<",
            50,
            "ms",
            None if disk.KEY in bench.goal_notes else p99,
            na=bench.goal_notes.get(disk.KEY, "n/a (not measured)")
            + (f"; measured {p99:.1f} ms anyway" if p99 is not None else ""),
        )
    )
    scale = bench.goal_values.get(workers.KEY)
    detail = ""
    if scale is not None:
        row = bench.table(workers.KEY).rows[0]
        detail = f"{row.ref:.2f} \u2192 {row.ours:.2f} GB/s"
    out.append(
        Goal(
            f"aggregate warm throughput, {nw} clients counting bytes: workers 2 / workers 1",
            ">",
            1.0,
            "\u00d7",
            scale,
            detail,
            na=bench.goal_notes.get(workers.KEY, "n/a (not measured)"),
        )
    )
    tags = bench.goal_values.get(workers.TAGS)
    detail = ""
    if tags is not None:
        row = bench.table(workers.KEY).rows[-1]
        detail = f"{row.ref:.0f} \u2192 {row.ours:.0f} req/s"
    out.append(
        Goal(
            "manifest by tag requests/s: workers 2 / workers 1",
            ">",
            1.0,
            "\u00d7",
            tags,
            detail,
            na=bench.goal_notes.get(workers.KEY, "n/a (not measured)"),
        )
    )
    out.append(
        Goal(
            f"peak RSS per process, {ns} concurrent {bench.blob_name()} streams (ours)",
            "\u2264",
            150,
            "MiB",
            cell("rss64", "peak RSS, MiB", "ours"),
        )
    )
    return out


def goals_table(bench: Bench) -> list[str]:
    return [
        "| measure | goal | measured | met |",
        "|---|---|---|---|",
        *["| " + " | ".join(g.cells()) + " |" for g in goals(bench)],
    ]
