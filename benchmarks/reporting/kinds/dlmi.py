"""DLMI and the output-inversion baselines (benchmarks/dlmi.py): Table B, Figures B and C."""

from __future__ import annotations

import math
import statistics
from typing import Any

from benchmarks.reporting.figures import Figures
from benchmarks.reporting.kind import Kind, rows_with
from benchmarks.reporting.markdown import captioned, seconds
from benchmarks.reporting.methods import method_name, methods_of
from benchmarks.reporting.sources import Source

# Methods with a temperature worth plotting: GCG is discrete (tau 0), REINFORCE samples softmax(Z) (tau 1).
TAU_METHODS = ("paper", "dlmi", "dlmi-repeat", "gbda")


def dlmi_budget(source: Source) -> str:
    d, rows = source.data, source.rows
    budget = (f"{d['equal_time']:g} s per target (equal wall time)" if d.get("equal_time")
              else f"{d.get('steps', '?')} steps per target")
    parts = [budget, f"N ∈ {{{', '.join(map(str, sorted({r['N'] for r in rows})))}}}",
             f"k ∈ {{{', '.join(map(str, sorted({r['k'] for r in rows})))}}}"]
    if "batch_size" in d:
        parts.append(f"batch of {d['batch_size']}")
    if {"gcg", "gcg-scaled"} & {r["method"] for r in rows} and "gcg_width" in d:
        parts.append(f"GCG search width {d['gcg_width']}")
    return "; ".join(parts)


def table_b_rows(rows: list[dict]) -> list[list[str]]:
    out = []
    for n in sorted({r["N"] for r in rows}):
        for method in methods_of(rows):
            for k in sorted({r["k"] for r in rows}):
                rs = [r for r in rows if r["N"] == n and r["method"] == method and r["k"] == k]
                if not rs:
                    continue
                wins = [r for r in rs if r["exact"]]
                steps = statistics.mean(r["steps"] for r in wins) if wins else None
                success = statistics.mean(r["steps"] * r["s_per_step"] for r in wins) if wins else None
                out.append([str(n), method_name(method), str(k), f"{statistics.mean(r['honest'] for r in rs):.2f}",
                            f"{len(wins)}/{len(rs)}", "–" if steps is None else f"{steps:.0f}",
                            "–" if success is None else seconds(success),
                            f"{statistics.mean(r['soft'] for r in rs):.2f}",
                            seconds(statistics.mean(r["s_per_step"] for r in rs)),
                            f"{statistics.mean(r['copied'] for r in rs):.2f}"])
    return out


TABLE_B = ["N", "method", "k", "honest LCS", "exact", "steps to success", "seconds to success", "soft LCS", "s/step",
           "prompt/target LCS"]


def section_dlmi(source: Source, figures: Figures) -> list[str]:
    budget = dlmi_budget(source)
    lines = [f"## Output inversion, {budget.split(';')[0]} (`{source.name}`)", "", f"Budgets: {budget}.", ""]
    lines += figures.add(f"{source.stem}_lcs", lambda plt: figure_b(plt, source.rows, budget.split(";")[0]),
                         f"Figure B ({source.stem}). Honest LCS ratio against difficulty k")
    for i, run in enumerate(source.runs):
        rows = source.rows_of(i)
        if rows:
            lines += captioned(f"Table B. Run {i + 1} of {len(source.runs)}" if len(source.runs) > 1 else "Table B. One run",
                               run, TABLE_B, table_b_rows(rows))
    # A method that ran no relaxed step (the default swap search) has no temperature: nan throughout.
    traces = [t for t in source.data.get("tau_traces", [])
              if (t["method"] in TAU_METHODS or t["method"].startswith("dlmi-")) and any(x > 0 for x in t["tau"])]
    if traces:
        keys = ", ".join(sorted({k for t in traces for k in t["keys"]}))
        lines += figures.add(f"{source.stem}_tau", lambda plt: figure_c(plt, traces),
                             f"Figure C ({source.stem}). Mean temperature τ over the prompt positions of the first "
                             f"batch ({keys}) at every step")
    return lines


def figure_b(plt: Any, rows: list[dict], budget: str) -> Any:
    lengths = sorted({r["N"] for r in rows})
    methods, ks = methods_of(rows), sorted({r["k"] for r in rows})
    fig, axes = plt.subplots(1, len(lengths), figsize=(max(6.5, 4.5 * len(lengths)), 4.2), layout="constrained",
                             sharey=True, squeeze=False)
    width = 0.8 / len(methods)
    for ax, n in zip(axes[0], lengths):
        for i, method in enumerate(methods):
            values = [[r["honest"] for r in rows if r["N"] == n and r["method"] == method and r["k"] == k] for k in ks]
            heights = [statistics.mean(v) if v else math.nan for v in values]
            ax.bar([x + (i - (len(methods) - 1) / 2) * width for x in range(len(ks))], heights, width,
                   label=method_name(method))
        ax.set_xticks(range(len(ks)), [str(k) for k in ks])
        ax.set_xlabel("difficulty k (target follows the k-th likeliest token)")
        ax.set_title(f"N = {n} prompt tokens", fontsize=10)
        ax.set_ylim(0, 1.05)
    axes[0, 0].set_ylabel("honest LCS ratio (mean over targets)")
    handles, labels = axes[0, 0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside lower center", ncol=min(len(methods), 4), fontsize=8)
    fig.suptitle(f"Output inversion, {budget}", fontsize=11)
    return fig


def figure_c(plt: Any, traces: list[dict]) -> Any:
    lengths = sorted({t["N"] for t in traces})
    fig, axes = plt.subplots(1, len(lengths), figsize=(max(6.5, 4.5 * len(lengths)), 4), layout="constrained",
                             sharey=True, squeeze=False)
    for ax, n in zip(axes[0], lengths):
        marked = False
        for t in [t for t in traces if t["N"] == n]:
            line, = ax.plot(range(1, len(t["tau"]) + 1), t["tau"], label=method_name(t["method"]))
            if "refine" in t["phase"] and t["phase"].index("refine") > 0:  # after it the prompt is discrete
                ax.axvline(t["phase"].index("refine") + 1, color=line.get_color(), linestyle=":",
                           label=None if marked else "refinement starts (dotted)")
                marked = True
        ax.set_yscale("log")
        ax.set_xlabel("step")
        ax.set_title(f"N = {n} prompt tokens", fontsize=10)
        ax.legend(fontsize=8)
    axes[0, 0].set_ylabel("mean temperature τ")
    return fig


def section(sources: list[Source], figures: Figures) -> list[str]:
    """What Table B holds, then each DLMI JSON's section in turn."""
    lines = ["Table B: honest LCS ratio (greedy decode from the discrete prompt, scored against the target), "
             "exact matches, steps and seconds to success (mean over the exact matches; seconds = steps × the "
             "method's seconds per step), the paper-style soft LCS, seconds per step, and how much of the "
             "target the prompt itself contains (prompt/target LCS), per prompt length N, method and "
             "difficulty k (mean over the targets).", ""]
    for source in sources:
        lines += section_dlmi(source, figures)
    return lines


KIND = Kind(name="dlmi", page="dlmi.md", writer="dlmi.py",
            recognise=rows_with("honest", "k", "N"), section=section)
