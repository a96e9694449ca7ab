"""The one place the report's pages and kinds of benchmark JSON are listed. A new kind of result is a
module in kinds/ defining KIND (how to tell its JSON, its page and writer, its section), plus its name in
KIND_MODULES; a new page is also a line in PAGES."""

from __future__ import annotations

import json
from importlib import import_module
from pathlib import Path

from benchmarks.reporting.kind import Kind, Page
from benchmarks.reporting.sources import Source

# In index order; a page is written when a JSON of one of its kinds is given.
PAGES = (
    Page("sipit.md", "SIP-It: hidden states to prompt", "SIP-It vs brute force vs HardPrompts (PEZ), per-candidate "
         "costs, ranking ablation, low-precision captures"),
    Page("dlmi.md", "DLMI: output to prompt", "DLMI and the output-inversion baselines (GCG, GBDA, REINFORCE), "
         "budget curves, ablations, throughput, step cost"),
    Page("robustness.md", "SIP-It on noisy and rounded states", "token recovery against Gaussian noise and rounding"),
    Page("memory.md", "SIP-It's memory", "peak memory beyond the weights, measured and on paper"),
    Page("precision.md", "bf16 against float32", "what bf16 costs or gains, both methods"),
)
# Modules of kinds/, one KIND each. A JSON is the first kind here that recognises it; on a page, the
# sections follow this order.
KIND_MODULES = (
    "memory",
    "budget",
    "sipit",
    "dlmi",
    "throughput",
    "step_cost",
    "context_cache",
    "anchor",
    "universal",
    "robustness",
    "capture",
    "precision",
)
KINDS: tuple[Kind, ...] = tuple(import_module(f"benchmarks.reporting.kinds.{name}").KIND for name in KIND_MODULES)


def kind_of(data: dict, path: Path) -> str:
    """The name of the first kind in KINDS that recognises this JSON."""
    for kind in KINDS:
        if kind.recognise(data):
            return kind.name
    raise SystemExit(f"{path}: not the JSON of a benchmark script this report knows (no rows, or unknown row fields)")


def load_sources(inputs: list[Path]) -> list[Source]:
    """Every JSON named, or inside a folder named, sorted by file name within each folder."""
    files: list[Path] = []
    for path in inputs:
        files += sorted(path.glob("*.json")) if path.is_dir() else [path]
    sources = []
    for path in files:
        data = json.loads(path.read_text())
        sources.append(Source(path, data, kind_of(data, path)))
    return sources
