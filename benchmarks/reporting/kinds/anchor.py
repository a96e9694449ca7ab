"""lit-inversion against the real nanoGCG 0.3.0 at equal wall time, per context (benchmarks/anchor.py summary)."""

from __future__ import annotations

from benchmarks.reporting.figures import Figures
from benchmarks.reporting.kind import Kind, per_source, rows_with
from benchmarks.reporting.markdown import captioned
from benchmarks.reporting.sources import Source


def _or_dash(value, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def section_anchor(source: Source, figures: Figures) -> list[str]:
    rows = [[r["context"], r["method"], r["package"], f"{r['exact']}/{r['targets']}", f"{r['honest_lcs']:.2f}",
             f"{r['remaining_error']:.2f}", _or_dash(r["median_seconds_to_exact"], ".0f"),
             f"{r['seconds_per_target']:.0f}", _or_dash(r["prompt_perplexity"], ".0f")]
            for r in source.data["summary"]]
    return ([f"## Against the real nanoGCG (`{source.name}`)", "",
             "The same targets and context ids on both sides, the same wall time per target, one job at a time; "
             "every arm's prompt (nanoGCG's `best_string`, our `prompt_text`), encoded alone, judged by our verdict: "
             "greedy decoding of the context spliced around it. The per-target runs (`anchor.py ours`, "
             "`benchmarks/nanogcg/run.py`, `anchor.py judge`) are in the module docstring of `benchmarks/anchor.py`; "
             "nanoGCG's width and top-k are the better of its defaults (512 / 256) and 64 / 64 on a two-target pilot. "
             "nanoGCG stops after the step that crosses the time limit, so it may overshoot by one step.", ""]
            + captioned("nanoGCG side by side", source.runs[0],
                        ["context", "method", "package", "exact", "honest LCS", "remaining error",
                         "median s to exact", "s per target", "prompt perplexity"], rows))


KIND = Kind(name="dlmi-anchor", page="dlmi.md", writer="anchor.py summary",
            recognise=rows_with("honest_lcs", "context", "package"), section=per_source(section_anchor))
