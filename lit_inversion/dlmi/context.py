"""The fixed text around the optimised span: a chat template, or a prefix and a suffix.

The model sees `before + span + after + target`. `render_context` makes `before` and `after` one way
for every method, the honest check and the records:

1. `messages` (a list of {role, content}, `{optim_str}` in one message; where none has it, it is
   appended to the last message, as nanoGCG does) are rendered with the tokenizer's chat template
   (`add_generation_prompt=True`); `prefix` / `suffix` are plain text around the span.
2. The rendered text is split at `{optim_str}` and each part is tokenised on its own with
   `add_special_tokens=False`.
3. BOS goes first only if the rendered text does not already start with the BOS token (SmolLM2's
   template starts with `<|im_start|>`, its BOS token: stripping every BOS token from the text, as
   nanoGCG 0.3.0 does, deletes every turn marker).
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass

from lit_inversion.errors import InversionError
from lit_inversion.tokens import encode

OPTIM_STR = "{optim_str}"


@dataclass(frozen=True)
class Context:
    """The ids before and after the optimised span (BOS, when the model gets one, is in `before`)."""

    before: tuple[int, ...] = ()
    after: tuple[int, ...] = ()

    def input_ids(self, prompt: Sequence[int]) -> list[int]:
        """Everything the model sees before the target: before + prompt + after."""
        return [*self.before, *(int(i) for i in prompt), *self.after]

    def __len__(self) -> int:
        return len(self.before) + len(self.after)

    def to_dict(self) -> dict:
        return {"before": list(self.before), "after": list(self.after)}


def bare_context(bos_id: int | None, prepend_bos: bool = True) -> Context:
    """No text around the span: `[BOS] + span + target` (the token convention of `lit_inversion.tokens`)."""
    return Context((bos_id,) if prepend_bos and bos_id is not None else ())


def _with_optim_str(messages: object, where: str) -> list[dict]:
    """A copy of `messages` with exactly one `{optim_str}` (appended to the last message if none has it)."""
    if (not isinstance(messages, list) or not messages
            or not all(isinstance(m, dict) and isinstance(m.get("content"), str) and isinstance(m.get("role"), str)
                       for m in messages)):
        raise InversionError(f'{where}: "messages" must be a non-empty list of {{"role": ..., "content": ...}} '
                             "objects with string values")
    messages = copy.deepcopy(messages)
    count = sum(m["content"].count(OPTIM_STR) for m in messages)
    if count > 1:
        raise InversionError(f"{where}: {OPTIM_STR} appears {count} times in the messages: put it in one place "
                             "(the optimised span)")
    if count == 0:
        messages[-1]["content"] += OPTIM_STR
    return messages


def render_context(tokenizer, bos_id: int | None, messages: list[dict] | None = None, prefix: str | None = None,
                   suffix: str | None = None, prepend_bos: bool = True, where: str = "the target") -> Context:
    """The context of a target: its chat `messages`, or `prefix` / `suffix` text, or none (bare)."""
    if messages is not None and (prefix is not None or suffix is not None):
        raise InversionError(f'{where}: give "messages" or "prefix"/"suffix", not both (put the fixed text in the '
                             "messages)")
    for name, value in (("prefix", prefix), ("suffix", suffix)):
        if value is not None and not isinstance(value, str):
            raise InversionError(f'{where}: "{name}" must be a string, not {type(value).__name__}')
        if value is not None and OPTIM_STR in value:
            raise InversionError(f'{where}: "{name}" contains {OPTIM_STR}: the span goes between prefix and suffix')
    if messages is not None:
        if not getattr(tokenizer, "chat_template", None):
            raise InversionError(f'{where} has "messages" but the model\'s tokenizer has no chat template: give '
                                 '"prefix"/"suffix" text instead, or use a model with a chat template')
        rendered = tokenizer.apply_chat_template(_with_optim_str(messages, where), tokenize=False,
                                                 add_generation_prompt=True)
        if rendered.count(OPTIM_STR) != 1:
            raise InversionError(f"{where}: the chat template rendered {OPTIM_STR} {rendered.count(OPTIM_STR)} times "
                                 "(it must keep the message text once): use prefix/suffix instead")
        text_before, text_after = rendered.split(OPTIM_STR)
    else:
        text_before, text_after = prefix or "", suffix or ""
    bos_token = getattr(tokenizer, "bos_token", None)
    starts_with_bos = bool(bos_token) and text_before.startswith(bos_token)
    bos = [bos_id] if prepend_bos and bos_id is not None and not starts_with_bos else []
    before = bos + (encode(tokenizer, text_before) if text_before else [])
    after = encode(tokenizer, text_after) if text_after else []
    return Context(tuple(before), tuple(after))
