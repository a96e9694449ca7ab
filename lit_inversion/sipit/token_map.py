"""A state->token map learned once per (model, layer, prefix): a ridge regression from a layer's state
to the embedding of the token at that position, fit on random-token contexts and cached on disk.

Deep layers are where the first-position table stops ranking well (context moves the state far from its
context-free value) and where the LM prior misses the first rare word of a sentence. The current token
stays linearly readable from the residual stream, so the map ranks the whole vocabulary for one matvec.
Measured on the default model at layer 30, on held-out natural sentences: the true token's median rank
is ~50 (the prior's ~20, the table's ~850), and the better of the map and the prior has a mean rank of
~220 where the prior alone has ~2,800. Random-token contexts generalise better than model-sampled text
(mean rank 2,250 against 8,100 on natural sentences) and cost no generation.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lit_inversion.models import cache_dir
from lit_inversion.sipit.table import cache_key, save_cached
from lit_inversion.states import LayerProbe, check_finite

MAP_SAMPLES = 16384  # states in the fit: 512 contexts of 32 random tokens (~40 s once at layer 30 on 2 cores)
MAP_CONTEXT = 32
MAP_RIDGE = 1e-3  # relative to the mean diagonal of the (standardised) Gram matrix


@dataclass
class StateTokenMap:
    mean: torch.Tensor  # [d] state mean of the fit
    scale: torch.Tensor  # [d] state standard deviation
    weight: torch.Tensor  # [d, e] standardised state -> embedding

    def to(self, device: torch.device) -> StateTokenMap:
        return StateTokenMap(self.mean.to(device), self.scale.to(device), self.weight.to(device))

    def predict(self, state: torch.Tensor) -> torch.Tensor:
        """[e] the embedding the map reads from a state."""
        return ((state.float() - self.mean) / self.scale) @ self.weight


@torch.no_grad()
def learned_token_map(probe: LayerProbe, prefix: list[int], samples: int = MAP_SAMPLES, context: int = MAP_CONTEXT,
                      batch_size: int = 16, cache: bool = True, seed: int = 0) -> StateTokenMap:
    """The layer's state->token map, fit on `samples` states of random-token contexts after `prefix`."""
    path = cache_dir() / "tables" / cache_key(probe, prefix, f"map{samples}x{context}")
    if cache and path.is_file():
        return StateTokenMap(**torch.load(path, map_location=probe.device))
    vocab = probe.embedding.weight.shape[0]
    generator = torch.Generator().manual_seed(seed)
    contexts = torch.randint(0, vocab, (max(1, samples // context), context), generator=generator)
    head = torch.tensor(list(prefix), dtype=torch.long).expand(len(contexts), -1)
    sequences = torch.cat([head, contexts], 1).to(probe.device)
    states, tokens = [], []
    with torch.autocast(probe.device.type, enabled=False):
        for start in range(0, len(sequences), batch_size):
            rows = sequences[start : start + batch_size]
            out = probe.forward(input_ids=rows)[:, len(prefix):].float()
            states.append(out.reshape(-1, out.shape[-1]))
            tokens.append(rows[:, len(prefix):].reshape(-1))
    x, y = torch.cat(states).double(), torch.cat(tokens)
    check_finite(x, f"the layer-{probe.layer} states of the token map's random contexts",
                 "the model overflows at this layer in its dtype: load it in float32, or pick another layer")
    mean, scale = x.mean(0), x.std(0).clamp(min=1e-3)
    x = (x - mean) / scale
    gram = x.T @ x
    ridge = MAP_RIDGE * gram.diagonal().mean()
    target = probe.embedding.weight.detach().double()[y]
    weight = torch.linalg.solve(gram + ridge * torch.eye(len(gram), dtype=gram.dtype, device=gram.device), x.T @ target)
    token_map = StateTokenMap(mean.float(), scale.float(), weight.float())
    if cache:
        save_cached({k: v.cpu() for k, v in vars(token_map).items()}, path)
    return token_map
