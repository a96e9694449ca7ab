"""Targets for output inversion: the paper's difficulty-k targets, and reachable ones.

Difficulty-k: from `[BOS]` (the token convention: target ids never include BOS), each of the M tokens
is the k'-th most likely next token with k' = max(1, round(N(k, 1))) drawn per token. k = 1 is greedy
text; larger k gives less likely, harder-to-invert targets. Special tokens are never chosen. Such a
target may have no short prompt at all that does not copy it.

Reachable: a prompt x* of N tokens (half natural text from `--source`, half random printable-ASCII
tokens, the tokens the swap search may use), and y its greedy M-token continuation, kept only if
LCS(x*, y) / M <= 0.25: a non-copying prompt of length N provably exists. Records carry x*
(`prompt_ids`) to compare with what a method finds.

    python -m lit_inversion.dlmi.targets --out data/dlmi_smollm2_k25.jsonl
    python -m lit_inversion.dlmi.targets --reachable --count 8 --seed 1 --prompt-length 20 --out reach.jsonl
    python -m lit_inversion.dlmi.targets --reachable --chat --count 8 --seed 1 --out chat.jsonl

Reachable in chat (`--chat`): a short instruction plus the N-token span x* in the user turn, rendered
with the model's chat template; y is the assistant's greedy M-token reply. Kept only if y does not
copy x* (LCS / M <= 0.25) and a dull span (nanoGCG's start, 20 space-separated x's) does not already
give it (LCS(dull reply, y) / M <= 0.5); no span twice.
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


REACHABLE_MAX_COPY = 0.25  # LCS(x*, y) / M above this: y could be reached by copying x*
DULL_SPAN = " ".join(["x"] * 20)  # nanoGCG's optim_str_init
DULL_MAX_LCS = 0.5  # LCS(the dull span's reply, y) / M above this: y needs no search
CHAT_INSTRUCTIONS = ("Continue this text:", "Summarize the following:", "Translate into French:",
                     "What is this about?", "Rewrite this more formally:", "Give this a short title:",
                     "Explain this to a child:", "Answer in one sentence:", "Fix the grammar:",
                     "What comes next?")


def _natural_prompt(loaded, sentences: Sequence[str], length: int, rng: random.Random) -> list[int] | None:
    """The first `length` tokens of consecutive source lines from a random one (None: not all allowed)."""
    from lit_inversion.dlmi.vocab import allowed_tokens
    from lit_inversion.tokens import encode

    allowed = allowed_tokens(loaded.tokenizer, loaded.vocab_size)
    start = rng.randrange(len(sentences))
    ids: list[int] = []
    for j in range(len(sentences)):
        ids += encode(loaded.tokenizer, (" " if ids else "") + sentences[(start + j) % len(sentences)])
        if len(ids) >= length:
            break
    ids = ids[:length]
    return ids if len(ids) == length and all(bool(allowed[i]) for i in ids) else None


def _random_prompt(loaded, length: int, rng: random.Random) -> list[int]:
    from lit_inversion.dlmi.vocab import allowed_tokens

    choices = torch.nonzero(allowed_tokens(loaded.tokenizer, loaded.vocab_size)).flatten().tolist()
    return [rng.choice(choices) for _ in range(length)]


def make_reachable_targets(loaded, count: int, prompt_length: int = 20, length: int = 20, seed: int = 0,
                           sources: Sequence[str] = (), prepend_bos: bool = True, tries: int = 50,
                           natural: int | None = None) -> list[dict]:
    """`count` targets with a known non-copying solution: `natural` (default half) from natural-text prompts
    (lines of `sources`), the rest from random allowed tokens; each is the greedy continuation of its prompt."""
    return _reachable(loaded, count, prompt_length, length, seed, sources, prepend_bos, tries, chat=False,
                      natural=natural)


def make_reachable_chat_targets(loaded, count: int, prompt_length: int = 20, length: int = 20, seed: int = 0,
                                sources: Sequence[str] = (), prepend_bos: bool = True, tries: int = 50,
                                instructions: Sequence[str] = CHAT_INSTRUCTIONS, natural: int | None = None) -> list[dict]:
    """`count` chat targets with a known non-copying span: the user turn is an instruction and the span,
    the target the assistant's greedy reply, which the dull span does not already give."""
    return _reachable(loaded, count, prompt_length, length, seed, sources, prepend_bos, tries, chat=True,
                      instructions=instructions, natural=natural)


