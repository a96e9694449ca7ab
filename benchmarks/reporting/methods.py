"""How the output-inversion methods are named and ordered on the pages."""

from __future__ import annotations

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


def methods_of(rows: list[dict]) -> list[str]:
    """The known methods in METHOD_NAMES order, then the others (ablation variants) in the order they ran."""
    present = list(dict.fromkeys(r["method"] for r in rows))
    return [m for m in METHOD_NAMES if m in present] + [m for m in present if m not in METHOD_NAMES]


def method_name(method: str) -> str:
    return METHOD_NAMES.get(method, method)
