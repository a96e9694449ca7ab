"""The benchmark pages in docs/results/: Markdown tables and PNG figures generated from the benchmark JSON.

    python benchmarks/report.py                      # docs/results/*.md and PNGs from docs/results/data/*.json
    python benchmarks/report.py runs/bench-sipit/sipit.json runs/bench-dlmi/dlmi.json --out runs/pages

Nothing is measured or typed in here: every number comes from the JSON files that benchmarks/sipit.py,
dlmi.py, robustness.py, memory.py, capture.py and precision.py write (each file's kind is read from its
shape), and every table's caption (or, in the index, every row) names the command, and the commit, that
the JSON records for the run behind it. The output depends on the JSON alone (no clock, no file times,
fixed order and number formats): `tests/test_report.py` checks that the committed pages are exactly what
this script writes from the committed JSON, so a page edited by hand, or not regenerated, fails it.
Pages, each written only when it has an input: index.md (every run), sipit.md (Table A / Figure A: SIP-It
vs brute force vs HardPrompts; per-candidate costs; ranking ablation; reference loop; low-precision
captures), dlmi.md (Table B / Figures B and C: DLMI and the output-inversion baselines; throughput; step
cost), robustness.md, memory.md, precision.md. With the default inputs and --out, also README.md's headline
tables (between its `<!-- results: ... -->` markers; see readme_block).
Figures need matplotlib (`pip install lit-inversion[report]`). Without it the pages are written all the
same (they name their PNGs) and only the PNGs are not redrawn. Each figure is also logged to TensorBoard
(--tensorboard).
"""

from __future__ import annotations

import argparse
import json
import math
import re
import statistics
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "docs" / "results"
NOT_SET = "not recorded"

# Bar and line order, and how each method is named on the pages.
METHOD_NAMES = {
    "paper": "DLMI (paper's method)",
    "dlmi": "DLMI (lit-inversion)",
    "dlmi-repeat": "DLMI, repeat-target seed",
    "gbda": "GBDA",
    "reinforce": "REINFORCE",
    "gcg": "GCG",
    "gcg-scaled": "GCG (nanoGCG defaults, width scaled)",
    "gcg-nano": "GCG (nanoGCG defaults, width 512)",
    "null": "null prompt (no optimisation)",
    "dlmi-dedupe": "DLMI + Faster-GCG dedupe (refine_dedupe)",
    "dlmi-merge": "DLMI + I-GCG merge (refine_merge 4)",
    "dlmi-buffer": "DLMI + ACG buffer (refine_buffer 16)",
    "dlmi-momentum": "DLMI + MAC momentum (refine_momentum 0.5)",
    "dlmi-adc": "DLMI after ADC (relaxed_method adc, 128 steps)",
    "dlmi-beast": "DLMI from a BEAST beam (beam_positions 4)",
    "dlmi-merge-beast": "DLMI + merge, from a BEAST beam",
}
# Methods with a temperature worth plotting: GCG is discrete (tau 0), REINFORCE samples softmax(Z) (tau 1).
TAU_METHODS = ("paper", "dlmi", "dlmi-repeat", "gbda")

# page: (title, what it holds, the kinds of JSON on it)
PAGES = {
    "sipit.md": ("SIP-It: hidden states to prompt", "SIP-It vs brute force vs HardPrompts (PEZ), per-candidate "
                 "costs, ranking ablation, low-precision captures", ("sipit", "capture")),
    "dlmi.md": ("DLMI: output to prompt", "DLMI and the output-inversion baselines (GCG, GBDA, REINFORCE), "
                "budget curves, ablations, throughput, step cost",
                ("dlmi-budget", "dlmi", "dlmi-throughput", "dlmi-step-cost")),
    "robustness.md": ("SIP-It on noisy and rounded states", "token recovery against Gaussian noise and rounding",
                      ("robustness",)),
    "memory.md": ("SIP-It's memory", "peak memory beyond the weights, measured and on paper", ("memory",)),
    "precision.md": ("bf16 against float32", "what bf16 costs or gains, both methods", ("precision",)),
}
WRITER = {"sipit": "sipit.py", "capture": "capture.py", "dlmi": "dlmi.py", "dlmi-throughput": "dlmi.py --throughput",
          "dlmi-budget": "dlmi.py --budgets",
          "dlmi-step-cost": "dlmi.py --step-cost", "robustness": "robustness.py", "memory": "memory.py",
          "precision": "precision.py"}


