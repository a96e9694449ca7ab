"""SIP-It on low-precision captures (benchmarks/capture.py)."""

from __future__ import annotations

from benchmarks.reporting.figures import Figures
from benchmarks.reporting.kind import Kind, rows_with
from benchmarks.reporting.markdown import captioned, percent
from benchmarks.reporting.sources import Source


def section_capture(sources: list[Source], figures: Figures) -> list[str]:
    lines = ["## SIP-It on low-precision captures", "",
             "States captured as a serving stack makes them (the model cast to the dtype, one full-sequence forward), "
             "then inverted with `capture_dtype` set.", ""]
    for source in sources:
        rows = [[r["dtype"], "model cast to it" if r["verify_in"] == "capture" else "float32 model", str(r["layer"]),
                 f"{r['exact']}/{r['prompts']}", f"{r['token_accuracy']:.1%}", percent(r["verified"]),
                 percent(r["certified"]), f"{r['s_per_token']:.2f}", f"{r['candidates']:.0f}"] for r in source.rows]
        lines += captioned(f"Captures (`{source.name}`)", source.runs[0],
                           ["capture dtype", "verified on", "layer", "exact", "token accuracy", "verified", "certified",
                            "s/token", "candidates/token"], rows)
    return lines


KIND = Kind(name="capture", page="sipit.md", writer="capture.py",
            recognise=rows_with("verify_in", "certified"), section=section_capture)
