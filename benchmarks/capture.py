"""Capture hidden states as a serving stack would, then invert them with SIP-It.

    python benchmarks/capture.py --dtype bfloat16 --layers 10 [--prompts-file F] [--num-random 2] [--length 12]

The capture uses plain transformers: the model cast to `--dtype` (`model.to(dtype)`), one
full-sequence forward with BOS prepended, `output_hidden_states` (the last layer is read before the
final norm, by a hook on the last block, to follow the project's convention). The states are saved
(`<out>/<dtype>-layer<L>.safetensors`, tensor `states` [B, T, d] in float32 holding the low-precision
values) and inverted with `capture_dtype=<dtype>`; the script prints exact, verified and certified
rates and seconds per token per layer.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.common import hardware, run_record  # noqa: E402
from benchmarks.sipit import fresh_prompts  # noqa: E402
from lit_inversion.models import load_model  # noqa: E402
from lit_inversion.sipit.algorithm import SipItConfig, capture_probe, invert  # noqa: E402
from lit_inversion.sipit.index import build_index  # noqa: E402
from lit_inversion.states import LayerProbe, find_blocks  # noqa: E402


@torch.no_grad()
def capture(model, bos_id: int, prompts: list[list[int]], layer: int, num_layers: int) -> torch.Tensor:
    """[B, T, d] states of equal-length prompts at `layer`, from one full-sequence forward each."""
    last: list[torch.Tensor] = []
    hook = find_blocks(model, num_layers)[-1].register_forward_hook(
        lambda module, args, output: last.append(output[0] if isinstance(output, tuple) else output))
    try:
        rows = []
        for ids in prompts:
            last.clear()
            out = model(torch.tensor([[bos_id] + ids]), output_hidden_states=True)
            state = last[-1] if layer == num_layers else out.hidden_states[layer]
            rows.append(state[0, 1:].float())
    finally:
        hook.remove()
    return torch.stack(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--dtype", nargs="+", default=["bfloat16"], choices=["bfloat16", "float16", "float32"])
    parser.add_argument("--layers", type=int, nargs="+", default=[10])
    parser.add_argument("--prompts-file", default=None, help=".txt or .jsonl prompts (default: the shipped natural set)")
    parser.add_argument("--num-prompts", type=int, default=4, help="prompts taken from the file")
    parser.add_argument("--num-random", type=int, default=2, help="random-token prompts added")
    parser.add_argument("--length", type=int, default=12, help="tokens per prompt")
    parser.add_argument("--max-candidates", type=int, default=None)
    parser.add_argument("--verify-in", default="capture", choices=["capture", "float32"],
                        help="verify on the model cast to the capture dtype, or on the float32 model")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--out", default="runs/captures")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    loaded = load_model(args.model)
    prompts = fresh_prompts(loaded, args.prompts_file, args.num_prompts, args.num_random, args.length)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    from safetensors.torch import save_file

    print(f"SIP-It on captured states | model {args.model} | {hardware()} | torch {torch.__version__}", flush=True)
    rows = []
    for dtype in args.dtype:
        model = copy.deepcopy(loaded.model).to(getattr(torch, dtype))
        for layer in args.layers:
            states = capture(model, loaded.bos_id, [ids for _, ids in prompts], layer, loaded.num_layers)
            save_file({"states": states.contiguous()}, str(out / f"{dtype}-layer{layer}.safetensors"))
            with LayerProbe(loaded, layer) as probe:
                config = SipItConfig(max_candidates=args.max_candidates, verify_in=args.verify_in)
                index = build_index(probe, [loaded.bos_id], config)
                cast = dtype != "float32" and args.verify_in == "capture"
                verifier = capture_probe(probe, dtype) if cast else None
                results = []
                for (prompt_id, ids), target in zip(prompts, states):
                    r = invert(probe, target, [loaded.bos_id], config, true_ids=ids, table=index,
                               capture_dtype=dtype, verifier_probe=verifier)
                    results.append(r)
                    wrong = [t for t, (a, b) in enumerate(zip(r.recovered_ids, ids)) if a != b]
                    print(f"  {dtype} layer {layer} {prompt_id}: exact={r.exact_match} verified {sum(r.verified)}/{len(ids)} "
                          f"certified {sum(r.certified)}/{len(ids)} {r.seconds / len(ids):.2f} s/token "
                          f"candidates {r.candidates_tested}" + (f" wrong at {wrong}" if wrong else ""), flush=True)
                if verifier is not None:
                    verifier.close()
            tokens = sum(len(r.recovered_ids) for r in results)
            rows.append(dict(dtype=dtype, layer=layer, verify_in=args.verify_in, prompts=len(results),
                             exact=sum(bool(r.exact_match) for r in results),
                             token_accuracy=statistics.mean(r.token_accuracy for r in results),
                             verified=sum(map(sum, (r.verified for r in results))) / tokens,
                             certified=sum(map(sum, (r.certified for r in results))) / tokens,
                             s_per_token=sum(r.seconds for r in results) / tokens,
                             candidates=sum(map(sum, (r.candidates_tested for r in results))) / tokens))
    print(f"\n### SIP-It on captured states, {args.model}, {args.length}-token prompts, {hardware()}\n")
    print("| capture dtype | verified on | layer | exact | token accuracy | verified | certified | s/token | candidates/token |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['dtype']} | {'model cast to it' if r['verify_in'] == 'capture' else 'float32 model'} | {r['layer']} | {r['exact']}/{r['prompts']} | {r['token_accuracy']:.1%} | "
              f"{r['verified']:.0%} | {r['certified']:.0%} | {r['s_per_token']:.2f} | {r['candidates']:.0f} |")
    (out / f"captures-{args.verify_in}.json").write_text(json.dumps(dict(hardware=hardware(), model=args.model, **run_record(), rows=rows), indent=1))


if __name__ == "__main__":
    main()
