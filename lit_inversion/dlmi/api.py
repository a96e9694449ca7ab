"""Notebook front door: `invert_output(target, model=..., messages=..., prompt_length=..., method=...)`."""

from __future__ import annotations

from lit_inversion.dlmi.batch import DlmiResult
from lit_inversion.dlmi.config import OutputConfig, method_config
from lit_inversion.dlmi.context import render_context
from lit_inversion.dlmi.pool import invert_outputs
from lit_inversion.models import DEFAULT_MODEL, LoadedModel, load_model
from lit_inversion.tokens import encode


def invert_output(
    target: str | list[int] | list[str | list[int]],
    model: str | LoadedModel = DEFAULT_MODEL,
    prompt_length: int | None = None,
    num_steps: int | None = None,
    method: str | OutputConfig = "dlmi",
    messages: list[dict] | None = None,
    prefix: str | None = None,
    suffix: str | None = None,
    **options,
) -> DlmiResult | list[DlmiResult]:
    """Find a prompt whose greedy continuation is `target` (text or token ids; a list of them runs
    in as many slots, each target with its own state). `method` is a name (dlmi, the default; gbda, gcg,
    reinforce) or a config (`DlmiConfig(...)`, `GcgConfig(...)`, ...); `prompt_length`, `num_steps` and
    extra keyword arguments set the method's options over a passed config's (an option the method lacks
    is an error that lists its options).

    The prompt is optimised in context: chat `messages` (`{optim_str}` marks the span; where no
    message has it, it goes at the end of the last), rendered with the model's chat template, or
    `prefix` / `suffix` text; none: `[BOS] + prompt`."""
    given = {"prompt_length": prompt_length, "num_steps": num_steps}
    settings = method_config(method, **{k: v for k, v in given.items() if v is not None}, **options)
    loaded = model if isinstance(model, LoadedModel) else load_model(model)
    context = None
    if messages is not None or prefix is not None or suffix is not None:
        context = render_context(loaded.tokenizer, loaded.bos_id, messages, prefix, suffix, settings.prepend_bos,
                                 where="invert_output")
    single = isinstance(target, str) or (isinstance(target, list) and all(isinstance(i, int) for i in target))
    targets = [target] if single else list(target)
    ids = [encode(loaded.tokenizer, t) if isinstance(t, str) else [int(i) for i in t] for t in targets]
    results = invert_outputs(loaded, ids, settings, contexts=[context] * len(ids))
    return results[0] if single else results
