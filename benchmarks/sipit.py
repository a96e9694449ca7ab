"""SIP-It benchmark on the default model (CPU by default).

    python benchmarks/sipit.py [--layers 1 15 30] [--prompts 5] [--brute-positions 3] [--pez-steps 0] [--out runs/bench]

For each layer and prompt kind (natural, random; 20 tokens) it reports exact recovery, seconds per
token (mean, max), candidates tested per token, and the speed-up over brute force (random policy),
which is measured in the same run on a sample of positions (a full brute-force run takes hours).
It also times what each structural idea buys per candidate test: stopping at the layer, the prefix
key/value cache and batched verification, against the reference code's one-candidate full forward.
With `--pez-steps S` it also runs the HardPrompts (PEZ) baseline for S steps on the same prompts and
layers. sipit.json keeps per-prompt seconds (and brute force's per-position seconds) for
benchmarks/report.py.
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import statistics
import time
from pathlib import Path

import torch

from lit_inversion.models import load_model
from lit_inversion.sipit.algorithm import SipItConfig, SipItResult, invert
from lit_inversion.sipit.data import read_prompts
from lit_inversion.sipit.pez import PezConfig, invert_pez
from lit_inversion.sipit.policies import TokenIndex
from lit_inversion.sipit.table import first_position_table
from lit_inversion.states import LayerProbe, expand_cache, resolve_dtype
from lit_inversion.tokens import context_prefix

ROOT = Path(__file__).resolve().parents[1]
# The ranking and precision ideas taken away, against the default SipItConfig() that has all of them.
ABLATIONS = {
    "chains only": SipItConfig(surrogate_rank=0),
    "chains only, float32 chains, batch 64 (session-1 policy)": SipItConfig(surrogate_rank=0, chain_dtype="float32",
                                                                            max_batch_size=64),
}


def hardware() -> str:
    if torch.cuda.is_available():
        return f"{torch.cuda.get_device_name()} (CUDA)"
    return f"CPU {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads"


def per_candidate_costs(loaded, layer: int, ids: list[int], prefix: list[int], batch: int = 64) -> dict[str, float]:
    """Milliseconds per candidate test, adding one idea at a time."""
    t = len(ids) - 1
    candidates = torch.randint(0, loaded.vocab_size, (batch,))
    full = torch.tensor([prefix + ids])

    def timed(fn, repeats: int) -> float:
        fn()
        start = time.perf_counter()
        for _ in range(repeats):
            fn()
        return (time.perf_counter() - start) / repeats * 1000

    model = loaded.model
    costs = {}
    with torch.no_grad():
        costs["reference: full model + vocab head, full prefix, 1 candidate"] = timed(lambda: model(full), 5)
        with LayerProbe(loaded, layer) as probe:
            costs["+ stop at the layer"] = timed(lambda: probe.forward(input_ids=full), 5)
            cache = probe.prefix_cache(prefix + ids[:t])
            one = torch.tensor([[ids[t]]])
            costs["+ prefix KV cache"] = timed(lambda: probe.forward(input_ids=one, cache=expand_cache(cache, 1), start=len(prefix) + t), 10)
            costs[f"+ batched verification ({batch} per forward)"] = timed(
                lambda: probe.forward(input_ids=candidates[:, None], cache=expand_cache(cache, batch), start=len(prefix) + t), 5) / batch
            screen = resolve_dtype("auto", probe.device)
            if screen != torch.float32:  # what the opt-in SipItConfig(screen_dtype="auto") uses here
                with torch.autocast(probe.device.type, dtype=screen):
                    costs[f"+ {str(screen).removeprefix('torch.')} screen ({batch} per forward; opt-in)"] = timed(
                        lambda: probe.forward(input_ids=candidates[:, None], cache=expand_cache(cache, batch), start=len(prefix) + t), 5) / batch
    return costs


def pez_rows(results: list[SipItResult]) -> dict:
    """The PEZ baseline's figures for one layer and prompt kind (every step tests one token per position)."""
    return dict(pez_exact=statistics.mean(float(bool(r.exact_match)) for r in results),
                pez_token_accuracy=statistics.mean(r.token_accuracy for r in results),
                pez_prompt_seconds=[r.seconds for r in results],
                pez_candidates=statistics.mean(r.candidates_tested[0] for r in results))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--layers", type=int, nargs="+", default=[1, 15, 30])
    parser.add_argument("--prompts", type=int, default=5, help="prompts per kind and layer (100 in the shipped sets)")
    parser.add_argument("--length", type=int, default=20, choices=[10, 20, 50])
    parser.add_argument("--brute-positions", type=int, default=3, help="positions per layer timed with brute force")
    parser.add_argument("--ablation-prompts", type=int, default=1,
                        help="prompts per kind and layer also run with chains only and float32 (the session-1 policy)")
    parser.add_argument("--pez-steps", type=int, default=0, help="also run the PEZ baseline for this many steps (0: off)")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--out", default="runs/bench-sipit")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    loaded = load_model(args.model)
    prefix = context_prefix(loaded.bos_id, True)
    kinds = {
        "natural": read_prompts(ROOT / f"data/sipit_natural_{args.length}.txt", loaded.tokenizer, loaded.vocab_size),
        "random": read_prompts(ROOT / f"data/sipit_random_{args.length}.jsonl", loaded.tokenizer, loaded.vocab_size),
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows, costs = [], {}
    print(f"SIP-It benchmark | model {args.model} | {hardware()} | torch {torch.__version__}", flush=True)
    for layer in args.layers:
        with LayerProbe(loaded, layer) as probe:
            start = time.perf_counter()
            table = first_position_table(probe, prefix)
            table_seconds = time.perf_counter() - start
            table = TokenIndex(probe.embedding.weight, table)  # built once per layer, as the Lightning module does
            guided_per_token = []
            for kind, prompts in kinds.items():
                per_token, tested, exact, token_accuracy, prompt_seconds, pez = [], [], [], [], [], []
                for prompt_id, ids in prompts[: args.prompts]:
                    states = probe.states(ids, prefix)
                    r = invert(probe, states, prefix, SipItConfig(), true_ids=ids, table=table)
                    exact.append(bool(r.exact_match))
                    token_accuracy.append(r.token_accuracy)
                    prompt_seconds.append(r.seconds)
                    per_token += r.position_seconds
                    tested += r.candidates_tested
                    print(f"  layer {layer} {kind} {prompt_id}: exact={r.exact_match} {r.seconds:.1f}s "
                          f"{statistics.mean(r.candidates_tested):.0f} cand/token", flush=True)
                    if args.pez_steps:
                        p = invert_pez(probe, states, prefix, PezConfig(num_steps=args.pez_steps), true_ids=ids)
                        pez.append(p)
                        print(f"  layer {layer} {kind} {prompt_id} PEZ: exact={p.exact_match} "
                              f"token accuracy={p.token_accuracy:.0%} {p.seconds:.1f}s", flush=True)
                # Ablation on the same prompts: what the surrogate and the bf16 screen/chains buy.
                n = args.ablation_prompts
                n_tokens = sum(len(ids) for _, ids in prompts[:n])
                ablation = {"default": dict(s_per_token=sum(prompt_seconds[:n]) / max(1, n_tokens),
                                            candidates=sum(tested[:n_tokens]) / max(1, n_tokens))}
                for name, config in ABLATIONS.items() if n else ():
                    seconds, cands, tokens = 0.0, 0, 0
                    for prompt_id, ids in prompts[: args.ablation_prompts]:
                        r = invert(probe, probe.states(ids, prefix), prefix, config, true_ids=ids, table=table)
                        assert r.exact_match, f"{name} failed on {prompt_id}"
                        seconds, cands, tokens = seconds + r.seconds, cands + sum(r.candidates_tested), tokens + len(ids)
                    ablation[name] = dict(s_per_token=seconds / max(1, tokens), candidates=cands / max(1, tokens))
                    print(f"  layer {layer} {kind} ablation {name}: {ablation[name]['s_per_token']:.2f} s/token "
                          f"{ablation[name]['candidates']:.0f} cand/token", flush=True)
                guided_per_token += per_token
                rows.append(dict(layer=layer, kind=kind, prompts=len(exact), exact=sum(exact) / len(exact),
                                 mean_s_per_token=statistics.mean(per_token), max_s_per_token=max(per_token),
                                 mean_candidates=statistics.mean(tested), max_candidates=max(tested),
                                 table_seconds=table_seconds, token_accuracy=statistics.mean(token_accuracy),
                                 prompt_seconds=prompt_seconds, ablation=ablation))
                if pez:
                    rows[-1].update(pez_rows(pez))
            # Brute force on a sample of positions (true prefix given), not on the first one.
            brute_seconds, brute_tested = [], []  # per sampled position
            g = torch.Generator().manual_seed(layer)
            sample = [kinds["natural"][i % len(kinds["natural"])][1] for i in range(args.brute_positions)]
            for i, ids in enumerate(sample):
                t = int(torch.randint(1, len(ids), (1,), generator=g))
                states = probe.states(ids, prefix)
                r = invert(probe, states[t:t + 1], prefix + ids[:t], SipItConfig(policy="random", seed=i), true_ids=ids[t:t + 1])
                assert r.exact_match
                brute_seconds.append(r.seconds)
                brute_tested.append(r.candidates_tested[0])
            for row in rows:
                if row["layer"] == layer and brute_seconds:
                    row["brute_s_per_token"] = statistics.mean(brute_seconds)
                    row["brute_candidates"] = statistics.mean(brute_tested)
                    row["brute_position_seconds"] = brute_seconds
                    row["speedup_vs_brute"] = statistics.mean(brute_seconds) / row["mean_s_per_token"]
        costs[layer] = per_candidate_costs(loaded, layer, kinds["natural"][0][1], prefix)
    print(f"\n### SIP-It, {args.model}, {args.length}-token prompts, {hardware()}\n")
    print("| layer | prompts | exact | s/token mean | s/token max | candidates/token mean (max) | brute force s/token (sampled) | speed-up vs brute force |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        brute = (f"{r['brute_s_per_token']:.1f} ({r['brute_candidates']:.0f} candidates, {args.brute_positions} positions) | "
                 f"{r['speedup_vs_brute']:.0f}x" if "brute_s_per_token" in r else "not run | –")
        print(f"| {r['layer']} | {r['prompts']} {r['kind']} | {r['exact']:.0%} | {r['mean_s_per_token']:.2f} | "
              f"{r['max_s_per_token']:.2f} | {r['mean_candidates']:.0f} ({r['max_candidates']}) | {brute} |")
    print("\nFirst-position table build (once per model and layer, cached): " +
          ", ".join(f"layer {r['layer']}: {r['table_seconds']:.1f}s" for r in rows if r["kind"] == "natural"))
    print("\n| per candidate test (ms) | " + " | ".join(f"layer {layer}" for layer in costs) + " |")
    print("|---|" + "---|" * len(costs))
    for name in next(iter(costs.values())):
        base = [c[next(iter(c))] for c in costs.values()]
        cells = [f"{c[name]:.2f} ({b / c[name]:.0f}x)" for c, b in zip(costs.values(), base)]
        print(f"| {name} | " + " | ".join(cells) + " |")
    if args.ablation_prompts:
        print(f"\n| layer | kind ({args.ablation_prompts} prompt(s)) | default | " + " | ".join(ABLATIONS) + " |")
        print("|---|---|---|" + "---|" * len(ABLATIONS))
        for r in rows:
            base = r["ablation"]["default"]["s_per_token"]
            cells = [f"{a['s_per_token']:.2f} s/token, {a['candidates']:.0f} cand ({a['s_per_token'] / base:.1f}x)"
                     for a in r["ablation"].values()]
            print(f"| {r['layer']} | {r['kind']} | " + " | ".join(cells) + " |")
    if args.pez_steps:
        print(f"\n| layer | prompts | PEZ exact | PEZ token accuracy | PEZ s/prompt ({args.pez_steps} steps) |")
        print("|---|---|---|---|---|")
        for r in rows:
            print(f"| {r['layer']} | {r['prompts']} {r['kind']} | {r['pez_exact']:.0%} | {r['pez_token_accuracy']:.0%} | "
                  f"{statistics.mean(r['pez_prompt_seconds']):.1f} |")
    run = dict(hardware=hardware(), model=args.model, torch=torch.__version__,
               date=datetime.datetime.now().isoformat(timespec="seconds"), length=args.length, prompts=args.prompts,
               brute_positions=args.brute_positions, pez_steps=args.pez_steps)
    (out / "sipit.json").write_text(json.dumps({**run, "rows": rows, "costs": costs}, indent=1))


if __name__ == "__main__":
    main()
