"""SIP-It's memory beyond the model's weights: peak host (or GPU) memory while a layer's index is built
and prompts are inverted, against the weights' own size, and each [V, d]-sized piece by formula so
that the figure extrapolates to larger models.

    python benchmarks/memory.py --layer 15 --prompts 2 --length 12 --threads 2 --out docs/results/data/sipit_memory.json

The index is built from the cached table and token map (built first, outside the measurement), as
in every run after the first at a layer.
"""

from __future__ import annotations

import argparse
import json
import sys
import threading
import time
from pathlib import Path

import psutil
import torch

if __package__ in (None, ""):  # run as a script: make the repo root importable for benchmarks.common
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.common import hardware, run_record
from lit_inversion.models import DEFAULT_MODEL, load_model
from lit_inversion.sipit.algorithm import SipItConfig, invert
from lit_inversion.sipit.index import build_index
import lit_inversion.sipit.search as _search
from lit_inversion.states import LayerProbe
from lit_inversion.tokens import context_prefix


class PeakMemory:
    """Peak resident memory (CPU, sampled every 5 ms) or peak allocated CUDA memory, above a baseline."""

    def __init__(self, device: torch.device):
        self.device, self.process = device, psutil.Process()
        self.peak = self.base = 0
        self._stop = threading.Event()

    def _now(self) -> int:
        return torch.cuda.memory_allocated(self.device) if self.device.type == "cuda" else self.process.memory_info().rss

    def _sample(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self._now())
            time.sleep(0.005)

    def __enter__(self) -> "PeakMemory":
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        self.base = self.peak = self._now()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        if self.device.type == "cuda":
            self.peak = torch.cuda.max_memory_allocated(self.device)

    @property
    def extra(self) -> int:
        return self.peak - self.base


def on_paper(vocab: int, d: int, weights: int) -> dict:
    """SIP-It's [V, d]-sized memory (float32 bytes): the bf16 table as loaded, its float32 copy, the
    surrogate's features and the verified states kept at one position, against the weights."""
    pieces = {"table_bf16_loaded_then_freed": 2 * vocab * d, "table_float32": 4 * vocab * d,
              "features_chunk": 4 * 8192 * 2 * d, "surrogate_states": 4 * getattr(_search, "SURROGATE_ROWS", vocab) * d,
              "norms_and_features": 4 * vocab * (4 + 128)}
    peak = pieces["table_float32"] + pieces["table_bf16_loaded_then_freed"] + pieces["norms_and_features"] \
        + max(pieces["features_chunk"], pieces["surrogate_states"])
    return {"vocab": vocab, "hidden": d, "weights_bytes": weights, "pieces_bytes": pieces, "peak_extra_bytes": peak,
            "peak_over_weights": round((weights + peak) / weights, 3)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default=DEFAULT_MODEL)
    parser.add_argument("--layer", type=int, default=15)
    parser.add_argument("--prompts", type=int, default=2)
    parser.add_argument("--length", type=int, default=12)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    loaded = load_model(args.model, device=device)
    weights = sum(p.numel() * p.element_size() for p in loaded.model.parameters())
    probe = LayerProbe(loaded, args.layer)
    prefix = context_prefix(loaded.bos_id, True)
    config = SipItConfig()
    build_index(probe, prefix, config)  # builds and caches the table and map once, outside the measurement
    generator = torch.Generator(device="cpu").manual_seed(7)
    prompts = [torch.randint(0, loaded.vocab_size, (args.length,), generator=generator, device="cpu").tolist()
               for _ in range(args.prompts)]
    targets = [probe.states(p, prefix) for p in prompts]
    exact = 0
    with PeakMemory(device) as memory:
        index = build_index(probe, prefix, config)
        index.features(config.surrogate_rank)
        for ids, states in zip(prompts, targets):
            exact += invert(probe, states, prefix, config, true_ids=ids, table=index).exact_match
    measured = {"model": args.model, "layer": args.layer, "device": hardware(), "weights_bytes": weights,
                "peak_extra_bytes": memory.extra, "peak_over_weights": round((weights + memory.extra) / weights, 3),
                "prompts": args.prompts, "length": args.length, "exact": exact,
                "date": time.strftime("%Y-%m-%d")}
    report = {**run_record(), "measured": measured,
              "on_paper": [on_paper(loaded.vocab_size, loaded.hidden_size, weights),
                           on_paper(128256, 4096, 4 * 8_030_261_248)]}  # Llama-3-8B in float32
    print(f"{args.model} layer {args.layer} on {hardware()}: weights {weights / 2**20:.0f} MiB, SIP-It's peak "
          f"extra {memory.extra / 2**20:.0f} MiB ({measured['peak_over_weights']}x the weights in all), "
          f"{exact}/{args.prompts} exact")
    for row in report["on_paper"]:
        print(f"on paper |V| = {row['vocab']}, d = {row['hidden']}: extra {row['peak_extra_bytes'] / 2**30:.2f} GiB "
              f"over {row['weights_bytes'] / 2**30:.1f} GiB of weights ({row['peak_over_weights']}x)")
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
