"""Result tables: one row per metric, the two mirrors side by side, as Markdown."""

from __future__ import annotations

import textwrap
from dataclasses import dataclass, field


def wrap(text: str, bullet: bool = False) -> str:
    """Prose at the docs' 90 columns, optionally as a Markdown list item."""
    if bullet:
        return textwrap.fill(text, 90, initial_indent="- ", subsequent_indent="  ")
    return textwrap.fill(text, 90)


@dataclass
class Row:
    metric: str
    ref: float | None
    ours: float | None
    fmt: str = "{:.2f}"
    target: str = ""  # e.g. ">= 1.5x" when a target is attached to the ratio
    ratio: bool = True

    def cells(self) -> list[str]:
        def show(value: float | None) -> str:
            return "\u2013" if value is None or value != value else self.fmt.format(value)

        ratio = "\u2013"
        if self.ratio and self.ref and self.ours is not None and self.ours == self.ours:
            ratio = f"{self.ours / self.ref:.2f}\u00d7"
        return [self.metric, show(self.ref), show(self.ours), ratio, self.target]


@dataclass
class Table:
    key: str
    title: str
    rows: list[Row]
    notes: list[str] = field(default_factory=list)
    columns: tuple[str, ...] = ("metric", "Distribution proxy", "ours", "ours / ref", "target")

    def row(self, metric: str) -> Row:
        return next(r for r in self.rows if r.metric == metric)

    def markdown(self) -> str:
        out = [f"### {self.title}", ""]
        out += ["| " + " | ".join(self.columns) + " |", "|---|---:|---:|---:|---|"]
        out += ["| " + " | ".join(r.cells()) + " |" for r in self.rows]
        if self.notes:
            out.append("")
            out += [wrap(note, bullet=True) for note in self.notes]
        return "\n".join(out)