# ----- inputs -------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Run:
    """One run of a benchmark script: what reproduces it, and where and when it ran."""

    command: str | None
    commit: str | None
    date: str
    hardware: str
    model: str

    def provenance(self) -> str:
        command = f"`{self.command}`" if self.command else f"command {NOT_SET}"
        at = f" at commit `{self.commit}`" if self.commit else ""
        return f"{command}{at} ({self.model}, {self.hardware}, {self.date})"


@dataclass
class Source:
    """One benchmark JSON file, what kind of run wrote it, and the runs behind it (several when merged)."""

    path: Path
    data: dict[str, Any]
    kind: str

    @property
    def name(self) -> str:
        """The path shown on the pages: relative to the repository, else the bare file name (never machine-specific)."""
        path = self.path.resolve()
        return path.relative_to(ROOT).as_posix() if path.is_relative_to(ROOT) else path.name

    @property
    def stem(self) -> str:
        return self.path.stem

    @property
    def rows(self) -> list[dict]:
        return self.data.get("rows", [])

    @property
    def runs(self) -> list[Run]:
        d, measured = self.data, self.data.get("measured", {})
        hardware = d.get("hardware") or measured.get("device") or NOT_SET
        model = d.get("model") or measured.get("model") or NOT_SET
        return [Run(r.get("command"), r.get("commit"), r.get("date") or d.get("date") or measured.get("date") or NOT_SET,
                    hardware, model) for r in d.get("runs") or [d]]

    def runs_behind(self, rows: list[dict]) -> list[Run]:
        """The runs that wrote these rows, in order."""
        return [run for i, run in enumerate(self.runs) if any(r.get("run", 0) == i for r in rows)]

    def rows_of(self, run: int) -> list[dict]:
        """The rows one run wrote (a merged JSON numbers its runs in each row's `run`)."""
        return [r for r in self.rows if r.get("run", 0) == run]


def kind_of(data: dict, path: Path) -> str:
    if "measured" in data and "on_paper" in data:
        return "memory"
    first = (data.get("rows") or [{}])[0]
    for kind, keys in (("dlmi-budget", {"budget", "evals", "lead"}), ("sipit", {"mean_s_per_token", "kind"}), ("dlmi-throughput", {"s_per_target_step"}),
                       ("dlmi-step-cost", {"forward_backward"}), ("dlmi", {"honest", "k", "N"}),
                       ("robustness", {"setting", "recovery"}), ("capture", {"verify_in", "certified"}),
                       ("precision", {"method", "dtype"})):
        if keys <= first.keys():
            return kind
    raise SystemExit(f"{path}: not the JSON of a benchmark script this report knows (no rows, or unknown row fields)")


def load_sources(inputs: list[Path]) -> list[Source]:
    """Every JSON named, or inside a folder named, sorted by file name within each folder."""
    files: list[Path] = []
    for path in inputs:
        files += sorted(path.glob("*.json")) if path.is_dir() else [path]
    sources = []
    for path in files:
        data = json.loads(path.read_text())
        sources.append(Source(path, data, kind_of(data, path)))
    return sources


# ----- formatting -------------------------------------------------------------------------------------

def seconds(x: float | None) -> str:
    if x is None or math.isnan(x):
        return "n/a"
    return f"{x:.0f}" if x >= 100 else f"{x:.1f}" if x >= 10 else f"{x:.2f}"