class _Replies:
    """Greedy replies of spans in a context, and the checks a reachable target passes: the reply does not
    copy the span (LCS / M <= REACHABLE_MAX_COPY) and, in a chat, the dull span does not already give it."""

    def __init__(self, loaded, length: int, prepend_bos: bool):
        from lit_inversion.tokens import encode

        self.loaded, self.length, self.prepend_bos = loaded, length, prepend_bos
        self.device = loaded.model.get_input_embeddings().weight.device
        self.dull = torch.tensor(encode(loaded.tokenizer, DULL_SPAN), device=self.device)
        self.dull_replies: dict = {}  # by context: the dull span's reply depends on the instruction only

    def context(self, instruction: str | None):
        from lit_inversion.dlmi.context import OPTIM_STR, bare_context, render_context

        if instruction is None:
            return None, bare_context(self.loaded.bos_id, self.prepend_bos)
        messages = [{"role": "user", "content": f"{instruction} {OPTIM_STR}"}]
        return messages, render_context(self.loaded.tokenizer, self.loaded.bos_id, messages, prepend_bos=self.prepend_bos)

    def reply(self, context, prompt: list[int], chat: bool) -> tuple[list[int], float, float, bool]:
        """(reply, LCS(span, reply) / M, LCS(dull reply, reply) / M, whether it passes)."""
        from lit_inversion.dlmi.scorer import PromptScorer
        from lit_inversion.metrics import lcs_ratio

        scorer = PromptScorer(self.loaded.model, context)
        output = scorer.greedy(torch.tensor([prompt], device=self.device), self.length)[0].tolist()
        copied = lcs_ratio(prompt, output)
        if chat and context not in self.dull_replies:
            self.dull_replies[context] = scorer.greedy(self.dull[None], self.length)[0].tolist()
        dull_lcs = lcs_ratio(self.dull_replies[context], output) if chat else 0.0
        return output, copied, dull_lcs, copied <= REACHABLE_MAX_COPY and dull_lcs <= DULL_MAX_LCS


def _span(loaded, kind: str, sources: Sequence[str], prompt_length: int, rng: random.Random, used: set) -> list[int] | None:
    prompt = (_natural_prompt(loaded, sources, prompt_length, rng) if kind == "natural"
              else _random_prompt(loaded, prompt_length, rng))
    return None if prompt is None or tuple(prompt) in used else prompt


def _record(loaded, record: dict, messages, output: list[int], prompt: list[int], copied: float, dull_lcs: float,
            chat: bool) -> dict:
    if chat:
        record["messages"] = messages
    record.update({"ids": output, "text": decode(loaded.tokenizer, output), "prompt_ids": prompt,
                   "prompt_text": decode(loaded.tokenizer, prompt), "prompt_target_lcs": round(copied, 4)})
    if chat:
        record["dull_lcs"] = round(dull_lcs, 4)
    return record


