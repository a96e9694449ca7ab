"""Hidden states at a layer, computed by running only the first `layer` blocks.

Layer convention (Hugging Face `hidden_states` indexing): layer 0 is the input embeddings (for GPT-2,
token + position embeddings), layer l in 1..L is the residual stream after block l. Layer L is the
last block's output *before* the final norm, as in the SIP-It reference code (Hugging Face's
`hidden_states[L]` has the final norm applied; ours does not).

The forward stops at the probed block by raising from a hook, so no later block, final norm or
vocabulary head is computed. This works for any decoder whose blocks sit in one ModuleList.
Injected `inputs_embeds` are raw embedding rows: a scaled embedding (Gemma's `embed_scale`, sqrt(d))
is applied here, as the model applies it to looked-up ids but not to embeddings passed in.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence

import torch
from torch import nn

from lit_inversion.errors import InversionError
from lit_inversion.models import LoadedModel
from lit_inversion.precision import exact_float32


class _Captured(Exception):
    def __init__(self, state: torch.Tensor):
        self.state = state


def find_blocks(model: nn.Module, num_layers: int) -> nn.ModuleList:
    """The decoder's ModuleList of transformer blocks."""
    candidates = [m for m in model.modules() if isinstance(m, nn.ModuleList) and len(m) == num_layers]
    if not candidates:
        raise InversionError(
            f"cannot find the {num_layers} transformer blocks of {type(model).__name__}: "
            "lit-inversion needs a decoder whose blocks sit in one nn.ModuleList"
        )
    return candidates[0]


_FULL_RUNS: set[int] = set()  # ids of models that run past every probe's hook (see full_forward)


@contextlib.contextmanager
def full_forward(model: nn.Module) -> Iterator[None]:
    """Run `model` through all its blocks and head although probes are attached (e.g. for its logits)."""
    _FULL_RUNS.add(id(model))
    try:
        yield
    finally:
        _FULL_RUNS.discard(id(model))


class LayerProbe:
    """Computes states at one layer, with a reusable key/value cache for the prefix."""

    def __init__(self, loaded: LoadedModel, layer: int):
        num_layers = loaded.num_layers
        if not -num_layers <= layer <= num_layers:
            raise InversionError(
                f"layer {layer} is out of range for a model with {num_layers} layers: "
                f"use 0 (embeddings) to {num_layers} (last block), or a negative index"
            )
        self.layer = layer % (num_layers + 1) if layer < 0 else layer
        self.loaded = loaded
        self.model = loaded.model
        self.backbone = self.model.get_decoder() if hasattr(self.model, "get_decoder") else self.model
        self.embedding = self.model.get_input_embeddings()
        check_finite(self.embedding.weight, f"the input embeddings of {loaded.name}",
                     "the model file is damaged: reconvert or redownload it")
        # Gemma-style embeddings scale looked-up rows (by sqrt(d)); the model skips that for inputs_embeds.
        scale = getattr(self.embedding, "embed_scale", None)
        self.embed_scale = None if scale is None or float(scale) == 1.0 else scale
        blocks = find_blocks(self.model, num_layers)
        if self.layer == 0:
            self._hook = blocks[0].register_forward_pre_hook(self._capture_input, with_kwargs=True)
        else:
            self._hook = blocks[self.layer - 1].register_forward_hook(self._capture_output)

    # Hooks -----------------------------------------------------------------------------------
    def _capture_input(self, module, args, kwargs):
        if id(self.model) in _FULL_RUNS:
            return None
        state = args[0] if args else kwargs["hidden_states"]
        raise _Captured(state)

    def _capture_output(self, module, args, output):
        if id(self.model) in _FULL_RUNS:
            return None
        raise _Captured(output[0] if isinstance(output, tuple) else output)

    def close(self) -> None:
        self._hook.remove()

    def __enter__(self) -> "LayerProbe":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # Forwards --------------------------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        return self.embedding.weight.device

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        cache=None,
        start: int = 0,
    ) -> torch.Tensor:
        """States [B, S, d] of the given tokens (or embeddings), appended after `cache` if given."""
        from transformers import DynamicCache

        x = inputs_embeds if inputs_embeds is not None else input_ids
        length = x.shape[1]
        position_ids = torch.arange(start, start + length, device=x.device).unsqueeze(0).expand(x.shape[0], -1)
        kwargs = dict(position_ids=position_ids, use_cache=True, past_key_values=cache if cache is not None else DynamicCache())
        if inputs_embeds is not None:
            if self.embed_scale is not None:
                inputs_embeds = inputs_embeds * self.embed_scale.to(inputs_embeds.dtype)
            kwargs["inputs_embeds"] = inputs_embeds
        else:
            kwargs["input_ids"] = input_ids
        try:
            with exact_float32():  # a TF32 state misses the verifier's tolerance
                self.backbone(**kwargs)
        except _Captured as captured:
            return captured.state
        raise RuntimeError("the probed block never ran")  # pragma: no cover

    def states(self, ids: Sequence[int], prefix: Sequence[int] = ()) -> torch.Tensor:
        """States [T, d] of `ids` (the prompt) in one full-sequence forward after `prefix`."""
        full = torch.tensor([list(prefix) + list(ids)], device=self.device)
        with torch.no_grad():
            out = self.forward(input_ids=full)[0, len(prefix):].float()
        check_finite(out, f"the model's layer-{self.layer} states of a {len(ids)}-token prompt",
                     "the model overflows at this layer: load it in float32, or pick another layer")
        return out

    def prefix_cache(self, prefix: Sequence[int]):
        """A batch-1 cache holding the prefix's keys and values (None for an empty prefix)."""
        from transformers import DynamicCache

        if len(prefix) == 0:
            return None
        cache = DynamicCache()
        with torch.no_grad():
            self.forward(input_ids=torch.tensor([list(prefix)], device=self.device), cache=cache)
        return cache

    def extend(self, cache, token: int, position: int):
        """Append one token to a batch-1 prefix cache (returns the cache)."""
        from transformers import DynamicCache

        cache = cache if cache is not None else DynamicCache()
        with torch.no_grad():
            self.forward(input_ids=torch.tensor([[token]], device=self.device), cache=cache, start=position)
        return cache


def check_finite(tensor: torch.Tensor, what: str, fix: str) -> None:
    """One clear error instead of a NaN/inf that would surface later as a linear-algebra traceback."""
    finite = torch.isfinite(tensor)
    if not bool(finite.all()):
        bad = int((~finite).sum())
        dtype = str(tensor.dtype).removeprefix("torch.")
        raise InversionError(f"non-finite values in {what}: {bad} NaN or inf ({dtype}): {fix}")


def expand_cache(cache, batch: int):
    """A new cache whose tensors are batch-expanded views of a batch-1 cache (no copy)."""
    from transformers import DynamicCache

    if cache is None:
        return DynamicCache()
    data = [(k.expand(batch, -1, -1, -1), v.expand(batch, -1, -1, -1)) for k, v, *_ in cache if k is not None]
    return DynamicCache(ddp_cache_data=data)


# float16's largest finite value is 65,504; real models' deep states reach that (Gemma-3's exceed it) and
# intermediate activations run higher than the states, so float16 is kept well below the limit.
FLOAT16_SAFE = 2.0 ** 13


def within_range(dtype: torch.dtype, target: torch.Tensor) -> torch.dtype:
    """`dtype`, or float32 where it is float16 and the target state is too large for float16's range."""
    if dtype == torch.float16 and float(target.abs().max()) > FLOAT16_SAFE:
        return torch.float32
    return dtype
