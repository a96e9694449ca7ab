"""SIP-It (benchmarks/sipit.py): Table A / Figure A, per-candidate costs, ranking ablation, reference loop."""

from __future__ import annotations

import math
import statistics
from typing import Any

from benchmarks.reporting.figures import Figures
from benchmarks.reporting.kind import Kind, rows_with
from benchmarks.reporting.markdown import captioned, percent, seconds
from benchmarks.reporting.sources import Source


def mean_std(values: list[float]) -> tuple[float | None, float | None]:
    if not values:
        return None, None
    return statistics.mean(values), statistics.stdev(values) if len(values) > 1 else None


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


def figure_a(plt: Any, entries: list[dict]) -> Any:
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


def figure_a_lengths(ax: Any, entries: list[dict]) -> None:
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


KIND = Kind(name="sipit", page="sipit.md", writer="sipit.py",
            recognise=rows_with("mean_s_per_token", "kind"), section=section_sipit)
