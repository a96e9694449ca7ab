"""What the registry holds: the pages, and each kind of benchmark JSON with its section of a page."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from benchmarks.reporting.figures import Figures
from benchmarks.reporting.sources import Source

Section = Callable[[list[Source], Figures], list[str]]


@dataclass(frozen=True)
class Page:
    """One page of docs/results/, listed in index.md."""

    file: str  # e.g. "dlmi.md"
    title: str
    what: str  # what it holds, for the index


@dataclass(frozen=True)
class Kind:
    """One kind of benchmark JSON: how to tell it, which script writes it, and its section of its page."""

    name: str  # Source.kind, e.g. "dlmi-budget"
    page: str  # the Page.file it is on
    writer: str  # the script (and flags) under benchmarks/ that writes it
    recognise: Callable[[dict], bool]  # on the whole JSON
    section: Section  # every source of this kind (at least one), in the order they were read


def rows_with(*keys: str) -> Callable[[dict], bool]:
    """Recognise a JSON whose first row has all these fields."""
    def recognise(data: dict) -> bool:
        return set(keys) <= (data.get("rows") or [{}])[0].keys()

    return recognise


def per_source(render: Callable[[Source, Figures], list[str]]) -> Section:
    """A section that is each source's own lines in turn."""
    def section(sources: list[Source], figures: Figures) -> list[str]:
        return [line for source in sources for line in render(source, figures)]

    return section
