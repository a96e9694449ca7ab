"""SIP-It benchmark on the default model (CPU by default).

    python benchmarks/sipit.py [--layers 1 15 30] [--prompts-file F] [--num-prompts 4] [--num-random 2]
                               [--length 12] [--reference-positions 2] [--brute-positions 0] [--out runs/bench]

Prompts: `--num-prompts` sentences from `--prompts-file` (default: benchmarks/heldout_prompts.jsonl,
written for this benchmark, not the shipped data/ sets) plus `--num-random` seeded random-token
prompts, all cut to `--length` tokens. For each layer and prompt kind it reports exact recovery,
seconds per token (mean, max) and candidates tested per token. In the same run it times a faithful
re-implementation of the reference code's loop (one candidate per full forward through every block and
the vocabulary head, no cache; the paper's gradient policy: SGD at learning rate 1 on a continuous
embedding, gradient clipped to norm 1, the nearest unvisited token proposed, a snap back onto the
nearest token every 50 steps, a random start) on `--reference-positions` positions per layer, given the
true prefix, and prints our speed-up over it. Optionally: brute force (random policy, our batched
verifier) on sampled positions, an ablation of the ranking sources, what each structural idea buys per
candidate test, and the HardPrompts (PEZ) baseline. sipit.json keeps the rows, and the command that
reproduces them, for benchmarks/report.py (the pages in docs/results/ read it from docs/results/data/).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

if __package__ in (None, ""):  # run as a script: make the repo root importable for benchmarks.common
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.common import hardware, run_record

from lit_inversion.models import load_model
from lit_inversion.sipit.algorithm import SipItConfig, SipItResult, invert
from lit_inversion.sipit.data import random_prompts, read_prompts
from lit_inversion.sipit.pez import PezConfig, invert_pez
from lit_inversion.sipit.index import build_index
from lit_inversion.sipit.table import first_position_table
from lit_inversion.sipit.token_map import learned_token_map
from lit_inversion.precision import resolve_dtype
from lit_inversion.states import LayerProbe, expand_cache, find_blocks, full_forward
from lit_inversion.tokens import context_prefix

ROOT = Path(__file__).resolve().parents[1]
# The ranking sources taken away, against the default SipItConfig() that has all of them.
ABLATIONS = {
    "no token map": SipItConfig(token_map=False),
    "no LM prior": SipItConfig(lm_prior=False),
    "no token map, no LM prior": SipItConfig(token_map=False, lm_prior=False),
    "no LM prior, chains only": SipItConfig(lm_prior=False, surrogate_rank=0),
}


def fresh_prompts(loaded, prompts_file: str | None, count: int, num_random: int, length: int,
                  seed: int = 1234) -> list[tuple[str, list[int]]]:
    """`count` prompts from a file (default: the held-out sentences in benchmarks/) cut to `length` tokens,
    plus `num_random` seeded random-token prompts of that length."""
    path = prompts_file or ROOT / "benchmarks/heldout_prompts.jsonl"
    prompts = [(i, ids[:length]) for i, ids in read_prompts(path, loaded.tokenizer, loaded.vocab_size)[:count]]
    short = [i for i, ids in prompts if len(ids) < length]
    if short:
        raise SystemExit(f"prompts {short} in {path} have fewer than {length} tokens")
    return prompts + random_prompts(num_random, length, loaded.vocab_size, seed)


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


def reference_position(loaded, layer: int, context: list[int], target: torch.Tensor, seed: int,
                       max_seconds: float) -> dict:
    """The reference code's SIP-It loop at one position (re-implemented; the true prefix is given).

    Every step: one SGD step (lr 1, gradient norm clipped to 1) on a continuous embedding e under the
    mean squared state error, through the full model and vocabulary head on the full sequence (no cache);
    then the unvisited token nearest e (L2, over the whole vocabulary) is verified by another full forward
    on the token ids. Every 50 steps e snaps onto its nearest token's embedding. The state at `layer` is
    read by a hook on that block (the last layer before the final norm, as the reference code has it).
    Accepts within our verifier's float32 tolerance. Stops after `max_seconds` (reported as not found).
    """
    model = loaded.model
    weight = model.get_input_embeddings().weight
    vocab = weight.shape[0]
    captured: list[torch.Tensor] = []
    block = find_blocks(model, loaded.num_layers)[layer - 1]
    hook = block.register_forward_hook(lambda m, a, out: captured.append(out[0] if isinstance(out, tuple) else out))
    tolerance = 1e-4 + 1e-4 * float(target.norm())
    context_embeds = weight[torch.tensor(context)].detach()
    generator = torch.Generator().manual_seed(seed)
    tested = torch.zeros(vocab, dtype=torch.bool)
    e = weight[int(torch.randint(0, vocab, (1,), generator=generator))].detach().clone()
    start, steps, found = time.perf_counter(), 0, False
    try:
        with full_forward(model):  # past the hook of any probe on the same model
            while time.perf_counter() - start < max_seconds and not bool(tested.all()):
                e.requires_grad_(True)
                captured.clear()
                model(inputs_embeds=torch.cat([context_embeds, e[None]])[None])  # logits computed, as in the reference
                loss = ((captured[-1][0, -1].float() - target) ** 2).mean()
                (grad,) = torch.autograd.grad(loss, e)
                with torch.no_grad():
                    e = (e - grad / max(1.0, float(grad.norm()))).detach()
                    distance = ((weight - e) ** 2).sum(-1)
                    if steps and steps % 50 == 0:
                        e = weight[int(distance.argmin())].detach().clone()
                    distance[tested] = torch.inf
                    token = int(distance.argmin())
                    captured.clear()
                    model(torch.tensor([context + [token]]))
                    tested[token] = True
                    steps += 1
                    if float((captured[-1][0, -1].float() - target).norm()) <= tolerance:
                        found = True
                        break
    finally:
        hook.remove()
    return dict(found=found, seconds=time.perf_counter() - start, candidates=steps)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--layers", type=int, nargs="+", default=[1, 15, 30])
    parser.add_argument("--prompts-file", default=None, help=".txt/.jsonl prompts (default benchmarks/heldout_prompts.jsonl)")
    parser.add_argument("--num-prompts", type=int, default=4, help="prompts taken from the file")
    parser.add_argument("--num-random", type=int, default=2, help="seeded random-token prompts")
    parser.add_argument("--random-seed", type=int, default=1234)
    parser.add_argument("--length", type=int, default=12, help="tokens per prompt")
    parser.add_argument("--reference-positions", type=int, default=2,
                        help="positions per layer run with the reference loop (alternately natural and random)")
    parser.add_argument("--reference-seconds", type=float, default=60.0, help="time limit per reference position")
    parser.add_argument("--brute-positions", type=int, default=0, help="positions per layer timed with brute force")
    parser.add_argument("--ablation-prompts", type=int, default=0,
                        help="prompts per kind and layer also run without the LM prior, and with chains only")
    parser.add_argument("--costs", action="store_true", help="also time each structural idea per candidate test")
    parser.add_argument("--pez-steps", type=int, default=0, help="also run the PEZ baseline for this many steps (0: off)")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--out", default="runs/bench-sipit")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    loaded = load_model(args.model)
    prefix = context_prefix(loaded.bos_id, True)
    prompts = fresh_prompts(loaded, args.prompts_file, args.num_prompts, args.num_random, args.length, args.random_seed)
    kinds = {"natural": prompts[: len(prompts) - args.num_random], "random": prompts[len(prompts) - args.num_random:]}
    kinds = {kind: p for kind, p in kinds.items() if p}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows, costs, reference = [], {}, {}
    print(f"SIP-It benchmark | model {args.model} | {hardware()} | torch {torch.__version__}", flush=True)
    for layer in args.layers:
        with LayerProbe(loaded, layer) as probe:
            start = time.perf_counter()
            first_position_table(probe, prefix)
            table_seconds = time.perf_counter() - start
            start = time.perf_counter()
            learned_token_map(probe, prefix)
            map_seconds = time.perf_counter() - start
            print(f"  layer {layer}: first-position table {table_seconds:.1f}s, token map {map_seconds:.1f}s "
                  "(built once per model and layer, then read from the cache)", flush=True)
            table = build_index(probe, prefix, SipItConfig())  # built once per layer, as the Lightning module does
            if SipItConfig().surrogate_rank:
                table.features(SipItConfig().surrogate_rank)  # once per layer, as in a long run
            ours: dict[str, list[float]] = {}  # per-position seconds by prompt, for the reference comparison
            for kind, kind_prompts in kinds.items():
                per_token, tested, exact, token_accuracy, prompt_seconds, pez = [], [], [], [], [], []
                for prompt_id, ids in kind_prompts:
                    states = probe.states(ids, prefix)
                    r = invert(probe, states, prefix, SipItConfig(), true_ids=ids, table=table)
                    ours[prompt_id] = r.position_seconds
                    exact.append(bool(r.exact_match))
                    token_accuracy.append(r.token_accuracy)
                    prompt_seconds.append(r.seconds)
                    per_token += r.position_seconds
                    tested += r.candidates_tested
                    print(f"  layer {layer} {kind} {prompt_id}: exact={r.exact_match} {r.seconds / len(ids):.2f} s/token "
                          f"candidates {r.candidates_tested}", flush=True)
                    if args.pez_steps:
                        p = invert_pez(probe, states, prefix, PezConfig(num_steps=args.pez_steps), true_ids=ids)
                        pez.append(p)
                        print(f"  layer {layer} {kind} {prompt_id} PEZ: exact={p.exact_match} "
                              f"token accuracy={p.token_accuracy:.0%} {p.seconds:.1f}s", flush=True)
                n = args.ablation_prompts
                n_tokens = sum(len(ids) for _, ids in kind_prompts[:n])
                ablation = {"default": dict(s_per_token=sum(prompt_seconds[:n]) / max(1, n_tokens),
                                            candidates=sum(tested[:n_tokens]) / max(1, n_tokens))}
                for name, config in ABLATIONS.items() if n else ():
                    seconds, cands, tokens = 0.0, 0, 0
                    for prompt_id, ids in kind_prompts[:n]:
                        r = invert(probe, probe.states(ids, prefix), prefix, config, true_ids=ids, table=table)
                        assert r.exact_match, f"{name} failed on {prompt_id}"
                        seconds, cands, tokens = seconds + r.seconds, cands + sum(r.candidates_tested), tokens + len(ids)
                    ablation[name] = dict(s_per_token=seconds / max(1, tokens), candidates=cands / max(1, tokens))
                    print(f"  layer {layer} {kind} ablation {name}: {ablation[name]['s_per_token']:.2f} s/token "
                          f"{ablation[name]['candidates']:.0f} candidates/token", flush=True)
                rows.append(dict(layer=layer, kind=kind, prompts=len(exact), exact=sum(exact) / len(exact),
                                 mean_s_per_token=statistics.mean(per_token), max_s_per_token=max(per_token),
                                 mean_candidates=statistics.mean(tested), max_candidates=max(tested),
                                 table_seconds=table_seconds, map_seconds=map_seconds, token_accuracy=statistics.mean(token_accuracy),
                                 prompt_seconds=prompt_seconds, ablation=ablation))
                if pez:
                    rows[-1].update(pez_rows(pez))
            # The reference loop on sampled positions (not the first one), alternately of each kind.
            g = torch.Generator().manual_seed(layer)
            layer_reference = []
            for i in range(args.reference_positions):
                kind = list(kinds)[i % len(kinds)]
                j = (i // len(kinds)) % len(kinds[kind])
                prompt_id, ids = kinds[kind][j]
                t = int(torch.randint(1, len(ids), (1,), generator=g))
                states = probe.states(ids, prefix)
                ref = reference_position(loaded, layer, prefix + ids[:t], states[t], seed=i, max_seconds=args.reference_seconds)
                ours_seconds = ours[prompt_id][t]
                layer_reference.append(dict(prompt=prompt_id, kind=kind, position=t, ours_seconds=ours_seconds, **ref))
                print(f"  layer {layer} reference loop, {prompt_id} position {t}: "
                      f"{'found' if ref['found'] else 'NOT found'} after {ref['candidates']} candidates in "
                      f"{ref['seconds']:.1f}s (ours at that position: {ours_seconds:.2f}s)", flush=True)
            reference[layer] = layer_reference
            # Brute force on a sample of positions (true prefix given), not on the first one.
            brute_seconds, brute_tested = [], []
            for i in range(args.brute_positions):
                ids = prompts[i % len(prompts)][1]
                t = int(torch.randint(1, len(ids), (1,), generator=g))
                states = probe.states(ids, prefix)
                r = invert(probe, states[t:t + 1], prefix + ids[:t], SipItConfig(policy="random", seed=i), true_ids=ids[t:t + 1])
                assert r.exact_match
                brute_seconds.append(r.seconds)
                brute_tested.append(r.candidates_tested[0])
            layer_rows = [row for row in rows if row["layer"] == layer]
            mean_ours = statistics.mean(s for row in layer_rows for s in [row["mean_s_per_token"]] * row["prompts"])
            for row in layer_rows:
                if brute_seconds:
                    row.update(brute_s_per_token=statistics.mean(brute_seconds), brute_candidates=statistics.mean(brute_tested),
                               brute_position_seconds=brute_seconds,
                               speedup_vs_brute=statistics.mean(brute_seconds) / row["mean_s_per_token"])
                if layer_reference:
                    row.update(reference=layer_reference, ours_s_per_token_layer=mean_ours)
        if args.costs:
            costs[layer] = per_candidate_costs(loaded, layer, prompts[0][1], prefix)
    hw = hardware()
    print(f"\n### SIP-It, {args.model}, {args.length}-token prompts, {hw}\n")
    print("| layer | prompts | exact | s/token mean | s/token max | candidates/token mean (max) |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['layer']} | {r['prompts']} {r['kind']} | {r['exact']:.0%} | {r['mean_s_per_token']:.2f} | "
              f"{r['max_s_per_token']:.2f} | {r['mean_candidates']:.0f} ({r['max_candidates']}) |")
    all_tokens = [(r["layer"], r["mean_s_per_token"], r["prompts"]) for r in rows]
    per_layer = {layer: sum(s * n for l, s, n in all_tokens if l == layer) / sum(n for l, _, n in all_tokens if l == layer)
                 for layer in args.layers}
    print("\nMean s/token per layer (all prompts): " + ", ".join(f"layer {l}: {s:.3f}" for l, s in per_layer.items())
          + f"; overall {statistics.mean(per_layer.values()):.3f}")
    if any(reference.values()):
        print(f"\n| layer | reference loop ({hw}): s/position (candidates), per sampled position | ours at the same positions, s | speed-up |")
        print("|---|---|---|---|")
        for layer, refs in reference.items():
            if not refs:
                continue
            ref_mean = statistics.mean(r["seconds"] for r in refs)
            ours_mean = statistics.mean(r["ours_seconds"] for r in refs)
            bound = "" if all(r["found"] for r in refs) else ">= "  # a capped position is a lower bound
            cells = ", ".join(f"{r['seconds']:.1f}{'' if r['found'] else '+ (not found)'} ({r['candidates']}, {r['kind']})" for r in refs)
            print(f"| {layer} | {cells} | {ours_mean:.2f} | {bound}{ref_mean / ours_mean:.0f}x |")
    if any("brute_s_per_token" in r for r in rows):
        print("\n| layer | brute force s/token (sampled positions) | speed-up vs brute force |")
        print("|---|---|---|")
        for r in rows:
            if "brute_s_per_token" in r:
                print(f"| {r['layer']} {r['kind']} | {r['brute_s_per_token']:.1f} ({r['brute_candidates']:.0f} candidates) | "
                      f"{r['speedup_vs_brute']:.0f}x |")
    if costs:
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
    run = dict(hardware=hw, model=args.model, torch=torch.__version__, **run_record(), length=args.length,
               prompts=args.num_prompts + args.num_random, brute_positions=args.brute_positions, pez_steps=args.pez_steps)
    (out / "sipit.json").write_text(json.dumps({**run, "rows": rows, "costs": costs, "reference": reference}, indent=1))


if __name__ == "__main__":
    main()
