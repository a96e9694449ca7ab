"""The benchmark JSON files read by the report, and the runs each one records."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
RESULTS = ROOT / "docs" / "results"
NOT_SET = "not recorded"


@dataclass(frozen=True)
class Run:
    """One run of a benchmark script: what reproduces it, and where and when it ran."""

    command: str | None
    commit: str | None
    date: str
    hardware: str
    model: str

    def provenance(self) -> str:
        command = f"`{self.command}`" if self.command else f"command {NOT_SET}"
        at = f" at commit `{self.commit}`" if self.commit else ""
        return f"{command}{at} ({self.model}, {self.hardware}, {self.date})"


@dataclass
class Source:
    """One benchmark JSON file, what kind of run wrote it, and the runs behind it (several when merged)."""

    path: Path
    data: dict[str, Any]
    kind: str

    @property
    def name(self) -> str:
        """The path shown on the pages: relative to the repository, else the bare file name (never machine-specific)."""
        path = self.path.resolve()
        return path.relative_to(ROOT).as_posix() if path.is_relative_to(ROOT) else path.name

    @property
    def stem(self) -> str:
        return self.path.stem

    @property
    def rows(self) -> list[dict]:
        return self.data.get("rows", [])

    @property
    def runs(self) -> list[Run]:
        d, measured = self.data, self.data.get("measured", {})
        hardware = d.get("hardware") or measured.get("device") or NOT_SET
        model = d.get("model") or measured.get("model") or NOT_SET
        return [Run(r.get("command"), r.get("commit"), r.get("date") or d.get("date") or measured.get("date") or NOT_SET,
                    hardware, model) for r in d.get("runs") or [d]]

    def runs_behind(self, rows: list[dict]) -> list[Run]:
        """The runs that wrote these rows, in order."""
        return [run for i, run in enumerate(self.runs) if any(r.get("run", 0) == i for r in rows)]

    def rows_of(self, run: int) -> list[dict]:
        """The rows one run wrote (a merged JSON numbers its runs in each row's `run`)."""
        return [r for r in self.rows if r.get("run", 0) == run]
