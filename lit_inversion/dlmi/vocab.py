"""Which tokens a discrete prompt search may use: printable-ASCII filters, retokenisation, copy rules."""

from __future__ import annotations

import weakref

import torch

_ALLOWED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # tokenizer -> {(V, allow): mask}


def allowed_tokens(tokenizer, vocab_size: int, allow_non_ascii: bool = False) -> torch.Tensor:
    """[V] bool: the tokens a swap may put in. Embedding rows beyond the tokenizer never qualify;
    without `allow_non_ascii`, neither do special tokens nor tokens that decode to anything but
    printable ASCII (newlines, byte pieces, other scripts)."""
    cached = _ALLOWED.setdefault(tokenizer, {})
    key = (vocab_size, allow_non_ascii)
    if key not in cached:
        known = min(vocab_size, len(tokenizer))
        allowed = torch.zeros(vocab_size, dtype=torch.bool, device="cpu")  # cached host-side; callers move it
        if allow_non_ascii:
            allowed[:known] = True
        else:
            texts = tokenizer.batch_decode([[i] for i in range(known)], skip_special_tokens=False)
            allowed[:known] = torch.tensor([t.isascii() and t.isprintable() for t in texts], device="cpu")
            special = [i for i in tokenizer.all_special_ids if 0 <= i < vocab_size]
            allowed[special] = False
        cached[key] = allowed
    return cached[key]


def retokenization_mask(tokenizer, prompts: torch.Tensor) -> torch.Tensor:
    """[R] bool: which prompts [R, N] come back as the same ids after decode -> encode.

    A prompt that does not is a string the model would never see as those tokens."""
    texts = tokenizer.batch_decode(prompts.tolist(), skip_special_tokens=False)
    again = tokenizer(texts, add_special_tokens=False)["input_ids"]
    return torch.tensor([list(a) == p for a, p in zip(again, prompts.tolist())], dtype=torch.bool, device=prompts.device)


def round_trips(tokenizer, prompt) -> bool:
    """Whether one prompt (ids, a list or a [N] tensor) comes back as the same ids after decode -> encode."""
    ids = prompt.tolist() if isinstance(prompt, torch.Tensor) else list(prompt)
    return bool(retokenization_mask(tokenizer, torch.tensor([ids], device="cpu"))[0])


_TEXTS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # tokenizer -> {V: decoded tokens}


def token_texts(tokenizer, vocab_size: int) -> list[str]:
    """Each id's decoded string ('' beyond the tokenizer), cached per tokenizer."""
    cached = _TEXTS.setdefault(tokenizer, {})
    if vocab_size not in cached:
        known = min(vocab_size, len(tokenizer))
        texts = tokenizer.batch_decode([[i] for i in range(known)], skip_special_tokens=False)
        cached[vocab_size] = texts + [""] * (vocab_size - known)
    return cached[vocab_size]


def forbidden_for_target(tokenizer, vocab_size: int, target: list[int]) -> torch.Tensor:
    """[V] bool, ARCA's no-copy rule: the target's tokens, and every token whose decoded string
    (stripped, case-folded) is a prefix of a target token's or has one as its prefix."""
    texts = token_texts(tokenizer, vocab_size)
    words = {texts[t].strip().casefold() for t in target} - {""}
    forbidden = torch.zeros(vocab_size, dtype=torch.bool, device="cpu")
    forbidden[list(set(target))] = True
    for i, text in enumerate(texts):
        u = text.strip().casefold()
        if u and any(u.startswith(word) or word.startswith(u) for word in words):
            forbidden[i] = True
    return forbidden