def percent(x: float | None) -> str:
    return "–" if x is None else f"{x:.0%}"


def mebibytes(x: int) -> str:
    return f"{x / 2**20:,.0f}"


def mean_std(values: list[float]) -> tuple[float | None, float | None]:
    if not values:
        return None, None
    return statistics.mean(values), statistics.stdev(values) if len(values) > 1 else None


def table(header: list[str], rows: list[list[str]]) -> list[str]:
    line = lambda cells: "| " + " | ".join(cell.replace("|", "\\|") for cell in cells) + " |"  # noqa: E731
    return [line(header), "|" + "---|" * len(header)] + [line(r) for r in rows]


def captioned(title: str, run: Run | list[Run], header: list[str], rows: list[list[str]]) -> list[str]:
    """A table under its caption line, which names the commands (and commits) that reproduce the whole table."""
    runs = run if isinstance(run, list) else [run]
    return [f"{title}, from {', and '.join(r.provenance() for r in runs)}:", ""] + table(header, rows) + [""]


# ----- figures ------------------------------------------------------------------------------------------

def load_pyplot():
    """matplotlib.pyplot on a file-only backend, or None when the `report` extra is not installed."""
    try:
        import matplotlib
    except ImportError:
        return None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


class Figures:
    """Names each figure on its page whether or not it can be drawn (the pages never depend on matplotlib);
    with matplotlib, saves it as a PNG next to the pages and logs it to TensorBoard."""

    def __init__(self, out: Path, plt, tensorboard: Path | None):
        self.out, self.plt, self.written = out, plt, []
        self.tensorboard = None
        if plt is not None and tensorboard is not None:
            from torch.utils.tensorboard import SummaryWriter

            # The figures are redrawn whole: drop older event files, whose same-tag figures TensorBoard would mix in.
            for stale in tensorboard.glob("events.out.tfevents.*"):
                stale.unlink()
            self.tensorboard = SummaryWriter(str(tensorboard))

    def add(self, name: str, draw: Callable[[Any], Any], caption: str) -> list[str]:
        """Draw `name`.png with `draw(plt)` when matplotlib is there; the Markdown that shows it either way."""
        if self.plt is not None:
            fig = draw(self.plt)
            path = self.out / f"{name}.png"
            fig.savefig(path, dpi=120, bbox_inches="tight", metadata={"Software": None})
            self.written.append(path)
            if self.tensorboard is not None:
                self.tensorboard.add_figure(f"report/{name}", fig, global_step=0, close=False)
            self.plt.close(fig)
        return [f"![{caption}]({name}.png)", "", f"{caption}.", ""]

    def close(self) -> None:
        if self.tensorboard is not None:
            self.tensorboard.close()


# ----- SIP-It: Table A / Figure A, costs, ablation, reference loop ----------------------------------------

def sipit_budget(source: Source) -> str:
    d = source.data
    first_layer = [r for r in source.rows if r["layer"] == source.rows[0]["layer"]]
    parts = [f"{d.get('length', '?')}-token prompts, " + " + ".join(f"{r['prompts']} {r['kind']}" for r in first_layer)
             + " per layer", "SIP-It: whole vocabulary per position (exact)"]
    if d.get("brute_positions"):
        parts.append(f"brute force: {d['brute_positions']} sampled positions per layer")
    if d.get("pez_steps"):
        parts.append(f"PEZ: {d['pez_steps']} steps per prompt")
    return "; ".join(parts)


def table_a_entries(source: Source) -> list[dict]:
    """One entry per layer and method (and prompt kind): the numbers Table A and Figure A show."""
    length = source.data.get("length")
    entries = []
    for layer in sorted({r["layer"] for r in source.rows}):
        rows = [r for r in source.rows if r["layer"] == layer]
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
                                    method=f"HardPrompts (PEZ, {source.data.get('pez_steps', '?')} steps)",
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


