"""DLMI throughput by batch size (benchmarks/dlmi.py --throughput)."""

from __future__ import annotations

from benchmarks.reporting.figures import Figures
from benchmarks.reporting.kind import Kind, per_source, rows_with
from benchmarks.reporting.markdown import captioned
from benchmarks.reporting.methods import method_name
from benchmarks.reporting.sources import Source


def section_throughput(source: Source, figures: Figures) -> list[str]:
    rows = []
    for r in source.rows:
        base = next(b for b in source.rows if b["N"] == r["N"] and b["method"] == r["method"])
        rows.append([str(r["N"]), method_name(r["method"]), str(r["batch_size"]), f"{r['wall']:.1f}",
                     str(r["target_steps"]), f"{r['s_per_target_step']:.2f}",
                     f"{base['s_per_target_step'] / r['s_per_target_step']:.2f}x"])
    return ([f"## Throughput by batch size (`{source.name}`)", "",
             "The same targets through the job's pool of slots (a batch size is a number of slots, a freed slot "
             "refilled at once): seconds per target-step against the first batch size of the run.", ""]
            + captioned("Throughput", source.runs[0],
                        ["N", "method", "slots", "wall (s)", "target-steps", "s per target-step", "vs the first"], rows))


KIND = Kind(name="dlmi-throughput", page="dlmi.md", writer="dlmi.py --throughput",
            recognise=rows_with("s_per_target_step"), section=per_source(section_throughput))
