"""A DLMI step against the model's own forward and backward (benchmarks/dlmi.py --step-cost)."""

from __future__ import annotations

from benchmarks.reporting.figures import Figures
from benchmarks.reporting.kind import Kind, per_source, rows_with
from benchmarks.reporting.markdown import captioned
from benchmarks.reporting.sources import Source


def section_step_cost(source: Source, figures: Figures) -> list[str]:
    rows = [[str(r["N"]), r["method"], r["relaxation"], str(r["rows"]), f"{r['forward_backward']:.3f}",
             f"{r['step']:.3f}", f"{r['ratio']:.2f}x", "–" if r["model_share"] is None else f"{r['model_share']:.0%}",
             f"{r['check']:.2f}"] for r in source.rows]
    vocab = source.data.get("vocab_size")
    return ([f"## A step against the model's own forward and backward (`{source.name}`)", ""]
            + ([f"|V| = {vocab:,}, M = {source.data.get('M', '?')}.", ""] if vocab else [])
            + captioned("Step cost", source.runs[0],
                        ["N", "method", "relaxation", "rows", "model forward+backward (s)", "step (s)",
                         "step / forward+backward", "model calls' share", "honest check (s)"], rows))


KIND = Kind(name="dlmi-step-cost", page="dlmi.md", writer="dlmi.py --step-cost",
            recognise=rows_with("forward_backward"), section=per_source(section_step_cost))