def section_sipit(sources: list[Source], figures: Figures) -> list[str]:
    lines = ["## SIP-It vs brute force vs HardPrompts (Table A, Figure A)", "",
             "Exact recovery (every token right), token accuracy, wall time per prompt and per token, and candidate "
             "tests per token, per layer (the SIP-It paper's Table 2, per layer). Brute force (random order, same "
             "batched verifier and KV cache) is timed on sampled positions given the true prefix; its time per prompt "
             "is **extrapolated**: T × the mean per position (± √T × the std). Its 100% is exact by construction (it "
             "may test the whole vocabulary). SIP-It's time excludes the first-position table, built once per model "
             "and layer.", ""]
    all_entries = []
    for source in sources:
        entries = table_a_entries(source)
        all_entries += entries
        rows = [[str(e["length"] or "?"), str(e["layer"]), e["method"], e["count"], percent(e["exact"]),
                 percent(e["token_accuracy"]), time_cell(e), seconds(e["per_token"]), e["candidates"]] for e in entries]
        lines += [f"Budgets: {sipit_budget(source)}. Rows: `{source.name}`.", ""]
        lines += captioned(f"Table A. {source.data.get('length', '?')}-token prompts", source.runs[0],
                           ["prompt tokens", "layer", "method", "prompts", "exact recovery", "token accuracy",
                            "time per prompt (s), mean ± std", "s/token", "candidates per token"], rows)
        if any(e["mean"] is None for e in entries):
            lines += ["n/a: the JSON does not carry per-prompt seconds or the prompt length (written before "
                      "`benchmarks/sipit.py` recorded them); the s/token column still comes from it.", ""]
    if not any("pez_exact" in r for s in sources for r in s.rows):
        lines += ["_No HardPrompts (PEZ) rows: run `benchmarks/sipit.py --pez-steps S` to add them._", ""]
    if any(e["mean"] is not None for e in all_entries):
        lines += figures.add("sipit_time", lambda plt: figure_a(plt, all_entries),
                             "Figure A. Time per prompt against layer")
    for source in sources:
        lines += sipit_costs(source) + sipit_ablation(source) + sipit_reference(source)
    return lines


def sipit_costs(source: Source) -> list[str]:
    costs = source.data.get("costs") or {}
    if not costs:
        return []
    layers = list(costs)
    names = list(costs[layers[0]])
    base = {layer: costs[layer][names[0]] for layer in layers}
    rows = [[name] + [f"{costs[layer][name]:.2f} ({base[layer] / costs[layer][name]:.0f}x)" for layer in layers]
            for name in names]
    return ([f"### What each structural idea buys per candidate test ({source.data.get('length', '?')}-token prompts)",
             "", "Milliseconds per candidate test, adding one idea at a time, and the ratio to the first row.", ""]
            + captioned("Per-candidate cost", source.runs[0],
                        ["per candidate test (ms)"] + [f"layer {layer}" for layer in layers], rows))


def sipit_ablation(source: Source) -> list[str]:
    rows = [r for r in source.rows if len(r.get("ablation", {})) > 1]
    if not rows:
        return []
    names = list(rows[0]["ablation"])
    cells = []
    for r in rows:
        base = r["ablation"]["default"]["s_per_token"]
        cells.append([str(r["layer"]), r["kind"]] + [
            f"{a['s_per_token']:.2f} s, {a['candidates']:.0f} ({a['s_per_token'] / base:.1f}x)" if base else
            f"{a['s_per_token']:.2f} s, {a['candidates']:.0f}" for a in (r["ablation"][n] for n in names)])
    return ([f"### What each ranking source buys ({source.data.get('length', '?')}-token prompts)", "",
             "Seconds and candidates per token on the first prompts of each kind, and the time's ratio to the default.",
             ""] + captioned("Ranking ablation", source.runs[0], ["layer", "kind"] + names, cells))


