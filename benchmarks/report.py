"""The comparison report: report.md, PNG figures and TensorBoard figures from the benchmark JSON files.

    python benchmarks/report.py --sipit runs/bench-sipit/sipit.json --dlmi runs/bench-dlmi/dlmi.json \\
        --robustness docs/robustness.json --out docs/report

Every input is optional; a section whose input is missing says so. Nothing is measured here: every
number comes from the JSON files that benchmarks/sipit.py, dlmi.py and robustness.py write.
- Table A / Figure A (SIP-It paper, Table 2 shape): SIP-It vs brute force vs HardPrompts (PEZ) per
  layer: exact recovery, time per prompt (mean +- std), candidates per token. Brute force is timed on
  sampled positions only, so its per-prompt time is extrapolated (and marked so). Pass several
  sipit.json files (e.g. --length 10, 20, 50) to also plot time against prompt length.
- Figure B / Table B: DLMI and the output-inversion baselines: honest LCS, exact match and seconds to
  success against difficulty k, per prompt length N.
- Figure C: DLMI's mean temperature over the steps (dlmi.json's `tau_traces`).
- The robustness table and figure.
Figures need matplotlib (`pip install lit-inversion[report]`); without it report.md has the tables only.
Each figure is also logged to TensorBoard under OUT/tensorboard.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# Bar and line order, and how each method is named in the report.
METHOD_NAMES = {
    "paper": "DLMI (paper's method)",
    "dlmi": "DLMI (lit-inversion)",
    "dlmi-repeat": "DLMI, repeat-target seed",
    "gbda": "GBDA",
    "reinforce": "REINFORCE",
    "gcg": "GCG",
    "gcg-scaled": "GCG (nanoGCG defaults, width scaled)",
    "gcg-nano": "GCG (nanoGCG defaults, width 512)",
}
# Methods with a temperature worth plotting: GCG is discrete (tau 0), REINFORCE samples softmax(Z) (tau 1).
TAU_METHODS = ("paper", "dlmi", "dlmi-repeat", "gbda")
NOT_SET = "not recorded"


@dataclass
class Run:
    """One benchmark JSON file and where it came from."""

    path: Path
    data: dict[str, Any]

    @property
    def written(self) -> str:
        date = self.data.get("date")
        if date:
            return date
        mtime = datetime.datetime.fromtimestamp(self.path.stat().st_mtime)
        return f"{mtime.isoformat(timespec='seconds')} (file time)"

    @property
    def rows(self) -> list[dict]:
        return self.data.get("rows", [])


def load(path: str | None) -> Run | None:
    return Run(Path(path), json.loads(Path(path).read_text())) if path else None


# ----- formatting -------------------------------------------------------------------------------------

def seconds(x: float | None) -> str:
    if x is None or math.isnan(x):
        return "n/a"
    return f"{x:.0f}" if x >= 100 else f"{x:.1f}" if x >= 10 else f"{x:.2f}"


def percent(x: float | None) -> str:
    return "–" if x is None else f"{x:.0%}"


def mean_std(values: list[float]) -> tuple[float | None, float | None]:
    if not values:
        return None, None
    return statistics.mean(values), statistics.stdev(values) if len(values) > 1 else None


def table(header: list[str], rows: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)] + ["| " + " | ".join(r) + " |" for r in rows]


# ----- header -----------------------------------------------------------------------------------------

def sipit_budget(run: Run) -> str:
    d = run.data
    prompts = d.get("prompts") or (run.rows[0]["prompts"] if run.rows else "?")
    parts = [f"{d.get('length', '?')}-token prompts, {prompts} per kind and layer",
             "SIP-It: whole vocabulary per position (exact)"]
    positions = d.get("brute_positions")
    if positions:
        parts.append(f"brute force: {positions} sampled positions per layer")
    if d.get("pez_steps"):
        parts.append(f"PEZ: {d['pez_steps']} steps per prompt")
    return "; ".join(parts)


def dlmi_budget(run: Run) -> str:
    d, rows = run.data, run.rows
    lengths = sorted({r["N"] for r in rows})
    ks = sorted({r["k"] for r in rows})
    budget = (f"{d['equal_time']:g} s per target (equal wall time)" if d.get("equal_time")
              else f"{d.get('steps', '?')} steps per target")
    parts = [budget, f"N ∈ {{{', '.join(map(str, lengths))}}}",
             f"k ∈ {{{', '.join(map(str, ks))}}}"]
    if "batch_size" in d:
        parts.append(f"batch of {d['batch_size']}")
    if {"gcg", "gcg-scaled"} & {r["method"] for r in rows} and "gcg_width" in d:
        parts.append(f"GCG search width {d['gcg_width']}")
    return "; ".join(parts)


def header(sipit: list[Run], dlmi: Run | None, robustness: Run | None, figures: bool) -> list[str]:
    lines = ["# Inversion benchmarks: comparison report", "",
             f"Generated {datetime.datetime.now().isoformat(timespec='seconds')} by `benchmarks/report.py`. "
             "Every number below comes from the JSON runs named in this table; nothing is re-measured.", ""]
    runs = [("SIP-It", r, sipit_budget(r)) for r in sipit]
    if dlmi:
        runs.append(("DLMI", dlmi, dlmi_budget(dlmi)))
    if robustness:
        runs.append(("robustness", robustness, f"{robustness.data.get('budget', '?')} candidates per position"))
    rows = [[name, f"`{r.path}`", r.data.get("model", NOT_SET), r.data.get("hardware", NOT_SET), budget, r.written]
            for name, r, budget in runs]
    lines += table(["benchmark", "JSON", "model", "hardware", "budgets", "written"], rows) if rows else ["No inputs given."]
    if not figures:
        lines += ["", "_matplotlib is not installed (`pip install lit-inversion[report]`): tables only, no figures._"]
    return lines + [""]


# ----- Table A / Figure A: SIP-It vs brute force vs PEZ ----------------------------------------------

def table_a_entries(run: Run) -> list[dict]:
    """One entry per layer and method (and prompt kind): the numbers Table A and Figure A show."""
    length = run.data.get("length")
    entries = []
    for layer in sorted({r["layer"] for r in run.rows}):
        rows = [r for r in run.rows if r["layer"] == layer]
        for r in rows:
            mean, std = mean_std(r.get("prompt_seconds", []))
            entries.append(dict(length=length, layer=layer, method="SIP-It", kind=r["kind"],
                                count=f"{r['prompts']} {r['kind']}", exact=r["exact"],
                                token_accuracy=r.get("token_accuracy"), mean=mean, std=std,
                                per_token=r["mean_s_per_token"], extrapolated=False,
                                candidates=f"{r['mean_candidates']:.0f} (max {r['max_candidates']})"))
        if "brute_s_per_token" in rows[0]:
            entries.append(brute_entry(rows[0], layer, length))
        for r in rows:
            if "pez_prompt_seconds" in r:
                mean, std = mean_std(r["pez_prompt_seconds"])
                entries.append(dict(length=length, layer=layer, kind=r["kind"],
                                    method=f"HardPrompts (PEZ, {run.data.get('pez_steps', '?')} steps)",
                                    count=f"{len(r['pez_prompt_seconds'])} {r['kind']}",
                                    exact=r["pez_exact"], token_accuracy=r["pez_token_accuracy"], mean=mean, std=std,
                                    per_token=mean / length if length else None,  # PEZ optimises all positions at once
                                    candidates=f"{r['pez_candidates']:.0f} (one per step)", extrapolated=False))
    return entries


def brute_entry(row: dict, layer: int, length: int | None) -> dict:
    """Brute force per prompt, extrapolated from sampled positions: T x mean, and sqrt(T) x std.

    The random order is drawn afresh at every position, so positions are independent and the
    per-prompt time is a sum of T independent per-position times.
    """
    positions = row.get("brute_position_seconds", [])
    per_token = row["brute_s_per_token"]  # measured: the mean over the sampled positions
    mean, std = mean_std(positions) if positions else (per_token, None)
    if length is None or mean is None:
        mean = std = None
    else:
        mean, std = length * mean, (math.sqrt(length) * std if std is not None else None)
    count = f"{len(positions) or 'some'} sampled positions of natural prompts"
    # The script asserts every sampled position was recovered; brute force over |V| is exact by construction.
    return dict(length=length, layer=layer, method="Brute force", kind="natural", count=count, exact=1.0,
                token_accuracy=None, mean=mean, std=std, per_token=per_token, extrapolated=True,
                candidates=f"{row['brute_candidates']:.0f} (sampled positions)")


def time_cell(e: dict) -> str:
    if e["mean"] is None:
        return "n/a"
    cell = seconds(e["mean"]) + (f" ± {seconds(e['std'])}" if e["std"] is not None else "")
    return f"≈ {cell} (extrapolated)" if e["extrapolated"] else cell


def section_a(sipit: list[Run], figures: FigureWriter | None) -> list[str]:
    lines = ["## SIP-It vs brute force vs HardPrompts (Table A, Figure A)", ""]
    if not sipit:
        return lines + ["_No SIP-It input (`--sipit`, written by `benchmarks/sipit.py`): no Table A or Figure A._", ""]
    entries = [e for run in sipit for e in table_a_entries(run)]
    rows = [[str(e["length"] or "?"), str(e["layer"]), e["method"], e["count"], percent(e["exact"]),
             percent(e["token_accuracy"]), time_cell(e), seconds(e["per_token"]), e["candidates"]] for e in entries]
    lines += ["Table A. Exact recovery (every token right), token accuracy, wall time per prompt and per token, "
              "and candidate tests per token, per layer (the SIP-It paper's Table 2, per layer).", ""]
    lines += table(["prompt tokens", "layer", "method", "prompts", "exact recovery", "token accuracy",
                    "time per prompt (s), mean ± std", "s/token", "candidates per token"], rows)
    lines += ["", "Brute force (random order, same batched verifier and KV cache) is timed on sampled positions given "
              "the true prefix; its time per prompt is **extrapolated**: T × the mean per position (± √T × the std). "
              "Its 100% is exact by construction (it may test the whole vocabulary). "
              "SIP-It's time excludes the first-position table, built once per model and layer.", ""]
    if any(e["mean"] is None for e in entries):
        lines += ["n/a: the JSON does not carry per-prompt seconds or the prompt length (written before "
                  "`benchmarks/sipit.py` recorded them); the s/token column still comes from it.", ""]
    if not any("pez_exact" in r for run in sipit for r in run.rows):
        lines += ["_No HardPrompts (PEZ) rows: run `benchmarks/sipit.py --pez-steps S` to add them._", ""]
    if figures and any(e["mean"] is not None for e in entries):
        lines += [figures.add("sipit_time", figure_a(figures.plt, entries), "Figure A. Time per prompt against layer"), ""]
    elif figures:
        lines += ["_No Figure A: the SIP-It JSON carries no per-prompt seconds (rerun `benchmarks/sipit.py`)._", ""]
    return lines


def figure_a(plt, entries: list[dict]):
    lengths = sorted({e["length"] for e in entries if e["length"] is not None})
    several = len(lengths) > 1
    fig, axes = plt.subplots(1, 2 if several else 1, figsize=(11 if several else 6.5, 4.6), layout="constrained",
                             squeeze=False)
    ax = axes[0, 0]
    # Colour: method and prompt kind; line style: method; marker: prompt length.
    styles = {"SIP-It": "-", "Brute force": "--"}
    markers = dict(zip(lengths, "osD^v"))
    colours = {}
    series: dict[tuple, list[dict]] = {}
    for e in entries:
        if e["mean"] is not None:
            series.setdefault((e["method"], e["kind"], e["length"]), []).append(e)
    for (method, kind, length), points in series.items():
        colour = colours.setdefault((method, kind), f"C{len(colours) % 10}")
        label = (f"{method}, {kind}" + (" (extrapolated)" if points[0]["extrapolated"] else "")
                 + (f", T = {length}" if several else ""))
        ax.errorbar([p["layer"] for p in points], [p["mean"] for p in points], yerr=[p["std"] or 0.0 for p in points],
                    color=colour, linestyle=styles.get(method, ":"), marker=markers.get(length, "o"), capsize=3,
                    label=label)
    ax.set_yscale("log")
    ax.set_xticks(sorted({e["layer"] for e in entries}))
    ax.set_xlabel("layer")
    ax.set_ylabel("seconds per prompt (mean ± std)")
    ax.set_title("Time per prompt against layer", fontsize=10)
    fig.legend(*ax.get_legend_handles_labels(), loc="outside lower center", ncol=3, fontsize=8)
    if several:
        figure_a_lengths(axes[0, 1], entries)
    return fig


def figure_a_lengths(ax, entries: list[dict]) -> None:
    """SIP-It's time per prompt against prompt length, one line per layer (both prompt kinds pooled)."""
    for layer in sorted({e["layer"] for e in entries}):
        points = [(e["length"], e["mean"]) for e in entries
                  if e["layer"] == layer and e["method"] == "SIP-It" and e["mean"] is not None and e["length"]]
        by_length: dict[int, list[float]] = {}
        for length, mean in points:
            by_length.setdefault(length, []).append(mean)
        xs = sorted(by_length)
        ax.plot(xs, [statistics.mean(by_length[x]) for x in xs], "o-", label=f"layer {layer}")
    from matplotlib.ticker import FormatStrFormatter, LogLocator, NullFormatter  # only reached with matplotlib

    ax.set_yscale("log")
    # Ticks at 1, 2, 5 x 10^n in plain numbers: this range is often narrower than a decade.
    ax.yaxis.set_major_locator(LogLocator(subs=(1, 2, 5)))
    ax.yaxis.set_major_formatter(FormatStrFormatter("%g"))
    ax.yaxis.set_minor_formatter(NullFormatter())
    ax.set_xticks(sorted({e["length"] for e in entries if e["length"]}))
    ax.set_xlabel("prompt length T (tokens)")
    ax.set_ylabel("SIP-It seconds per prompt (mean of kinds)")
    ax.set_title("SIP-It time per prompt against prompt length", fontsize=10)
    ax.legend(fontsize=8)


