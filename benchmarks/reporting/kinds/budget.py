"""DLMI budget curves at equal candidate evaluations (benchmarks/dlmi.py --budgets)."""

from __future__ import annotations

import math
import re
import statistics
from typing import Any

from benchmarks.reporting.figures import Figures
from benchmarks.reporting.kind import Kind, per_source, rows_with
from benchmarks.reporting.markdown import captioned, seconds
from benchmarks.reporting.methods import method_name, methods_of
from benchmarks.reporting.sources import Source


def budget_cell(rs: list[dict]) -> str:
    return (f"{statistics.mean(r['honest'] for r in rs):.2f} · {sum(bool(r['exact']) for r in rs)}/{len(rs)} · "
            f"lead {statistics.mean(r['lead'] for r in rs):.2f}")


GCG_ARMS = ("gcg-nano", "gcg-scaled", "gcg")


def summary_rows(source: Source) -> tuple[str, list[dict]]:
    """The largest budget's rows a summary covers: the reachable targets when the run has any (a
    solution is known to exist for them), else every target; with "reachable" or "every"."""
    last = [r for r in source.rows if r["budget"] == max(source.data["budgets"])]
    reachable = [r for r in last if r["kind"].startswith("reachable")]
    return ("reachable", reachable) if reachable else ("every", last)


def budget_summary(source: Source) -> tuple[str | None, str, list[list[str]]]:
    """At the largest budget: per method honest LCS, exact, lead, seconds, and the honest LCS against
    the strongest GCG variant present (else the DLMI default). Over the reachable targets when the run
    has any (the ones a solution is known to exist for), else over every target. Returns the method
    compared with, which targets ("reachable" or "every") and the rows."""
    over, last = summary_rows(source)

    def mean_honest(method: str) -> float:
        return statistics.mean(r["honest"] for r in last if r["method"] == method)

    # Against GCG (its best variant in the run); a run of DLMI's options alone is against the default.
    gcgs = [m for m in GCG_ARMS if any(r["method"] == m for r in last)]
    gcg = max(gcgs, key=mean_honest) if gcgs else ("dlmi" if any(r["method"] == "dlmi" for r in last) else None)
    base = mean_honest(gcg) if gcg else None
    out = []
    for method in methods_of(last):
        rs = [r for r in last if r["method"] == method]
        honest = statistics.mean(r["honest"] for r in rs)
        out.append([method_name(method), f"{honest:.2f}", f"{sum(bool(r['exact']) for r in rs)}/{len(rs)}",
                    f"{statistics.mean(r['lead'] for r in rs):.2f}", seconds(statistics.mean(r["seconds"] for r in rs)),
                    "–" if not base else f"{honest / base:.2f}x"])
    return gcg, over, out


def slug(text: str) -> str:
    """A file-name piece: "k = 1" -> "k_1", "reachable natural" -> "reachable_natural"."""
    return re.sub(r"[^a-z0-9]+", "_", text.lower()).strip("_")


def plural(count: int, noun: str) -> str:
    return f"{count} {noun}{'' if count == 1 else 's'}"


def budget_groups(rows: list[dict]) -> list[tuple[str, list[dict]]]:
    """The rows per target kind, in the order they ran (per prompt length too, when the run had several)."""
    lengths = list(dict.fromkeys(r["N"] for r in rows))
    groups = []
    for n in lengths:
        for kind in dict.fromkeys(r["kind"] for r in rows if r["N"] == n):
            label = kind if len(lengths) == 1 else f"N = {n}, {kind}"
            groups.append((label, [r for r in rows if r["N"] == n and r["kind"] == kind]))
    return groups


def section_budget(source: Source, figures: Figures) -> list[str]:
    d, rows, budgets = source.data, source.rows, sorted(source.data["budgets"])
    lengths = sorted({r["N"] for r in rows})
    setup = [f"N = {', '.join(map(str, lengths))} prompt tokens"]
    if {"gcg", "gcg-scaled"} & {r["method"] for r in rows} and "gcg_width" in d:
        setup.append(f"GCG search width {d['gcg_width']}")
    if "reachable_seed" in d and any(r["kind"].startswith("reachable") for r in rows):
        setup.append(f"reachable targets from seed {d['reachable_seed']}")
    gradient = f"counts as {d.get('gradient_evaluations', 3)}"
    if "gradient_ratio" in d:
        gradient += f", its cost measured at {d['gradient_ratio']:.2f} forwards in the run"
    title = "Budget curves" if source.stem == "dlmi_budget" else f"Budget curves, `{source.stem}`"
    lines = [f"## {title} (equal candidate evaluations)", "",
             "Every method gets the same candidate evaluations per target (a prompt scored by a forward pass; a "
             f"gradient pass {gradient}). Each cell: mean honest LCS · exact matches · mean lead (the right target "
             "prefix under greedy decoding, as a fraction of M), over the targets of the kind, as the spent "
             "evaluations pass the budget. Reachable targets are greedy continuations of a fresh 20-token prompt "
             "(natural text or random tokens) that does not copy them; `null` is N newline tokens.", "",
             f"Budgets: {'; '.join(setup)}. Rows: `{source.name}`.", ""]
    if d.get("note"):  # what the run's figures need said next to them (e.g. a shared machine)
        lines += [f"Note: {d['note']}", ""]
    for label, of_kind in budget_groups(rows):
        lines += figures.add(f"{source.stem}_{slug(label)}",
                             lambda plt, of_kind=of_kind, label=label: figure_budget(plt, of_kind, label),
                             f"Honest LCS against the budget, {label}")
        table_rows = [[method_name(m)] + [budget_cell([r for r in of_kind if r["method"] == m and r["budget"] == b])
                                          for b in budgets] for m in methods_of(of_kind)]
        lines += captioned(f"{label}, {plural(len({r['id'] for r in of_kind}), 'target')}", source.runs_behind(of_kind),
                           ["method"] + [f"{b} evaluations" for b in budgets], table_rows)
    gcg, over, summary = budget_summary(source)
    strongest = "the stronger GCG arm, " if gcg != "dlmi" and len(set(GCG_ARMS) & set(methods_of(rows))) > 1 else ""
    against = f"the ratio is to {strongest}`{gcg}`, {method_name(gcg)}" if gcg else "no GCG run to compare with"
    versus = "the default" if gcg == "dlmi" else "GCG"
    targets = "the reachable targets" if over == "reachable" else "every target"
    lines += captioned(f"At {budgets[-1]} evaluations, {targets} ({against})", source.runs_behind(summary_rows(source)[1]),
                       ["method", "honest LCS", "exact", "lead", "seconds per target", f"honest LCS vs {versus}"],
                       summary)
    return lines


def figure_budget(plt: Any, rows: list[dict], kind: str) -> Any:
    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    budgets = sorted({r["budget"] for r in rows})
    for method in methods_of(rows):
        values = [[r["honest"] for r in rows if r["method"] == method and r["budget"] == b] for b in budgets]
        ax.plot(budgets, [statistics.mean(v) if v else math.nan for v in values], marker="o", label=method_name(method))
    ax.set_xscale("log")
    ax.set_xticks(budgets, [str(b) for b in budgets])
    ax.set_xlabel("candidate evaluations per target")
    ax.set_ylabel("honest LCS ratio")
    ax.set_ylim(0, 1.05)
    ax.set_title(kind)
    ax.legend(fontsize=7)
    fig.tight_layout()
    return fig


KIND = Kind(name="dlmi-budget", page="dlmi.md", writer="dlmi.py --budgets",
            recognise=rows_with("budget", "evals", "lead"), section=per_source(section_budget))