def _reachable(loaded, count: int, prompt_length: int, length: int, seed: int, sources: Sequence[str],
               prepend_bos: bool, tries: int, chat: bool, instructions: Sequence[str] = (),
               natural: int | None = None) -> list[dict]:
    from lit_inversion.errors import InversionError

    rng = random.Random(seed)
    replies = _Replies(loaded, length, prepend_bos)
    natural = (count // 2 if natural is None else min(natural, count)) if sources else 0
    targets, spans = [], set()
    for j in range(count):
        kind = "natural" if j < natural else "random"
        for _ in range(tries):
            messages, context = replies.context(rng.choice(instructions) if chat else None)
            prompt = _span(loaded, kind, sources, prompt_length, rng, spans)
            if prompt is None:
                continue
            output, copied, dull_lcs, ok = replies.reply(context, prompt, chat)
            if ok:
                break
        else:
            raise InversionError(f"no {kind} span in {tries} tries had a reply with LCS(span, target) <= "
                                 f"{REACHABLE_MAX_COPY}{' and not given by a dull span' if chat else ''}: "
                                 "try another --seed or a longer --length")
        spans.add(tuple(prompt))
        record = {"id": f"reach-{'chat-' if chat else ''}{kind}-{seed}-{j}", "kind": kind}
        targets.append(_record(loaded, record, messages, output, prompt, copied, dull_lcs, chat))
    return targets


def make_reachable_groups(loaded, groups: int, size: int, prompt_length: int = 20, length: int = 20, seed: int = 0,
                          sources: Sequence[str] = (), prepend_bos: bool = True, tries: int = 50,
                          instructions: Sequence[str] = CHAT_INSTRUCTIONS, natural: int | None = None) -> list[dict]:
    """`groups` groups of `size` chat targets that one known span solves: the span after `size` different
    instructions, each member's target its greedy reply (non-copying, not the dull span's, all replies
    distinct); half the groups' spans natural text, half random tokens; no span in two groups."""
    from lit_inversion.errors import InversionError

    if size < 2 or size > len(instructions):
        raise InversionError(f"--group must be between 2 and {len(instructions)} (the instructions) (got {size})")
    rng = random.Random(seed)
    replies = _Replies(loaded, length, prepend_bos)
    natural = (groups // 2 if natural is None else min(natural, groups)) if sources else 0
    records, spans = [], set()
    for j in range(groups):
        kind = "natural" if j < natural else "random"
        for _ in range(tries):
            prompt = _span(loaded, kind, sources, prompt_length, rng, spans)
            if prompt is None:
                continue
            members = []
            for instruction in rng.sample(list(instructions), size):
                messages, context = replies.context(instruction)
                output, copied, dull_lcs, ok = replies.reply(context, prompt, chat=True)
                if not ok or any(output == m[1] for m in members):
                    break
                members.append((messages, output, copied, dull_lcs))
            if len(members) == size:
                break
        else:
            raise InversionError(f"no {kind} span in {tries} tries gave {size} distinct, non-copying replies: "
                                 "try another --seed, a smaller --group or a longer --length")
        spans.add(tuple(prompt))
        name = f"group-{kind}-{seed}-{j}"
        for i, (messages, output, copied, dull_lcs) in enumerate(members):
            record = {"id": f"{name}-{i}", "group": name, "kind": kind}
            records.append(_record(loaded, record, messages, output, prompt, copied, dull_lcs, chat=True))
    return records


def write_jsonl(targets: Sequence[dict], path: str | Path) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    keys = ("id", "group", "k", "kind", "messages", "ids", "text", "prompt_ids", "prompt_text", "prompt_target_lcs", "dull_lcs")
    with open(path, "w", encoding="utf-8") as f:
        for t in targets:
            f.write(json.dumps({key: t[key] for key in keys if key in t}, ensure_ascii=False) + "\n")


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
    reach = parser.add_argument_group("reachable targets (--reachable): the greedy continuations of known prompts")
    reach.add_argument("--reachable", action="store_true")
    reach.add_argument("--chat", action="store_true",
                       help="an instruction and the span in the user turn; the target is the assistant's reply")
    reach.add_argument("--count", type=int, default=8, help="targets, or groups with --group (half natural, half random spans)")
    reach.add_argument("--group", type=int, default=None, metavar="G",
                       help="with --chat: groups of G targets that one span solves under G different instructions")
    reach.add_argument("--natural", type=int, default=None,
                       help="how many targets (or groups) have natural-text spans (default: half; --count for all)")
    reach.add_argument("--prompt-length", type=int, default=20, help="N, the known prompt's length")
    reach.add_argument("--source", default=str(Path(__file__).resolve().parents[2] / "data" / "seed_sentences.txt"),
                       help="text lines the natural prompts are cut from")
    args = parser.parse_args(argv)
    loaded = load_model(args.model)
    if args.reachable:
        sources = [line.strip() for line in Path(args.source).read_text(encoding="utf-8").splitlines() if line.strip()]
        if args.group is not None and not args.chat:
            parser.error("--group needs --chat (each member is the span under another instruction)")
        if args.group is not None:
            targets = make_reachable_groups(loaded, args.count, args.group, args.prompt_length, args.length, args.seed,
                                            sources, natural=args.natural)
        else:
            make = make_reachable_chat_targets if args.chat else make_reachable_targets
            targets = make(loaded, args.count, args.prompt_length, args.length, args.seed, sources, natural=args.natural)
        write_jsonl(targets, args.out)
        for t in targets:
            print(f"{t['id']}: LCS(prompt, target) {t['prompt_target_lcs']:.2f} | {t['prompt_text']!r} -> {t['text']!r}")
        return
    ks = [int(k) if float(k).is_integer() else k for k in args.ks]
    targets = make_difficulty_targets(loaded, ks, args.per_k, args.length, args.seed)
    write_jsonl(targets, args.out)
    for k in ks:
        ppl = [perplexity(loaded, t["ids"]) for t in targets if t["k"] == k]
        print(f"k={k}: mean perplexity {sum(ppl) / len(ppl):.1f} over {len(ppl)} targets")


if __name__ == "__main__":
    main()
