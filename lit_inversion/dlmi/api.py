"""Notebook front door: `invert_output(target, model=..., messages=..., prompt_length=..., method=...)`."""

from __future__ import annotations

from lit_inversion.dlmi.batch import DlmiResult
from lit_inversion.dlmi.config import OutputConfig, method_config
from lit_inversion.dlmi.context import Context, render_context
from lit_inversion.dlmi.data import OutputGroup, OutputTarget
from lit_inversion.dlmi.pool import invert_outputs, run_pool
from lit_inversion.dlmi.universal import GroupResult
from lit_inversion.errors import InversionError
from lit_inversion.models import DEFAULT_MODEL, LoadedModel, load_model
from lit_inversion.tokens import encode

Target = str | list[int] | dict


def invert_output(
    target: Target | list[Target],
    model: str | LoadedModel = DEFAULT_MODEL,
    prompt_length: int | None = None,
    num_steps: int | None = None,
    method: str | OutputConfig = "dlmi",
    messages: list[dict] | None = None,
    prefix: str | None = None,
    suffix: str | None = None,
    group: bool = False,
    **options,
) -> DlmiResult | list[DlmiResult] | GroupResult:
    """Find a prompt whose greedy continuation is `target` (text or token ids; a list of them runs
    in as many slots, each target with its own state). `method` is a name (dlmi, the default; gbda, gcg,
    reinforce) or a config (`DlmiConfig(...)`, `GcgConfig(...)`, ...); `prompt_length`, `num_steps` and
    extra keyword arguments set the method's options over a passed config's (an option the method lacks
    is an error that lists its options).

    The prompt is optimised in context: chat `messages` (`{optim_str}` marks the span; where no
    message has it, it goes at the end of the last), rendered with the model's chat template, or
    `prefix` / `suffix` text; none: `[BOS] + prompt`. A target may also be a dict with its own
    context: {"target": ..., "messages": [...]} (or "prefix" / "suffix"; optional "id").

    `group=True`: one universal prompt for every target in the list (each in its own context); returns
    a `GroupResult` with one pair per target."""
    given = {"prompt_length": prompt_length, "num_steps": num_steps}
    settings = method_config(method, **{k: v for k, v in given.items() if v is not None}, **options)
    loaded = model if isinstance(model, LoadedModel) else load_model(model)
    default = _context(loaded, settings, {"messages": messages, "prefix": prefix, "suffix": suffix})
    single = isinstance(target, (str, dict)) or (isinstance(target, list) and all(isinstance(i, int) for i in target))
    items = [target] if single else list(target)
    targets = [_target(loaded, settings, item, i, default) for i, item in enumerate(items)]
    if group:
        if single:
            raise InversionError("group=True needs a list of at least 2 targets (one prompt for all of them)")
        (_, result), = run_pool(loaded, [OutputGroup("group", targets)], settings, 1)
        return result
    results = invert_outputs(loaded, [t.ids for t in targets], settings, contexts=[t.context for t in targets],
                             keys=[t.id for t in targets] if any(isinstance(i, dict) and "id" in i for i in items) else None)
    return results[0] if single else results


def _context(loaded: LoadedModel, settings: OutputConfig, spec: dict) -> Context | None:
    if all(spec.get(k) is None for k in ("messages", "prefix", "suffix")):
        return None
    return render_context(loaded.tokenizer, loaded.bos_id, spec.get("messages"), spec.get("prefix"),
                          spec.get("suffix"), settings.prepend_bos, where="invert_output")


def _target(loaded: LoadedModel, settings: OutputConfig, item: Target, i: int, default: Context | None) -> OutputTarget:
    """One target (text, ids, or a dict with "target" and its own context) in its context."""
    context = default
    if isinstance(item, dict):
        if "target" not in item:
            raise InversionError(f"target {i} is a dict without \"target\": give {{\"target\": text or ids, "
                                 "\"messages\": [...]}}")
        context = _context(loaded, settings, item) or default
        name, item = str(item.get("id", f"target-{i}")), item["target"]
    else:
        name = f"target-{i}"
    ids = encode(loaded.tokenizer, item) if isinstance(item, str) else [int(t) for t in item]
    return OutputTarget(name, ids, context)
