"""Result tables: one row per metric, the servers side by side, as Markdown."""

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
    nginx: float | None = None

    def _show(self, value: float | None) -> str:
        return "\u2013" if value is None or value != value else self.fmt.format(value)

    def _ratio(self, base: float | None) -> str:
        if self.ratio and base and self.ours is not None and self.ours == self.ours:
            return f"{self.ours / base:.2f}\u00d7"
        return "\u2013"

    def cells(self, with_nginx: bool = False) -> list[str]:
        if with_nginx:
            return [
                self.metric,
                self._show(self.ref),
                self._show(self.nginx),
                self._show(self.ours),
                self._ratio(self.ref),
                self._ratio(self.nginx),
                self.target,
            ]
        return [
            self.metric,
            self._show(self.ref),
            self._show(self.ours),
            self._ratio(self.ref),
            self.target,
        ]


NGINX_COLUMNS = (
    "metric",
    "Distribution proxy",
    "nginx proxy_cache",
    "ours",
    "ours / ref",
    "ours / nginx",
    "target",
)


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
        """The table; with an nginx column when any of its rows has an nginx figure."""
        with_nginx = any(r.nginx is not None for r in self.rows)
        columns = NGINX_COLUMNS if with_nginx else self.columns
        out = [f"### {self.title}", ""]
        align = ["---"] + ["---:"] * (len(columns) - 2) + ["---"]
        out += ["| " + " | ".join(columns) + " |", "|" + "|".join(align) + "|"]
        out += ["| " + " | ".join(r.cells(with_nginx)) + " |" for r in self.rows]
        if self.notes:
            out.append("")
            out += [wrap(note, bullet=True) for note in self.notes]
        return "\n".join(out)
