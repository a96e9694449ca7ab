"""SIP-It's peak memory, measured and on paper (benchmarks/memory.py)."""

from __future__ import annotations

from benchmarks.reporting.figures import Figures
from benchmarks.reporting.kind import Kind, per_source
from benchmarks.reporting.markdown import captioned
from benchmarks.reporting.sources import Source


def mebibytes(x: int) -> str:
    return f"{x / 2**20:,.0f}"


def section_memory(source: Source, figures: Figures) -> list[str]:
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


def recognise(data: dict) -> bool:
    """benchmarks/memory.py writes no rows: a measurement and the figures on paper."""
    return "measured" in data and "on_paper" in data


KIND = Kind(name="memory", page="memory.md", writer="memory.py",
            recognise=recognise, section=per_source(section_memory))