def sipit_reference(source: Source) -> list[str]:
    reference = {layer: refs for layer, refs in (source.data.get("reference") or {}).items() if refs}
    if not reference:
        return []
    rows = []
    for layer, refs in reference.items():
        cells = "; ".join(f"{r['seconds']:.1f}{'' if r['found'] else ' (not found)'} ({r['candidates']}, {r['kind']})"
                          for r in refs)
        rows.append([str(layer), cells, f"{statistics.mean(r['ours_seconds'] for r in refs):.2f}",
                     reference_speedup(refs)])
    return ([f"### Against the reference loop ({source.data.get('length', '?')}-token prompts)", "",
             "The reference code's loop, re-implemented (one candidate per full forward, the paper's gradient policy), "
             "on sampled positions given the true prefix, against ours at the same positions.", ""]
            + captioned("Reference loop", source.runs[0],
                        ["layer", "reference loop: s (candidates, kind) per position", "ours at the same positions, s",
                         "speed-up"], rows))


def reference_speedup(refs: list[dict]) -> str:
    """The reference loop's mean seconds per position over ours at the same positions."""
    ref_mean = statistics.mean(r["seconds"] for r in refs)
    ours_mean = statistics.mean(r["ours_seconds"] for r in refs)
    bound = "" if all(r["found"] for r in refs) else "≥ "  # a capped position is a lower bound
    return f"{bound}{ref_mean / ours_mean:.0f}x"


def section_capture(sources: list[Source]) -> list[str]:
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


# ----- DLMI: Table B / Figures B and C, throughput, step cost ---------------------------------------------

def methods_of(rows: list[dict]) -> list[str]:
    """The known methods in METHOD_NAMES order, then the others (ablation variants) in the order they ran."""
    present = list(dict.fromkeys(r["method"] for r in rows))
    return [m for m in METHOD_NAMES if m in present] + [m for m in present if m not in METHOD_NAMES]


def method_name(method: str) -> str:
    return METHOD_NAMES.get(method, method)


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


def figure_budget(plt, rows: list[dict], kind: str):
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


def section_throughput(source: Source) -> list[str]:
    rows = []
    for r in source.rows:
        base = next(b for b in source.rows if b["N"] == r["N"] and b["method"] == r["method"])
        rows.append([str(r["N"]), method_name(r["method"]), str(r["batch_size"]), f"{r['wall']:.1f}",
                     str(r["target_steps"]), f"{r['s_per_target_step']:.2f}",
                     f"{base['s_per_target_step'] / r['s_per_target_step']:.2f}x"])
    return ([f"## Throughput by batch size (`{source.name}`)", "",
             "The same targets through the job's pool of slots (a batch size is a number of slots, a freed slot "
             "refilled at once): seconds per target-step against the first batch size of the run.", ""]
            + captioned("Throughput", source.runs[0],
                        ["N", "method", "slots", "wall (s)", "target-steps", "s per target-step", "vs the first"], rows))


def section_step_cost(source: Source) -> list[str]:
    rows = [[str(r["N"]), r["method"], r["relaxation"], str(r["rows"]), f"{r['forward_backward']:.3f}",
             f"{r['step']:.3f}", f"{r['ratio']:.2f}x", "–" if r["model_share"] is None else f"{r['model_share']:.0%}",
             f"{r['check']:.2f}"] for r in source.rows]
    vocab = source.data.get("vocab_size")
    return ([f"## A step against the model's own forward and backward (`{source.name}`)", ""]
            + ([f"|V| = {vocab:,}, M = {source.data.get('M', '?')}.", ""] if vocab else [])
            + captioned("Step cost", source.runs[0],
                        ["N", "method", "relaxation", "rows", "model forward+backward (s)", "step (s)",
                         "step / forward+backward", "model calls' share", "honest check (s)"], rows))


def figure_b(plt, rows: list[dict], budget: str):
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


def figure_c(plt, traces: list[dict]):
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


