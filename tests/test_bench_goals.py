"""bench/compare/: the goal table of issue 18 and the three-server result tables."""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

import pytest

# bench/ is no package: its modules import each other by top-level names (`loadgen`,
# `compare`), which is also how mypy checks them; the same names here.
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))

from compare import disk
from compare.goals import Goal, goals, goals_table
from compare.runner import Bench
from compare.sampling import children
from compare.tables import Row, Table


def test_a_goal_is_met_on_the_right_side_of_its_threshold() -> None:
    assert Goal("cpu", "\u2264", 1.3, "\u00d7", 1.3).met is True
    assert Goal("cpu", "\u2264", 1.3, "\u00d7", 1.31).met is False
    assert Goal("rate", "\u2265", 1.5, "\u00d7", 1.49).met is False
    assert Goal("p99", "<", 50, "ms", 50.0).met is False
    assert Goal("p99", "<", 50, "ms", 49.9).met is True


def test_an_unmeasured_goal_says_why_and_is_neither_met_nor_missed() -> None:
    goal = Goal("workers", ">", 1.0, "\u00d7", None, na="n/a (no workers setting)")
    assert goal.met is None
    assert goal.cells() == ["workers", "> 1.0\u00d7", "n/a (no workers setting)", "\u2013"]
    assert Goal("nan", "<", 50, "ms", float("nan")).met is None


def test_a_measured_goal_shows_its_value_and_the_figures_behind_it() -> None:
    goal = Goal("cpu", "\u2264", 1.3, "\u00d7", 1.5, "ours 0.30, nginx 0.20 CPU-s/GB")
    assert goal.cells() == [
        "cpu",
        "\u2264 1.3\u00d7",
        "1.50\u00d7 (ours 0.30, nginx 0.20 CPU-s/GB)",
        "**no**",
    ]
    assert Goal("rss", "\u2264", 150, "MiB", 134.06).cells()[1:] == [
        "\u2264 150 MiB",
        "134 MiB",
        "yes",
    ]


def test_a_goal_in_units_shows_its_threshold_with_one_decimal_below_ten() -> None:
    assert Goal("cpu", "\u2264", 1.0, "CPU-s/GB", 1.94).cells()[1:3] == [
        "\u2264 1.0 CPU-s/GB",
        "1.94 CPU-s/GB",
    ]


def _bench(tables: list[Table], notes: dict[str, str] | None = None) -> Bench:
    """A Bench with only what the goals read: its args, tables and step notes."""
    bench = object.__new__(Bench)
    bench.args = argparse.Namespace(warm_clients=8, cold_clients=16, rss_streams=64, size_mib=1024)
    bench.tables = tables
    bench.goal_notes = notes or {}
    bench.goal_values = {}
    return bench


def _measured(bench: Bench) -> dict[str, str]:
    return {g.measure: g.measured() for g in goals(bench)}


def test_goals_are_ratios_of_one_runs_tables() -> None:
    warm = Table(
        "warm_bare",
        "warm",
        [
            Row("GB/s, 1 client", 1.0, 1.6, nginx=1.8),
            Row("GB/s, 8 clients", 2.0, 2.5, nginx=2.6),
            Row("mirror CPU s/GB, 1 client", 0.4, 0.26, nginx=0.2),
            Row("mirror CPU s/GB, 8 clients", 0.4, 0.3, nginx=0.2),
        ],
    )
    cold1 = Table(
        "cold1_bare",
        "cold",
        [
            Row("GB/s (median)", 0.5, 0.6, nginx=0.7),
            Row("mirror CPU s/GB, cache fill included", 5.0, 0.9, nginx=0.3),
        ],
    )
    cold16 = Table("cold16_bare", "cold16", [Row("wall time until all finish, s", 4.0, 1.0)])
    bench = _bench([warm, cold1, cold16], {"workers": "n/a (no workers setting)"})
    by_measure = {g.measure: g for g in goals(bench)}
    cpu1 = by_measure["warm hit CPU-s/GB, 1 client counting bytes: ours / nginx (1 worker)"]
    assert cpu1.value == pytest.approx(1.3)
    assert cpu1.met is True
    cpu8 = by_measure["warm hit CPU-s/GB, 8 clients counting bytes: ours / nginx (1 worker)"]
    assert cpu8.value == pytest.approx(1.5)
    assert cpu8.met is False
    rate1 = by_measure["warm throughput, 1 client counting bytes: ours / Distribution"]
    assert rate1.value == pytest.approx(1.6)
    assert rate1.met is True
    wall = by_measure["cold miss, 16 clients counting bytes: wall time, ours / Distribution"]
    assert wall.value == pytest.approx(0.25)
    measured = _measured(bench)
    workers = "aggregate warm throughput, 8 clients counting bytes: workers 2 / workers 1"
    assert measured[workers] == "n/a (no workers setting)"
    # Steps that did not run leave their goals unmeasured; the table is still whole.
    rss = "peak RSS per process, 64 concurrent 1 GiB blob streams (ours)"
    assert measured[rss] == "n/a"
    assert len(goals_table(bench)) == 2 + len(goals(bench))


def test_the_page_cache_goal_says_when_the_cache_could_not_be_dropped() -> None:
    bench = _bench([], {disk.KEY: "n/a (not root: cannot drop the page cache)"})
    bench.goal_values[disk.KEY] = 12.0
    measured = _measured(bench)
    key = next(k for k in measured if k.startswith("manifest p99 latency"))
    assert measured[key] == "n/a (not root: cannot drop the page cache); measured 12.0 ms anyway"


def test_a_table_with_nginx_figures_gets_its_column_and_ratio() -> None:
    table = Table("t", "T", [Row("GB/s", 1.0, 2.0, nginx=4.0), Row("other", 1.0, 3.0)])
    lines = table.markdown().splitlines()
    assert lines[2] == (
        "| metric | Distribution proxy | nginx proxy_cache | ours | ours / ref | ours / nginx "
        "| target |"
    )
    assert lines[4] == "| GB/s | 1.00 | 4.00 | 2.00 | 2.00\u00d7 | 0.50\u00d7 |  |"
    assert lines[5] == "| other | 1.00 | \u2013 | 3.00 | 3.00\u00d7 | \u2013 |  |"


def test_a_table_without_nginx_figures_keeps_its_columns() -> None:
    lines = Table("t", "T", [Row("GB/s", 1.0, 2.0)]).markdown().splitlines()
    assert lines[2] == "| metric | Distribution proxy | ours | ours / ref | target |"
    assert lines[4] == "| GB/s | 1.00 | 2.00 | 2.00\u00d7 |  |"


def test_children_lists_a_servers_worker_processes() -> None:
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        assert child.pid in children(os.getpid())
    finally:
        child.kill()
        child.wait()
    assert child.pid not in children(os.getpid())
