"""bf16 against float32, SIP-It and DLMI (benchmarks/precision.py)."""

from __future__ import annotations

from benchmarks.reporting.figures import Figures
from benchmarks.reporting.kind import Kind, per_source, rows_with
from benchmarks.reporting.markdown import captioned, percent
from benchmarks.reporting.sources import Source


def section_precision(source: Source, figures: Figures) -> list[str]:
    rows = []
    for r in source.rows:
        if r["method"] == "sipit":
            rows.append(["SIP-It ranking chains", f"layer {r['layer']}", r["dtype"], percent(r["exact"]),
                         f"{r['s_per_token']:.2f} s/token", f"{r['candidates']:.0f}", "–", "–"])
        else:
            loss = "–" if r.get("relaxed_loss_last") is None else f"{r['relaxed_loss_last']:.3f}"
            rows.append(["DLMI forwards", r["target"], r["dtype"], str(r["exact"]), f"{r['s_per_step']:.2f} s/step",
                         "–", loss, f"{r['honest']:.2f}"])
    return ([f"## bf16 against float32 (`{source.name}`)", "",
             "SIP-It's verification is float32 either way; DLMI's honest checks too.", ""]
            + captioned("Precision", source.runs[0], ["method", "setting", "dtype", "exact", "time",
                                                      "candidates/token", "final relaxed loss", "honest LCS"], rows))


KIND = Kind(name="precision", page="precision.md", writer="precision.py",
            recognise=rows_with("method", "dtype"), section=per_source(section_precision))