# ----- robustness, memory, precision -----------------------------------------------------------------------

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


def section_memory(source: Source) -> list[str]:
    m, run = source.data["measured"], source.runs[0]
    measured = [[m["model"], str(m["layer"]), m["device"], f"{m['prompts']} × {m['length']} tokens",
                 f"{m['exact']}/{m['prompts']}", mebibytes(m["weights_bytes"]), mebibytes(m["peak_extra_bytes"]),
                 f"{m['peak_over_weights']:.2f}x"]]
    pieces = list(source.data["on_paper"][0]["pieces_bytes"])
    on_paper = [[f"{p['vocab']:,}", f"{p['hidden']:,}", mebibytes(p["weights_bytes"])]
                + [mebibytes(p["pieces_bytes"][name]) for name in pieces]
                + [mebibytes(p["peak_extra_bytes"]), f"{p['peak_over_weights']:.2f}x"] for p in source.data["on_paper"]]
    return ([f"## Peak memory beyond the weights (`{source.name}`)", "",
             "Peak resident (or CUDA-allocated) memory while a layer's index is built from the cache and prompts are "
             "inverted, above the process's memory with the model loaded; MiB.", ""]
            + captioned("Measured", run, ["model", "layer", "device", "prompts", "exact", "weights (MiB)",
                                          "peak extra (MiB)", "weights + peak extra, over the weights"], measured)
            + ["SIP-It's [V, d]-sized pieces by formula (float32 bytes, MiB), for this model and for an 8B Llama in "
               "float32 (|V| = 128,256, d = 4,096); the same run computed both.", ""]
            + captioned("On paper", run, ["vocabulary", "d", "weights (MiB)"]
                        + [f"{name.replace('_', ' ')} (MiB)" for name in pieces]
                        + ["peak extra (MiB)", "weights + peak extra, over the weights"], on_paper))


def section_precision(source: Source) -> list[str]:
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


# ----- pages ----------------------------------------------------------------------------------------------

GENERATED = ("Generated by `python benchmarks/report.py` from the benchmark JSON; do not edit: "
             "`tests/test_report.py` fails when a page differs from what the script writes.")


def page_lines(page: str, sources: list[Source], figures: Figures) -> list[str]:
    title, _, _ = PAGES[page]
    lines = [f"# {title}", "", GENERATED + " Each table's caption names the command that reproduces it, and the "
             "model, hardware and date of that run.", ""]
    of = lambda kind: [s for s in sources if s.kind == kind]  # noqa: E731
    if page == "sipit.md":
        lines += section_sipit(of("sipit"), figures) if of("sipit") else []
        lines += section_capture(of("capture")) if of("capture") else []
    elif page == "dlmi.md":
        for source in of("dlmi-budget"):
            lines += section_budget(source, figures)
        if of("dlmi"):
            lines += ["Table B: honest LCS ratio (greedy decode from the discrete prompt, scored against the target), "
                      "exact matches, steps and seconds to success (mean over the exact matches; seconds = steps × the "
                      "method's seconds per step), the paper-style soft LCS, seconds per step, and how much of the "
                      "target the prompt itself contains (prompt/target LCS), per prompt length N, method and "
                      "difficulty k (mean over the targets).", ""]
        for source in of("dlmi"):
            lines += section_dlmi(source, figures)
        for source in of("dlmi-throughput"):
            lines += section_throughput(source)
        for source in of("dlmi-step-cost"):
            lines += section_step_cost(source)
    elif page == "robustness.md":
        for source in of("robustness"):
            lines += section_robustness(source, figures)
    elif page == "memory.md":
        for source in of("memory"):
            lines += section_memory(source)
    elif page == "precision.md":
        for source in of("precision"):
            lines += section_precision(source)
    return lines


