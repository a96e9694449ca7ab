"""The context cache: seconds per step with a long system prompt, cached against recomputed
(benchmarks/context_cache.py)."""

from __future__ import annotations

from benchmarks.reporting.figures import Figures
from benchmarks.reporting.kind import Kind, per_source, rows_with
from benchmarks.reporting.markdown import captioned
from benchmarks.reporting.sources import Source


def section_context_cache(source: Source, figures: Figures) -> list[str]:
    d = source.data
    rows = [[r["method"], f"{r['cached_s_per_step']:.2f}", f"{r['recomputed_s_per_step']:.2f}", f"{r['speedup']:.2f}x"]
            for r in source.rows]
    return ([f"## The context cache (`{source.name}`)", "",
             f"A chat context with a {d['system_tokens']}-token system prompt ({d['context_before']} ids before the "
             f"span, {d['context_after']} after): the keys and values of the ids before the span computed once per "
             "target, against recomputed in every forward (`cache_context false`), median seconds per step after a "
             "warm-up step, same target and seed.", ""]
            + captioned("Context cache", source.runs[0],
                        ["method", "s/step, cached", "s/step, recomputed", "speed-up"], rows))


KIND = Kind(name="dlmi-context-cache", page="dlmi.md", writer="context_cache.py",
            recognise=rows_with("cached_s_per_step"), section=per_source(section_context_cache))
