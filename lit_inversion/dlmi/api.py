"""Notebook front door: `invert_output(target, model=..., prompt_length=..., num_steps=..., method=...)`."""

from __future__ import annotations

from lit_inversion.dlmi.batch import DlmiResult
from lit_inversion.dlmi.config import OutputConfig, method_config
from lit_inversion.dlmi.pool import invert_outputs
from lit_inversion.models import DEFAULT_MODEL, LoadedModel, load_model
from lit_inversion.tokens import encode


def invert_output(
    target: str | list[int] | list[str | list[int]],
    model: str | LoadedModel = DEFAULT_MODEL,
    prompt_length: int = 20,
    num_steps: int = 256,
    method: str | OutputConfig = "dlmi",
    **options,
) -> DlmiResult | list[DlmiResult]:
    """Find a prompt whose greedy continuation is `target` (text or token ids; a list of them runs
    in as many slots, each target with its own state). `method` is a name (dlmi, the default; gbda, gcg,
    reinforce) or a config (`DlmiConfig(...)`, `GcgConfig(...)`, ...); extra keyword arguments set the
    method's options (an option the method lacks is an error that lists its options)."""
    settings = method_config(method, prompt_length=prompt_length, num_steps=num_steps, **options)
    loaded = model if isinstance(model, LoadedModel) else load_model(model)
    single = isinstance(target, str) or (isinstance(target, list) and all(isinstance(i, int) for i in target))
    targets = [target] if single else list(target)
    ids = [encode(loaded.tokenizer, t) if isinstance(t, str) else [int(i) for i in t] for t in targets]
    results = invert_outputs(loaded, ids, settings)
    return results[0] if single else results