# ----- Figure B / Table B / Figure C: DLMI and baselines --------------------------------------------

def methods_of(rows: list[dict]) -> list[str]:
    present = {r["method"] for r in rows}
    return [m for m in METHOD_NAMES if m in present] + sorted(present - set(METHOD_NAMES))


def method_name(method: str) -> str:
    return METHOD_NAMES.get(method, method)


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
                            "–" if success is None else seconds(success)])
    return out


def section_b(dlmi: Run | None, figures: FigureWriter | None) -> list[str]:
    lines = ["## DLMI and the output-inversion baselines (Figure B, Table B)", ""]
    if dlmi is None:
        return lines + ["_No DLMI input (`--dlmi`, written by `benchmarks/dlmi.py`): no Figure B, Table B or Figure C._", ""]
    rows = dlmi.rows
    if figures:
        budget = f"{dlmi.data['equal_time']:g} s" if dlmi.data.get("equal_time") else f"{dlmi.data.get('steps')} steps"
        lines += [figures.add("dlmi_lcs", figure_b(figures.plt, rows, budget),
                              "Figure B. Honest LCS ratio against difficulty k"), ""]
    lines += ["Table B. Honest LCS ratio (greedy decode from the discrete prompt, scored against the target), exact "
              "matches, and steps and seconds to success (mean over the exact matches; seconds = steps × the "
              "method's seconds per step in this run).", ""]
    lines += table(["N", "method", "k", "honest LCS", "exact", "steps to success", "seconds to success"], table_b_rows(rows))
    return lines + [""] + section_c(dlmi, figures)