def index_lines(sources: list[Source], pages: list[str]) -> list[str]:
    lines = ["# Benchmark results", "", GENERATED, "",
             "A command \"at commit C\" ran the code of commit C (`git checkout C`, then the command): the scripts' "
             "flags and the measured code may have changed since. A run that wrote no date says when its JSON was "
             "committed instead.", ""]
    if not sources:
        return lines + ["No benchmark JSON given."]
    lines += table(["page", "what"], [[f"[{PAGES[p][0]}]({p})", PAGES[p][1]] for p in pages]) + [""]
    lines += ["## Runs", "", "Every JSON behind the pages, one row per run; each row names the command that "
              "reproduces it.", ""]
    page_of = {kind: page for page, (_, _, kinds) in PAGES.items() for kind in kinds}
    rows = [[f"`{s.name}`", f"[{page_of[s.kind]}]({page_of[s.kind]})", f"`benchmarks/{WRITER[s.kind]}`", run.model,
             run.hardware, run.date, (f"`{run.command}`" if run.command else f"command {NOT_SET}")
             + (f" at commit `{run.commit}`" if run.commit else "")]
            for s in sources for run in s.runs]
    return lines + table(["JSON", "page", "written by", "model", "hardware", "date", "command"], rows)


README = ROOT / "README.md"
README_BEGIN = "<!-- results: generated by python benchmarks/report.py from docs/results/data; do not edit -->"
README_END = "<!-- end of generated results -->"


def readme_sipit(sources: list[Source]) -> list[str]:
    """SIP-It per layer (the prompt kinds pooled) from sipit_heldout.json, else sipit_20.json."""
    found = ([s for s in sources if s.kind == "sipit" and s.stem == "sipit_heldout"]
             or [s for s in sources if s.kind == "sipit" and s.stem == "sipit_20"])
    if not found:
        return []
    source = found[0]
    reference = {str(layer): refs for layer, refs in (source.data.get("reference") or {}).items() if refs}
    rows = []
    for layer in dict.fromkeys(r["layer"] for r in source.rows):
        rs = [r for r in source.rows if r["layer"] == layer]
        prompts = sum(r["prompts"] for r in rs)
        weighted = lambda key: sum(r[key] * r["prompts"] for r in rs) / prompts  # noqa: E731
        row = [str(layer), f"{sum(round(r['exact'] * r['prompts']) for r in rs)}/{prompts}",
               f"{weighted('mean_s_per_token'):.2f}",
               f"{weighted('mean_candidates'):.0f} ({max(r['max_candidates'] for r in rs)})"]
        rows.append(row + ([reference_speedup(reference[str(layer)]) if str(layer) in reference else "–"]
                           if reference else []))
    first = [r for r in source.rows if r["layer"] == source.rows[0]["layer"]]
    kinds = " + ".join(f"{r['prompts']} {r['kind']}" for r in first)
    return captioned(f"SIP-It, {source.data.get('length', '?')}-token prompts ({kinds} per layer, exact = every token "
                     f"right)", source.runs[0],
                     ["layer", "exact", "s/token", "candidates/token, mean (max)"]
                     + (["speed-up over the reference loop"] if reference else []), rows)


def readme_output(sources: list[Source]) -> list[str]:
    """Output inversion per method: at the largest budget of dlmi_budget.json, else dlmi_equal_time.json at N = 20."""
    budget = [s for s in sources if s.kind == "dlmi-budget" and s.stem == "dlmi_budget"]
    if budget:
        source = budget[0]
        top = max(source.data["budgets"])
        _, last = summary_rows(source)
        _, _, summary = budget_summary(source)
        kinds = ", ".join(f"{len({r['id'] for r in last if r['kind'] == k})} {k}"
                          for k in dict.fromkeys(r["kind"] for r in last))
        rows = [row[:4] + row[5:] for row in summary]  # without the seconds: the page has them
        return captioned(f"Output → prompt at {top} candidate evaluations per target ({kinds})", source.runs_behind(last),
                         ["method", "honest LCS", "exact", "lead", "honest LCS vs GCG"], rows)
    equal = [s for s in sources if s.kind == "dlmi" and s.stem == "dlmi_equal_time"]
    if not equal:
        return []
    source = equal[0]
    n20 = [r for r in source.rows if r["N"] == 20]
    if not n20:
        return []
    run = source.runs[n20[0].get("run", 0)]
    ks = ", ".join(map(str, sorted({r["k"] for r in n20})))
    rows = [[method_name(m), f"{statistics.mean(r['honest'] for r in rs):.2f}",
             f"{sum(bool(r['exact']) for r in rs)}/{len(rs)}"]
            for m in methods_of(n20) for rs in [[r for r in n20 if r["method"] == m]]]
    return captioned(f"Output → prompt, {dlmi_budget(source).split(';')[0]}, N = 20, k ∈ {{{ks}}}", run,
                     ["method", "honest LCS", "exact"], rows)


