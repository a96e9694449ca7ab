"""Notebook front door: `invert_hidden_states(states, model=..., layer=...)`."""

from __future__ import annotations

import weakref
from dataclasses import fields, replace

import torch

from lit_inversion.errors import InversionError
from lit_inversion.models import DEFAULT_MODEL, LoadedModel, load_model
from lit_inversion.sipit.algorithm import SipItConfig, SipItResult, invert
from lit_inversion.sipit.config import check_capture_dtype
from lit_inversion.sipit.pez import PezConfig, invert_pez
from lit_inversion.sipit.index import TokenIndex, build_index
from lit_inversion.states import LayerProbe
from lit_inversion.tokens import context_prefix, decode


def invert_hidden_states(
    states: torch.Tensor,
    model: str | LoadedModel = DEFAULT_MODEL,
    layer: int = 15,
    prepend_bos: bool = True,
    true_ids: list[int] | None = None,
    method: str | SipItConfig | PezConfig = "sipit",
    capture_dtype: str = "float32",
    **options,
) -> SipItResult:
    """Recover the prompt whose hidden states at `layer` are `states` ([T, d]).

    `states` follow the project's conventions (see `lit_inversion.states`): Hugging Face layer
    indexing, pre-final-norm at the last layer, prompt positions only (no BOS row). Extra keyword
    arguments set the method's fields (SipItConfig's policy, batch_size, rtol, ...). The result carries
    `recovered_ids`, `recovered_text`, per-position distances, flags and candidate counts.
    `method` is sipit (default), pez (the HardPrompts baseline, `PezConfig`) or a config object.
    `capture_dtype` (float32, bfloat16, float16) is the dtype the model ran in when `states` were
    computed: low-precision captures are verified in that dtype, with a calibrated tolerance and margin.
    """
    configs = {"sipit": SipItConfig, "pez": PezConfig}
    if not isinstance(method, (SipItConfig, PezConfig)) and method not in configs:
        raise InversionError(f"method must be sipit or pez, or a SipItConfig or PezConfig (got {method!r})")
    check_capture_dtype(capture_dtype)
    base = method if isinstance(method, (SipItConfig, PezConfig)) else configs[method]()
    unknown = set(options) - {f.name for f in fields(base)}
    if unknown:
        raise InversionError(f"unknown {base.name} option(s) {sorted(unknown)}: "
                             f"see lit_inversion.sipit.{type(base).__name__}")
    loaded = model if isinstance(model, LoadedModel) else load_model(model)
    states = torch.as_tensor(states, device="cpu") if not isinstance(states, torch.Tensor) else states
    if states.dim() == 3 and states.shape[0] == 1:
        states = states[0]
    if states.dim() != 2 or states.shape[0] == 0:
        raise InversionError(f"states have shape {list(states.shape)}: expected [T, d] with T >= 1")
    if states.shape[-1] != loaded.hidden_size:
        raise InversionError(f"states have hidden size {states.shape[-1]} but the model's is {loaded.hidden_size}")
    if not bool(torch.isfinite(states).all()):
        raise InversionError("states contain NaN or inf: remove or recapture them")
    cfg = replace(base, **options)
    prefix = context_prefix(loaded.bos_id, prepend_bos)
    with LayerProbe(loaded, layer) as probe:
        if isinstance(cfg, PezConfig):
            result = invert_pez(probe, states, prefix, cfg, true_ids=true_ids)
        else:
            index = _token_index(probe, prefix, cfg)
            result = invert(probe, states.float().to(probe.device), prefix, cfg, true_ids=true_ids, table=index,
                            capture_dtype=capture_dtype)
    result.recovered_text = decode(loaded.tokenizer, result.recovered_ids)
    return result


# The last index built: a notebook inverting prompt after prompt at one layer loads the table and
# computes the surrogate's features once (for a 262k vocabulary that is seconds and gigabytes; one kept).
_last_index: tuple[weakref.ref, tuple, TokenIndex] | None = None


def _token_index(probe: LayerProbe, prefix: list[int], config: SipItConfig) -> TokenIndex:
    global _last_index
    weight = probe.embedding.weight
    key = (weight._version, probe.layer, tuple(prefix), config.use_table, config.token_map)  # _version: edited in place
    if _last_index is None or _last_index[0]() is not weight or _last_index[1] != key:
        _last_index = None  # free the old index before building the next
        _last_index = (weakref.ref(weight), key, build_index(probe, prefix, config))
    return _last_index[2]


def capture_hidden_states(text_or_ids: str | list[int], model: str | LoadedModel = DEFAULT_MODEL,
                          layer: int = 15, prepend_bos: bool = True, capture_dtype: str = "float32") -> torch.Tensor:
    """The [T, d] states of a prompt at `layer`, in the convention `invert_hidden_states` expects
    (`capture_dtype`: as a stack serving the model in that dtype computes them)."""
    from lit_inversion.sipit.algorithm import capture_probe
    from lit_inversion.tokens import encode

    check_capture_dtype(capture_dtype)
    loaded = model if isinstance(model, LoadedModel) else load_model(model)
    ids = encode(loaded.tokenizer, text_or_ids) if isinstance(text_or_ids, str) else list(text_or_ids)
    with LayerProbe(loaded, layer) as probe:
        if capture_dtype == "float32" and probe.model.dtype == torch.float32:
            return probe.states(ids, context_prefix(loaded.bos_id, prepend_bos))
        with capture_probe(probe, capture_dtype) as capture:
            return capture.states(ids, context_prefix(loaded.bos_id, prepend_bos))
