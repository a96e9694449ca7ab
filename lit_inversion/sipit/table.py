"""The first-position table: the state of every vocabulary token right after the fixed prefix.

The first prompt position sees only the fixed prefix (BOS or nothing), so its state is a function of
the token alone. Computing it once per (model, layer, prefix) turns that position into a lookup and
gives the guided policy a context-free ranking for later positions. Tables are cached on disk beside
the converted models in bfloat16: float32's range (float16 overflows on real models: SmolLM2's layer-15
states reach 28,576, Gemma-3's exceed 65,504) at half its size (57 MB for SmolLM2-135M, 335 MB for
Gemma-3-270M's 262k tokens). The table only ranks candidates; every acceptance is a float32 forward.
"""

from __future__ import annotations

import hashlib

import torch

from lit_inversion.cache import built_once, cache_dir
from lit_inversion.precision import model_dtype_region
from lit_inversion.states import LayerProbe, check_finite, expand_cache

TABLE_DTYPE = torch.bfloat16
_FORMAT = "bf16"  # part of the cache key: tables cached in another dtype (float16 overflowed) are rebuilt


def cache_key(probe: LayerProbe, prefix: list[int], kind: str) -> str:
    """A file name for a per-(model, layer, prefix) precomputation of the given kind."""
    weight = probe.embedding.weight
    fingerprint = weight[:: max(1, weight.shape[0] // 64), :16].detach().float().cpu().numpy().tobytes()
    digest = hashlib.sha1(fingerprint + repr((probe.loaded.name, tuple(weight.shape), prefix)).encode()).hexdigest()
    return f"{kind}-{digest[:16]}-layer{probe.layer}.pt"


@torch.no_grad()
def first_position_table(probe: LayerProbe, prefix: list[int], batch_size: int = 512, cache: bool = True) -> torch.Tensor:
    """[V, d] states at the first prompt position for every token (bfloat16 on the probe's device)."""
    path = cache_dir() / "tables" / cache_key(probe, prefix, f"table-{_FORMAT}")
    if not cache:
        return _build_table(probe, prefix, batch_size)

    def load(path):
        table = torch.load(path, map_location=probe.device)
        check_finite(table, f"the first-position table of layer {probe.layer}", f"delete {path} and run again")
        return table

    return built_once(path, lambda: _build_table(probe, prefix, batch_size), load, saved=lambda table: table.cpu())


def _build_table(probe: LayerProbe, prefix: list[int], batch_size: int) -> torch.Tensor:
    what = f"the first-position table of layer {probe.layer}"
    vocab = probe.embedding.weight.shape[0]
    rows = []
    with model_dtype_region(probe.device):  # float32 states, also under mixed precision
        prefix_cache = probe.prefix_cache(prefix)
        for start in range(0, vocab, batch_size):
            ids = torch.arange(start, min(vocab, start + batch_size), device=probe.device)
            states = probe.forward(input_ids=ids[:, None], cache=expand_cache(prefix_cache, len(ids)), start=len(prefix))
            check_finite(states, f"{what} (tokens {start}..{start + len(ids) - 1})",
                         "the model overflows at this layer in its dtype: load it in float32, or pick another layer")
            rows.append(states[:, 0].to(TABLE_DTYPE))
        return torch.cat(rows)