def figure_b(plt, rows: list[dict], budget: str | None):
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
    fig.legend(handles, labels, loc="outside lower center", ncol=min(len(methods), 6), fontsize=8)
    fig.suptitle(f"Output inversion, {budget or '?'} per target", fontsize=11)
    return fig


def section_c(dlmi: Run, figures: FigureWriter | None) -> list[str]:
    lines = ["## DLMI temperature over the run (Figure C)", ""]
    # A method that ran no relaxed step (the default swap search) has no temperature: nan throughout.
    traces = [t for t in dlmi.data.get("tau_traces", []) if t["method"] in TAU_METHODS and any(x > 0 for x in t["tau"])]
    if not traces:
        return lines + ["_This dlmi.json has no temperature trace of a DLMI-family method (rerun `benchmarks/dlmi.py`)._", ""]
    if not figures:
        return lines + ["_Figure C needs matplotlib._", ""]
    caption = ("Figure C. Mean temperature τ over prompt positions of the first batch ("
               + ", ".join(sorted({k for t in traces for k in t["keys"]})) + ") at every step")
    return lines + [figures.add("dlmi_tau", figure_c(figures.plt, traces), caption), ""]


def figure_c(plt, traces: list[dict]):
    lengths = sorted({t["N"] for t in traces})
    fig, axes = plt.subplots(1, len(lengths), figsize=(max(6.5, 4.5 * len(lengths)), 4), layout="constrained",
                             sharey=True, squeeze=False)
    for ax, n in zip(axes[0], lengths):
        marked = False
        for t in [t for t in traces if t["N"] == n]:
            line, = ax.plot(range(1, len(t["tau"]) + 1), t["tau"], label=method_name(t["method"]))
            if "refine" in t["phase"]:  # after this step the prompt is discrete: tau no longer matters
                ax.axvline(t["phase"].index("refine") + 1, color=line.get_color(), linestyle=":",
                           label=None if marked else "refinement starts (dotted)")
                marked = True
        ax.set_yscale("log")
        ax.set_xlabel("step")
        ax.set_title(f"N = {n} prompt tokens", fontsize=10)
        ax.legend(fontsize=8)
    axes[0, 0].set_ylabel("mean temperature τ")
    return fig


