"""The context cache: optimisation steps with a long system prompt, its keys/values computed once per target
against recomputed in every forward (`cache_context false`), in one run on the same target.

    python benchmarks/context_cache.py --system-tokens 100 --steps 4 --threads 2

Per method (DLMI's default swap search; GCG at a CPU width with and without the shared prompt prefix)
it prints the median seconds per step with and without the cache, and the speed-up. The step is the
unit of work a Lightning training step runs; the first step (DLMI's start beam) is a warm-up and not
timed. Both arms start from the same seed and take the same path, so they time the same forwards.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.common import hardware, run_record  # noqa: E402
from lit_inversion.dlmi import make_batch  # noqa: E402
from lit_inversion.dlmi.config import DlmiConfig, GcgConfig  # noqa: E402
from lit_inversion.dlmi.context import OPTIM_STR, render_context  # noqa: E402
from lit_inversion.models import load_model  # noqa: E402
from lit_inversion.tokens import decode, encode  # noqa: E402

SYSTEM = ("You are a careful assistant for a public library. You answer questions about opening hours, "
          "borrowing rules, events for children and adults, the reading rooms, the archive of local newspapers, "
          "and the digital catalogue. Keep every answer short, friendly and accurate. When you do not know "
          "something, say so and suggest asking a librarian at the front desk. Never invent dates, prices or "
          "names. Use plain language and avoid jargon. If a question is about another library, explain that "
          "you only know about this one and give its phone number instead. Be patient with every reader.")


def system_prompt(tokenizer, tokens: int) -> str:
    """The first `tokens` tokens of SYSTEM, as text."""
    ids = encode(tokenizer, SYSTEM)
    if len(ids) < tokens:
        raise SystemExit(f"--system-tokens {tokens}: the built-in system prompt has only {len(ids)} tokens")
    return decode(tokenizer, ids[:tokens])


def seconds_per_step(loaded, target: list[int], config, context, steps: int) -> list[float]:
    batch = make_batch(loaded, [target], config, keys=["bench"], context=context)
    batch.step()  # warm-up: allocator, the start beam
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        batch.step()
        times.append(time.perf_counter() - start)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--system-tokens", type=int, default=100)
    parser.add_argument("--steps", type=int, default=4, help="timed steps per arm (median)")
    parser.add_argument("--gcg-width", type=int, default=64)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--out", default="docs/results/data/dlmi_context_cache.json")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    loaded = load_model(args.model)
    tok = loaded.tokenizer
    messages = [{"role": "system", "content": system_prompt(tok, args.system_tokens)},
                {"role": "user", "content": f"Answer briefly: {OPTIM_STR}"}]
    context = render_context(tok, loaded.bos_id, messages)
    target = encode(tok, "The reading room opens at nine and closes at six on weekdays.")
    print(f"Context cache | model {args.model} | {hardware()} | torch {torch.__version__} | "
          f"{len(context.before)} ids before the span ({args.system_tokens}-token system prompt), "
          f"{len(context.after)} after | target {len(target)} tokens, prompt 20", flush=True)
    arms = {"dlmi": DlmiConfig(num_steps=10 ** 6),
            f"gcg (width {args.gcg_width})": GcgConfig(search_width=args.gcg_width, num_steps=10 ** 6),
            f"gcg (width {args.gcg_width}, no shared prompt prefix)":
                GcgConfig(search_width=args.gcg_width, num_steps=10 ** 6, share_prefix=False)}
    rows = []
    print("\n| method | s/step, cached context | s/step, recomputed | speed-up |\n|---|---|---|---|")
    for name, config in arms.items():
        cached = statistics.median(seconds_per_step(loaded, target, config, context, args.steps))
        recomputed = statistics.median(seconds_per_step(
            loaded, target, config.with_options(cache_context=False), context, args.steps))
        rows.append({"method": name, "cached_s_per_step": round(cached, 4),
                     "recomputed_s_per_step": round(recomputed, 4), "speedup": round(recomputed / cached, 3)})
        print(f"| {name} | {cached:.2f} | {recomputed:.2f} | {recomputed / cached:.2f}x |", flush=True)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"hardware": hardware(), "model": args.model, "system_tokens": args.system_tokens,
                               "context_before": len(context.before), "context_after": len(context.after),
                               "steps": args.steps, **run_record(), "rows": rows}, indent=1) + "\n")
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
