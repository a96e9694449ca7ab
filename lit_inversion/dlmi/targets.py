"""The paper's difficulty-k targets: continuations that follow the k'-th most likely token.

From `[BOS]` (the token convention: target ids never include BOS), each of the M tokens is the
k'-th most likely next token with k' = max(1, round(N(k, 1))) drawn per token. k = 1 is greedy text;
larger k gives less likely, harder-to-invert targets. Special tokens are never chosen, so a target
is plain text.

    python -m lit_inversion.dlmi.targets --out data/dlmi_smollm2_k25.jsonl
"""

from __future__ import annotations

import argparse
import json
import math
import random
from collections.abc import Sequence
from pathlib import Path

import torch

from lit_inversion.tokens import context_prefix, decode


@torch.no_grad()
def difficulty_sequence(loaded, k: float, length: int, rng: random.Random, prepend_bos: bool = True) -> list[int]:
    """One target of `length` tokens; each token is the k'-th most likely, k' drawn from `rng`."""
    model = loaded.model
    device = model.get_input_embeddings().weight.device
    special = torch.tensor(sorted(set(getattr(loaded.tokenizer, "all_special_ids", []) or [])), dtype=torch.long,
                           device=device)
    ids = context_prefix(loaded.bos_id, prepend_bos)
    past, feed, out_ids = None, torch.tensor([ids], dtype=torch.long, device=device), []
    for _ in range(length):
        out = model(input_ids=feed, past_key_values=past, use_cache=True)
        logits = out.logits[0, -1].float()
        if len(special):
            logits[special[special < logits.shape[0]]] = -math.inf
        rank = max(1, int(round(rng.gauss(k, 1.0))))
        token = int(logits.topk(rank).indices[-1])
        out_ids.append(token)
        past, feed = out.past_key_values, torch.tensor([[token]], dtype=torch.long, device=device)
    return out_ids


def make_difficulty_targets(loaded, ks: Sequence[float] = (1, 6, 11, 16, 21), per_k: int = 5, length: int = 20,
                            seed: int = 42, prepend_bos: bool = True) -> list[dict]:
    """`per_k` targets for each k, as dicts with id, k, ids and text (one seeded RNG, in order)."""
    rng = random.Random(seed)
    targets = []
    for k in ks:
        for j in range(per_k):
            ids = difficulty_sequence(loaded, k, length, rng, prepend_bos)
            targets.append({"id": f"k{k}-{j}", "k": k, "ids": ids, "text": decode(loaded.tokenizer, ids)})
    return targets


@torch.no_grad()
def perplexity(loaded, ids: Sequence[int], prepend_bos: bool = True) -> float:
    """exp(mean NLL) of `ids` after the context prefix ([BOS] by the convention)."""
    prefix = context_prefix(loaded.bos_id, prepend_bos)
    device = loaded.model.get_input_embeddings().weight.device
    full = torch.tensor([prefix + list(ids)], dtype=torch.long, device=device)
    logits = loaded.model(input_ids=full).logits[0].float()
    if not prefix:  # the first token has no context to be predicted from
        logits, ids = logits[:-1], list(ids)[1:]
    else:
        logits = logits[len(prefix) - 1 : -1]
    return math.exp(float(torch.nn.functional.cross_entropy(logits, torch.tensor(ids, device=device))))


def write_jsonl(targets: Sequence[dict], path: str | Path) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for t in targets:
            f.write(json.dumps({key: t[key] for key in ("id", "k", "ids", "text")}, ensure_ascii=False) + "\n")


def read_jsonl(path: str | Path) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def main(argv: Sequence[str] | None = None) -> None:
    from lit_inversion.models import DEFAULT_MODEL, load_model

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default=DEFAULT_MODEL)
    parser.add_argument("--ks", type=float, nargs="+", default=[1, 6, 11, 16, 21])
    parser.add_argument("--per-k", type=int, default=5)
    parser.add_argument("--length", type=int, default=20)
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--out", required=True)
    args = parser.parse_args(argv)
    loaded = load_model(args.model)
    ks = [int(k) if float(k).is_integer() else k for k in args.ks]
    targets = make_difficulty_targets(loaded, ks, args.per_k, args.length, args.seed)
    write_jsonl(targets, args.out)
    for k in ks:
        ppl = [perplexity(loaded, t["ids"]) for t in targets if t["k"] == k]
        print(f"k={k}: mean perplexity {sum(ppl) / len(ppl):.1f} over {len(ppl)} targets")


if __name__ == "__main__":
    main()
