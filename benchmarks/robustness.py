"""SIP-It on noisy and quantised hidden states (default model, CPU by default).

    python benchmarks/robustness.py [--layers 1 15 30] [--prompts 2] [--budget 512] [--out runs/bench-robustness]

For each layer it measures the minimum pairwise distance Delta between the candidate states at the
first prompt position (all |V| tokens after BOS; nearest pairs re-measured in float32), then inverts
natural 10-token prompts whose states were given Gaussian noise of scale sigma per coordinate, or
rounded to float16, bfloat16 or int8 (per-vector absmax). The robustness argument predicts exact
nearest-candidate decoding while the noise norm stays under Delta / 2, i.e. for
sigma < sigma* = Delta / (2 sqrt(d)); sigma is reported as a multiple of sigma*. Each position may
test `--budget` candidates (noisy states never verify, so the search always spends it) and returns
the nearest one with its distance and confidence. Writes robustness.json and prints a markdown
table; `benchmarks/report.py robustness.json --out DIR` draws the curve.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from pathlib import Path

import torch

if __package__ in (None, ""):  # run as a script: make the repo root importable for benchmarks.common
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.common import hardware, run_record

from lit_inversion.models import load_model
from lit_inversion.sipit.algorithm import SipItConfig, invert
from lit_inversion.sipit.data import read_prompts
from lit_inversion.sipit.table import first_position_table
from lit_inversion.states import LayerProbe, expand_cache
from lit_inversion.tokens import context_prefix

ROOT = Path(__file__).resolve().parents[1]
SIGMA_MULTIPLES = [0.5, 4, 32, 256, 1024, 4096]
ROUNDINGS = ["float16", "bfloat16", "int8"]


@torch.no_grad()
def min_pairwise_distance(probe: LayerProbe, prefix: list[int], table: torch.Tensor, recheck: int = 64) -> float:
    """Smallest distance between two tokens' states at the first position, in float32.

    Tokens with identical embeddings (a few untrained special tokens) have identical states at
    every layer: no method can tell them apart, so each such group counts once. The cached table is
    float16, so its nearest pairs are found there and re-measured in float32.
    """
    embedding = probe.embedding.weight.detach()
    _, group = torch.unique(embedding, dim=0, return_inverse=True)
    first = torch.full((int(group.max()) + 1,), len(group), dtype=torch.long).scatter_reduce(
        0, group, torch.arange(len(group)), "amin")
    keep = first.sort().values
    rows = table.float()[keep]
    best: list[tuple[float, int, int]] = []
    squared = (rows * rows).sum(1)
    for start in range(0, len(rows), 2048):
        block = rows[start : start + 2048]
        d2 = squared[start : start + 2048, None] + squared[None] - 2 * block @ rows.T
        d2[torch.arange(len(block)), torch.arange(start, start + len(block))] = math.inf
        values, cols = d2.min(1)
        for i in values.topk(min(recheck, len(values)), largest=False).indices.tolist():
            best.append((float(values[i]), int(keep[start + i]), int(keep[int(cols[i])])))
    best.sort()
    pairs = best[:recheck]
    ids = torch.tensor(sorted({t for _, a, b in pairs for t in (a, b)}))
    cache = probe.prefix_cache(prefix)
    with torch.autocast(probe.device.type, enabled=False):
        states = probe.forward(input_ids=ids[:, None], cache=expand_cache(cache, len(ids)), start=len(prefix))[:, 0]
    where = {int(t): i for i, t in enumerate(ids)}
    return min(float((states[where[a]] - states[where[b]]).norm()) for _, a, b in pairs)


def quantise(states: torch.Tensor, kind: str) -> torch.Tensor:
    if kind == "int8":
        scale = states.abs().amax(-1, keepdim=True).clamp(min=1e-12) / 127
        return (states / scale).round().clamp(-127, 127) * scale
    return states.to(getattr(torch, kind)).float()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--layers", type=int, nargs="+", default=[1, 15, 30])
    parser.add_argument("--prompts", type=int, default=2, help="natural 10-token prompts per setting")
    parser.add_argument("--budget", type=int, default=512, help="candidates per position")
    parser.add_argument("--sigmas", type=float, nargs="+", default=SIGMA_MULTIPLES, help="multiples of sigma*")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="runs/bench-robustness")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    loaded = load_model(args.model)
    prompts = [ids for _, ids in read_prompts(ROOT / "data/sipit_natural_10.txt", loaded.tokenizer, loaded.vocab_size)]
    prompts = prompts[: args.prompts]
    prefix = context_prefix(loaded.bos_id, True)
    config = SipItConfig(max_candidates=args.budget)
    print(f"SIP-It robustness | model {args.model} | {hardware()} | torch {torch.__version__} | "
          f"{len(prompts)} prompts x 10 tokens, budget {args.budget} candidates/position", flush=True)
    rows = []
    for layer in args.layers:
        with LayerProbe(loaded, layer) as probe:
            table = first_position_table(probe, prefix)
            delta = min_pairwise_distance(probe, prefix, table)
            d = loaded.hidden_size
            sigma_star = delta / (2 * math.sqrt(d))
            clean = [probe.states(ids, prefix) for ids in prompts]
            norm = statistics.mean(float(s.norm(dim=-1).mean()) for s in clean)
            if layer == args.layers[0]:
                groups = torch.unique(probe.embedding.weight.detach(), dim=0, return_counts=True)[1]
                print(f"{int(groups[groups > 1].sum())} tokens share their embedding with another token "
                      f"({int((groups > 1).sum())} groups): indistinguishable at every layer, counted once", flush=True)
            print(f"layer {layer}: Delta = {delta:.4g}, sigma* = {sigma_star:.4g}, mean state norm {norm:.4g}", flush=True)
            settings = [("clean", 0.0, None)] + [(f"sigma {m:g} sigma*", m, None) for m in args.sigmas]
            settings += [(f"round {kind}", None, kind) for kind in ROUNDINGS]
            g = torch.Generator().manual_seed(args.seed)
            for name, multiple, kind in settings:
                hits = tokens = 0
                confidence_right, confidence_wrong, noise_norms, seconds = [], [], [], 0.0
                for ids, states in zip(prompts, clean):
                    if kind is not None:
                        given = quantise(states, kind)
                    else:
                        given = states + (multiple or 0.0) * sigma_star * torch.randn(states.shape, generator=g)
                    noise_norms.append(float((given - states).norm(dim=-1).mean()))
                    start = time.perf_counter()
                    result = invert(probe, given, prefix, config, true_ids=ids, table=table)
                    seconds += time.perf_counter() - start
                    for got, true, conf in zip(result.recovered_ids, ids, result.confidence):
                        hits += got == true
                        (confidence_right if got == true else confidence_wrong).append(conf)
                    tokens += len(ids)
                row = dict(layer=layer, setting=name, sigma_multiple=multiple, rounding=kind, delta=delta,
                           sigma_star=sigma_star, noise_norm=statistics.mean(noise_norms), recovery=hits / tokens,
                           confidence_right=statistics.mean(confidence_right) if confidence_right else None,
                           confidence_wrong=statistics.mean(confidence_wrong) if confidence_wrong else None,
                           seconds_per_token=seconds / tokens)
                rows.append(row)
                print(f"  {name:18s} noise norm {row['noise_norm']:9.4g} ({row['noise_norm'] / delta:7.3g} Delta)  "
                      f"recovery {row['recovery']:6.1%}  {row['seconds_per_token']:.2f} s/token", flush=True)
    print(f"\n### SIP-It on noisy / quantised states, {args.model}, {hardware()}, budget {args.budget}\n")
    print("| layer | Delta | setting | noise norm / Delta | token recovery | confidence (right / wrong) |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        conf = "/".join("-" if c is None else f"{c:.2f}" for c in (r["confidence_right"], r["confidence_wrong"]))
        print(f"| {r['layer']} | {r['delta']:.3g} | {r['setting']} | {r['noise_norm'] / r['delta']:.3g} | "
              f"{r['recovery']:.0%} | {conf} |")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "robustness.json").write_text(json.dumps({"hardware": hardware(), "model": args.model, **run_record(),
                                                     "budget": args.budget, "rows": rows}, indent=1))
    print(f"table and figure: python benchmarks/report.py {out / 'robustness.json'} --out {out}")


if __name__ == "__main__":
    main()
