"""A state->token map learned once per (model, layer, prefix): from a layer's state to the embedding of
the token at that position, fit on random-token contexts and cached on disk.

Deep layers are where the first-position table stops ranking well (context moves the state far from its
context-free value) and where the LM prior misses the first rare word of a sentence. The current token
stays linearly readable from the residual stream, so the map ranks the whole vocabulary for one matvec.

The fit is a ridge regression (closed form), then a few epochs of a sampled-softmax cross-entropy over
the cosines to the unit embeddings: the ranking itself is what the search uses, and regressing onto the
embedding weighs every embedding direction alike. Measured on the default model at layer 30, on
sentences and random prompts of my own (156 positions): the true token's median rank fell from 84 to 2,
and the share of positions with the true token in the top 64 from 48% to 82% (natural text 94/120,
random tokens 35/36), for ~25 s more once. Random-token contexts generalise better than model-sampled
text (ridge: mean rank 2,250 against 8,100 on natural sentences) and cost no generation.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lit_inversion.cache import built_once, cache_dir
from lit_inversion.precision import model_dtype_region
from lit_inversion.sipit.table import cache_key
from lit_inversion.states import LayerProbe, check_finite

MAP_SAMPLES = 16384  # states in the fit: 512 contexts of 32 random tokens (~40 s once at layer 30 on 2 cores)
MAP_CONTEXT = 32
MAP_RIDGE = 1e-3  # relative to the mean diagonal of the (standardised) Gram matrix
# The ranking fine-tune: more epochs over 16k samples overfit (the held-out tail grew after ~4); a
# sampled softmax over 8,192 random tokens ranked as well as the full one, at a cost independent of |V|.
MAP_EPOCHS = 4
MAP_NEGATIVES = 8192
MAP_BATCH = 512


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
    path = cache_dir() / "tables" / cache_key(probe, prefix, f"map{samples}x{context}ce{MAP_EPOCHS}")
    if not cache:
        return _fit_map(probe, prefix, samples, context, batch_size, seed)
    return built_once(path, lambda: _fit_map(probe, prefix, samples, context, batch_size, seed),
                      lambda path: StateTokenMap(**torch.load(path, map_location=probe.device)),
                      saved=lambda token_map: {k: v.cpu() for k, v in vars(token_map).items()})


def _fit_map(probe: LayerProbe, prefix: list[int], samples: int, context: int, batch_size: int,
             seed: int) -> StateTokenMap:
    vocab = probe.embedding.weight.shape[0]
    generator = torch.Generator(device="cpu").manual_seed(seed)  # the same fit on every device
    contexts = torch.randint(0, vocab, (max(1, samples // context), context), generator=generator, device="cpu")
    head = torch.tensor(list(prefix), dtype=torch.long, device="cpu").expand(len(contexts), -1)
    sequences = torch.cat([head, contexts], 1).to(probe.device)
    states, tokens = [], []
    with model_dtype_region(probe.device):
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
    target = probe.embedding.weight.detach()[y].double()  # only the rows fitted, not a [V, d] float64 copy
    weight = torch.linalg.solve(gram + ridge * torch.eye(len(gram), dtype=gram.dtype, device=gram.device), x.T @ target)
    weight = _fit_ranking(x.float(), y, weight.float(), probe.embedding.weight.detach().float(), generator)
    return StateTokenMap(mean.float(), scale.float(), weight)


def _fit_ranking(x: torch.Tensor, tokens: torch.Tensor, weight: torch.Tensor, embedding: torch.Tensor,
                 generator: torch.Generator) -> torch.Tensor:
    """`weight` fine-tuned so that the cosine of the mapped state to each unit embedding ranks the true
    token first: a cross-entropy over the batch's tokens and MAP_NEGATIVES random ones."""
    unit = embedding / embedding.norm(dim=-1, keepdim=True).clamp(min=1e-6)
    vocab, device = unit.shape[0], unit.device
    tokens = tokens.to(device)
    weight = weight.clone().requires_grad_(True)
    log_scale = torch.tensor(3.0, device=device, requires_grad=True)  # the softmax's inverse temperature
    optimizer = torch.optim.Adam([weight, log_scale], lr=1e-3)
    lookup = torch.full((vocab,), -1, dtype=torch.long, device=device)
    with torch.enable_grad(), model_dtype_region(device):
        for _ in range(MAP_EPOCHS):
            for rows in torch.randperm(len(x), generator=generator, device="cpu").to(device).split(MAP_BATCH):
                y = tokens[rows]
                negatives = torch.randint(0, vocab, (MAP_NEGATIVES,), generator=generator, device="cpu").to(device)
                candidates = torch.unique(torch.cat([y, negatives]))
                lookup[candidates] = torch.arange(len(candidates), device=device)
                mapped = x[rows] @ weight
                mapped = mapped / mapped.norm(dim=-1, keepdim=True).clamp(min=1e-6)
                logits = log_scale.exp() * mapped @ unit[candidates].T
                loss = torch.nn.functional.cross_entropy(logits, lookup[y])
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
    return weight.detach()