def readme_block(sources: list[Source]) -> str:
    """README's headline tables, between (and with) the markers: SIP-It per layer, and output inversion."""
    return "\n".join([README_BEGIN, ""] + readme_sipit(sources) + readme_output(sources) + [README_END]) + "\n"


def write_readme_block(sources: list[Source]) -> None:
    """Replace README's block (markers included) with readme_block(sources)."""
    text = README.read_text(encoding="utf-8")
    if README_BEGIN not in text or README_END not in text:
        print(f"{README.name}: no results markers, not rewritten", file=sys.stderr)
        return
    head, rest = text.split(README_BEGIN, 1)
    tail = rest.split(README_END, 1)[1].removeprefix("\n")
    new = head + readme_block(sources) + tail
    if new != text:
        README.write_text(new, encoding="utf-8")


def main(argv: list[str] | None = None) -> list[Path]:
    """Write the pages (and, with matplotlib, the figures); return the pages written, index.md first."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("inputs", nargs="*", type=Path, default=[RESULTS / "data"],
                        help="benchmark JSON files, or folders of them (default: docs/results/data)")
    parser.add_argument("--out", type=Path, default=RESULTS, help="folder for the pages and PNGs (default: docs/results)")
    parser.add_argument("--tensorboard", type=Path, default=ROOT / "runs" / "report-tensorboard",
                        help="also log each figure to TensorBoard here (default: runs/report-tensorboard)")
    args = parser.parse_args(argv)
    sources = load_sources(args.inputs)
    args.out.mkdir(parents=True, exist_ok=True)
    plt = load_pyplot()
    if plt is None:
        print("matplotlib is not installed (pip install lit-inversion[report]): pages only, the PNGs are not redrawn",
              file=sys.stderr)
    figures = Figures(args.out, plt, args.tensorboard)
    kinds = {s.kind for s in sources}
    pages = [page for page, (_, _, page_kinds) in PAGES.items() if kinds & set(page_kinds)]
    written = [args.out / "index.md"]
    written[0].write_text("\n".join(index_lines(sources, pages)).rstrip("\n") + "\n")
    for page in pages:
        path = args.out / page
        path.write_text("\n".join(page_lines(page, sources, figures)).rstrip("\n") + "\n")
        written.append(path)
    figures.close()
    # README's block is the headline of the committed results: only from (and into) docs/results.
    if args.out.resolve() == RESULTS.resolve() and [p.resolve() for p in args.inputs] == [(RESULTS / "data").resolve()]:
        write_readme_block(sources)
    # Without matplotlib the PNGs are not redrawn, so only pages can be told stale then.
    stale = sorted(p.name for p in args.out.glob("*") if p not in written + figures.written
                   and (p.suffix == ".md" or (p.suffix == ".png" and plt is not None)))
    if stale:
        print(f"in {args.out} but not written by this run (delete them if stale): {', '.join(stale)}", file=sys.stderr)
    print(f"pages: {', '.join(p.name for p in written)} in {args.out}")
    return written


if __name__ == "__main__":
    main()
