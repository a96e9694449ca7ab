"""Universal prompts: joint against progressive mode, or the sum against mellowmax, on the same groups
(benchmarks/universal.py)."""

from __future__ import annotations

from benchmarks.reporting.figures import Figures
from benchmarks.reporting.kind import Kind, per_source, rows_with
from benchmarks.reporting.markdown import captioned
from benchmarks.reporting.sources import Source


def section_universal(source: Source, figures: Figures) -> list[str]:
    d = source.data
    arms = [f"{r['mode']}:{r.get('loss', 'sum')}" for r in source.rows]
    rows = [[r["mode"], r.get("loss", "sum"), f"{r['solved']}/{r['groups']}", f"{r['exact_pairs']}/{r['pairs']}",
             f"{r['pair_lcs']:.2f}", f"{r['wall_seconds']:.0f} s"] for r in source.rows]
    return ([f"## Universal prompts: {' against '.join(arms)} (`{source.name}`)", "",
             f"One prompt per group for every member (each in its own chat context), the shipped config with "
             f"{d['max_seconds_per_member']:g} s per member, all groups in one pool, one arm after the other on "
             f"`{d['targets']}`.", ""]
            + captioned("Universal prompts", source.runs[0],
                        ["mode", "loss", "groups solved", "pairs exact", "mean per-pair honest LCS", "wall time"], rows))


KIND = Kind(name="dlmi-universal", page="dlmi.md", writer="universal.py",
            recognise=rows_with("exact_pairs"), section=per_source(section_universal))
