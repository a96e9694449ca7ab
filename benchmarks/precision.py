"""What bf16 costs or gains, for both methods, in one run (default model).

    python benchmarks/precision.py [--layers 15] [--prompts 3] [--dlmi-steps 64] [--threads 2]

SIP-It: the same prompts inverted with the ranking chains in float32 and in bfloat16 autocast
(verification is float32 either way): exact recovery, seconds and candidates per token.
DLMI: the same target optimised with float32 and bfloat16 forwards for the same number of steps:
seconds per step, final loss and honest LCS. Ratios are bf16 over float32.
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

from lit_inversion.dlmi.config import DlmiConfig
from lit_inversion.dlmi.pool import invert_outputs
from lit_inversion.dlmi.targets import read_jsonl
from lit_inversion.models import load_model
from lit_inversion.sipit.algorithm import SipItConfig, invert
from lit_inversion.sipit.data import read_prompts
from lit_inversion.sipit.table import first_position_table
from lit_inversion.states import LayerProbe
from lit_inversion.tokens import context_prefix

ROOT = Path(__file__).resolve().parents[1]
DTYPES = ("float32", "bfloat16")


def sipit_rows(loaded, layers: list[int], count: int) -> list[dict]:
    prefix = context_prefix(loaded.bos_id, True)
    prompts = read_prompts(ROOT / "data/sipit_natural_20.txt", loaded.tokenizer, loaded.vocab_size)[:count]
    rows = []
    for layer in layers:
        with LayerProbe(loaded, layer) as probe:
            table = first_position_table(probe, prefix)
            truth = [(ids, probe.states(ids, prefix)) for _, ids in prompts]
            for dtype in DTYPES:
                config = SipItConfig(chain_dtype=dtype)
                results = [invert(probe, states, prefix, config, true_ids=ids, table=table) for ids, states in truth]
                tokens = sum(len(r.recovered_ids) for r in results)
                rows.append(dict(method="sipit", layer=layer, dtype=dtype,
                                 exact=sum(bool(r.exact_match) for r in results) / len(results),
                                 s_per_token=sum(r.seconds for r in results) / tokens,
                                 candidates=sum(sum(r.candidates_tested) for r in results) / tokens))
    return rows


def dlmi_rows(loaded, steps: int, target_id: str) -> list[dict]:
    target = {r["id"]: r for r in read_jsonl(ROOT / "data/dlmi_smollm2_k25.jsonl")}[target_id]
    rows = []
    for dtype in DTYPES:
        config = DlmiConfig(compute_dtype=dtype, num_steps=steps, check_every=steps)
        losses = []
        start = time.perf_counter()
        (result,) = invert_outputs(loaded, [target["ids"]], config, keys=[target_id],
                                   on_step=lambda step: losses.extend(step.loss))
        seconds = time.perf_counter() - start
        relaxed = [x for x in losses[: config.relaxed_steps]]
        rows.append(dict(method="dlmi", target=target_id, dtype=dtype, s_per_step=seconds / max(1, result.steps),
                         relaxed_loss_last=relaxed[-1] if relaxed else None, honest=result.lcs_ratio,
                         exact=result.exact_match))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--layers", type=int, nargs="+", default=[15])
    parser.add_argument("--prompts", type=int, default=3)
    parser.add_argument("--dlmi-steps", type=int, default=64)
    parser.add_argument("--dlmi-target", default="k6-0")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--out", default="runs/bench-precision")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    loaded = load_model(args.model)
    print(f"precision benchmark | model {args.model} | {hardware()} | torch {torch.__version__}", flush=True)
    rows = sipit_rows(loaded, args.layers, args.prompts) + dlmi_rows(loaded, args.dlmi_steps, args.dlmi_target)
    print(f"\n### bf16 vs float32, {args.model}, {hardware()}\n")
    print("| method | setting | dtype | exact | s/token or s/step | candidates/token | final relaxed loss | honest LCS |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        if r["method"] == "sipit":
            print(f"| SIP-It chains | layer {r['layer']}, {args.prompts} prompts x 20 tokens | {r['dtype']} | "
                  f"{r['exact']:.0%} | {r['s_per_token']:.2f} s/token | {r['candidates']:.0f} | - | - |")
        else:
            print(f"| DLMI forwards | {r['target']}, N = 20, {args.dlmi_steps} steps | {r['dtype']} | {r['exact']} | "
                  f"{r['s_per_step']:.2f} s/step | - | {r['relaxed_loss_last']:.3f} | {r['honest']:.2f} |")
    for method, key in (("sipit", "s_per_token"), ("dlmi", "s_per_step")):
        pair = {r["dtype"]: r for r in rows if r["method"] == method and r.get("layer", args.layers[0]) == args.layers[0]}
        if len(pair) == 2:
            print(f"{method}: bf16 time / float32 time = {pair['bfloat16'][key] / pair['float32'][key]:.2f}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "precision.json").write_text(json.dumps({"hardware": hardware(), "model": args.model, **run_record(), "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