# ----- robustness ---------------------------------------------------------------------------------------

def section_robustness(run: Run | None, figures: FigureWriter | None) -> list[str]:
    lines = ["## SIP-It on noisy and rounded states", ""]
    if run is None:
        return lines + ["_No robustness input (`--robustness`, written by `benchmarks/robustness.py`)._", ""]
    rows = []
    for r in run.rows:
        confidence = " / ".join("–" if c is None else f"{c:.2f}" for c in (r["confidence_right"], r["confidence_wrong"]))
        rows.append([str(r["layer"]), f"{r['delta']:.3g}", r["setting"], f"{r['noise_norm'] / r['delta']:.3g}",
                     percent(r["recovery"]), confidence, seconds(r["seconds_per_token"])])
    lines += [f"Token recovery with at most {run.data.get('budget', '?')} candidates per position. Δ: minimum pairwise "
              "distance between candidate states; recovery is guaranteed while the noise norm stays under Δ/2.", ""]
    lines += table(["layer", "Δ", "setting", "noise norm / Δ", "token recovery", "confidence (right / wrong)", "s/token"], rows)
    if figures:
        lines += ["", figures.add("robustness", figure_robustness(figures.plt, run.rows, run.data.get("budget")),
                                  "SIP-It token recovery against noise")]
    return lines + [""]


