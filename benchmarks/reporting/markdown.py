"""Number formats and captioned Markdown tables, shared by every page."""

from __future__ import annotations

import math

from benchmarks.reporting.sources import Run


def seconds(x: float | None) -> str:
    if x is None or math.isnan(x):
        return "n/a"
    return f"{x:.0f}" if x >= 100 else f"{x:.1f}" if x >= 10 else f"{x:.2f}"


def percent(x: float | None) -> str:
    return "–" if x is None else f"{x:.0%}"


def table(header: list[str], rows: list[list[str]]) -> list[str]:
    line = lambda cells: "| " + " | ".join(cell.replace("|", "\\|") for cell in cells) + " |"  # noqa: E731
    return [line(header), "|" + "---|" * len(header)] + [line(r) for r in rows]


def captioned(title: str, run: Run | list[Run], header: list[str], rows: list[list[str]]) -> list[str]:
    """A table under its caption line, which names the commands (and commits) that reproduce the whole table."""
    runs = run if isinstance(run, list) else [run]
    return [f"{title}, from {', and '.join(r.provenance() for r in runs)}:", ""] + table(header, rows) + [""]
