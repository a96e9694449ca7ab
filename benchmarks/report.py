"""The benchmark pages in docs/results/: Markdown tables and PNG figures generated from the benchmark JSON.

    python benchmarks/report.py                      # docs/results/*.md and PNGs from docs/results/data/*.json
    python benchmarks/report.py runs/bench-sipit/sipit.json runs/bench-dlmi/dlmi.json --out runs/pages

Nothing is measured or typed in here: every number comes from the JSON files that benchmarks/sipit.py,
dlmi.py, robustness.py, memory.py, capture.py and precision.py write (each file's kind is read from its
shape), and every table's caption (or, in the index, every row) names the command, and the commit, that
the JSON records for the run behind it. The output depends on the JSON alone (no clock, no file times,
fixed order and number formats): `tests/test_report.py` checks that the committed pages are exactly what
this script writes from the committed JSON, so a page edited by hand, or not regenerated, fails it.
Pages, each written only when it has an input: index.md (every run), sipit.md (Table A / Figure A: SIP-It
vs brute force vs HardPrompts; per-candidate costs; ranking ablation; reference loop; low-precision
captures), dlmi.md (Table B / Figures B and C: DLMI and the output-inversion baselines; throughput; step
cost), robustness.md, memory.md, precision.md. With the default inputs and --out, also README.md's headline
tables (between its `<!-- results: ... -->` markers; see readme_block).
Figures need matplotlib (`pip install lit-inversion[report]`). Without it the pages are written all the
same (they name their PNGs) and only the PNGs are not redrawn. Each figure is also logged to TensorBoard
(--tensorboard).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the repo root importable for benchmarks.reporting
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.reporting.figures import Figures, load_pyplot
from benchmarks.reporting.kinds.budget import budget_summary
from benchmarks.reporting.methods import method_name
from benchmarks.reporting.pages import index_lines, page_lines
from benchmarks.reporting.readme import README_BEGIN, README_END, readme_block, write_block
from benchmarks.reporting.registry import KINDS, PAGES, load_sources
from benchmarks.reporting.sources import RESULTS, ROOT, Source

# What tests/test_report.py (and other callers) use from here; load_pyplot and README are looked up here at call time.
__all__ = ["README", "README_BEGIN", "README_END", "RESULTS", "ROOT", "budget_summary", "load_pyplot", "load_sources",
           "main", "method_name", "readme_block", "write_readme_block"]

README = ROOT / "README.md"


def write_readme_block(sources: list[Source]) -> None:
    """Replace README's block (markers included) with readme_block(sources)."""
    write_block(README, sources)


def main(argv: list[str] | None = None) -> list[Path]:
    """Write the pages (and, with matplotlib, the figures); return the pages written, index.md first."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("inputs", nargs="*", type=Path, default=[RESULTS / "data"],
                        help="benchmark JSON files, or folders of them (default: docs/results/data)")
    parser.add_argument("--out", type=Path, default=RESULTS, help="folder for the pages and PNGs (default: docs/results)")
    parser.add_argument("--tensorboard", type=Path, default=ROOT / "runs" / "report-tensorboard",
                        help="also log each figure to TensorBoard here (default: runs/report-tensorboard)")
    args = parser.parse_args(argv)
    sources = load_sources(args.inputs)
    args.out.mkdir(parents=True, exist_ok=True)
    plt = load_pyplot()
    if plt is None:
        print("matplotlib is not installed (pip install lit-inversion[report]): pages only, the PNGs are not redrawn",
              file=sys.stderr)
    figures = Figures(args.out, plt, args.tensorboard)
    kinds = {s.kind for s in sources}
    pages = [page for page in PAGES if any(k.page == page.file and k.name in kinds for k in KINDS)]
    written = [args.out / "index.md"]
    written[0].write_text("\n".join(index_lines(sources, pages)).rstrip("\n") + "\n")
    for page in pages:
        path = args.out / page.file
        path.write_text("\n".join(page_lines(page, sources, figures)).rstrip("\n") + "\n")
        written.append(path)
    figures.close()
    # README's block is the headline of the committed results: only from (and into) docs/results.
    if args.out.resolve() == RESULTS.resolve() and [p.resolve() for p in args.inputs] == [(RESULTS / "data").resolve()]:
        write_readme_block(sources)
    # Without matplotlib the PNGs are not redrawn, so only pages can be told stale then.
    stale = sorted(p.name for p in args.out.glob("*") if p not in written + figures.written
                   and (p.suffix == ".md" or (p.suffix == ".png" and plt is not None)))
    if stale:
        print(f"in {args.out} but not written by this run (delete them if stale): {', '.join(stale)}", file=sys.stderr)
    print(f"pages: {', '.join(p.name for p in written)} in {args.out}")
    return written


if __name__ == "__main__":
    main()