def figure_robustness(plt, rows: list[dict], budget: int | None):
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


# ----- output ---------------------------------------------------------------------------------------------

def load_pyplot():
    """matplotlib.pyplot on a file-only backend, or None when the `report` extra is not installed."""
    try:
        import matplotlib
    except ImportError:
        return None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


class FigureWriter:
    """Saves each figure as a PNG next to report.md and logs it to TensorBoard."""

    def __init__(self, out: Path, plt):
        from torch.utils.tensorboard import SummaryWriter

        self.out = out
        self.plt = plt
        # The report is rebuilt whole: drop older event files, whose same-tag figures TensorBoard would mix in.
        for stale in (out / "tensorboard").glob("events.out.tfevents.*"):
            stale.unlink()
        self.tensorboard = SummaryWriter(str(out / "tensorboard"))

    def add(self, name: str, fig, caption: str) -> str:
        """Write `fig`, then return the markdown that shows it (a path relative to report.md)."""
        path = self.out / f"{name}.png"
        fig.savefig(path, dpi=120, bbox_inches="tight")
        self.tensorboard.add_figure(f"report/{name}", fig, global_step=0, close=True)
        return f"![{caption}]({path.name})\n\n{caption}."

    def close(self) -> None:
        self.tensorboard.close()


def main(argv: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sipit", nargs="+", default=[], help="sipit.json files (several prompt lengths: one each)")
    parser.add_argument("--dlmi", help="dlmi.json")
    parser.add_argument("--robustness", help="robustness.json")
    parser.add_argument("--out", default="docs/report", help="folder for report.md, the PNGs and tensorboard/")
    args = parser.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    sipit, dlmi, robustness = [load(p) for p in args.sipit], load(args.dlmi), load(args.robustness)
    plt = load_pyplot()
    figures = FigureWriter(out, plt) if plt is not None else None
    lines = header(sipit, dlmi, robustness, figures=figures is not None)
    lines += section_a(sipit, figures)
    lines += section_b(dlmi, figures)
    lines += section_robustness(robustness, figures)
    if figures is not None:
        figures.close()
    report = out / "report.md"
    report.write_text("\n".join(lines))
    print(f"report: {report}")
    return report


if __name__ == "__main__":
    main()
