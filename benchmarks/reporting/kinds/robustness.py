"""SIP-It on noisy and rounded states (benchmarks/robustness.py)."""

from __future__ import annotations

from typing import Any

from benchmarks.reporting.figures import Figures
from benchmarks.reporting.kind import Kind, per_source, rows_with
from benchmarks.reporting.markdown import captioned, percent, seconds
from benchmarks.reporting.sources import Source


def section_robustness(source: Source, figures: Figures) -> list[str]:
    rows = []
    for r in source.rows:
        confidence = " / ".join("–" if c is None else f"{c:.2f}" for c in (r["confidence_right"], r["confidence_wrong"]))
        rows.append([str(r["layer"]), f"{r['delta']:.3g}", r["setting"], f"{r['noise_norm'] / r['delta']:.3g}",
                     percent(r["recovery"]), confidence, seconds(r["seconds_per_token"])])
    budget = source.data.get("budget")
    lines = [f"## Token recovery (`{source.name}`)", "",
             f"At most {budget or '?'} candidates per position (noisy states never verify, so the search spends its "
             "budget and returns the nearest candidate). Δ: minimum pairwise distance between the candidate states at "
             "the first position; nearest-candidate decoding is guaranteed while the noise norm stays under Δ/2.", ""]
    lines += captioned("Robustness", source.runs[0],
                       ["layer", "Δ", "setting", "noise norm / Δ", "token recovery", "confidence (right / wrong)",
                        "s/token"], rows)
    return lines + figures.add(source.stem, lambda plt: figure_robustness(plt, source.rows, budget),
                               "SIP-It token recovery against noise")


def figure_robustness(plt: Any, rows: list[dict], budget: int | None) -> Any:
    fig, ax = plt.subplots(figsize=(6.5, 4.4), layout="constrained")
    for layer in sorted({r["layer"] for r in rows}):
        noisy = [r for r in rows if r["layer"] == layer and r["sigma_multiple"]]
        line, = ax.plot([r["noise_norm"] / r["delta"] for r in noisy], [r["recovery"] for r in noisy], "o-",
                        label=f"layer {layer}, Gaussian noise")
        rounded = [r for r in rows if r["layer"] == layer and r["rounding"]]
        # Exact rounding (noise 0) still needs a point on the log axis.
        ax.scatter([max(r["noise_norm"] / r["delta"], 1e-3) for r in rounded], [r["recovery"] for r in rounded],
                   marker="x", color=line.get_color(), label=f"layer {layer}, rounding")
    ax.axvline(0.5, color="gray", linestyle="--", label="noise norm = Δ/2 (theory)")
    ax.set_xscale("log")
    ax.set_xlabel("noise norm / Δ (min pairwise distance of candidate states)")
    ax.set_ylabel("token recovery rate")
    ax.set_ylim(-0.02, 1.02)
    ax.set_title(f"SIP-It under Gaussian noise (o) and rounding (x), budget {budget or '?'}/position", fontsize=10)
    fig.legend(*ax.get_legend_handles_labels(), loc="outside lower center", ncol=3, fontsize=8)
    return fig


KIND = Kind(name="robustness", page="robustness.md", writer="robustness.py",
            recognise=rows_with("setting", "recovery"), section=per_source(section_robustness))
