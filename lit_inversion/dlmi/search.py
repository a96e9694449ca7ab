"""The discrete swap search: single-token swaps ranked by the one-hot gradient, scored on the exact criterion.

For a discrete prompt the teacher-forced argmax at every target position equals the target exactly
when greedy decoding reproduces it (same ids, same forward), so every scored candidate is a free
exact check. Candidates are ranked by `lead` (how many leading target positions the argmax gets
right) first, then by a per-position loss: the hinge `relu(best other logit - target logit + kappa)`
summed over the scored window (or the cross-entropy). Only the first `lead + window` target
positions are scored (a curriculum over the target prefix that also shortens every forward).

Cost: the candidates that change position p share the prompt before p, so its keys/values come from
the gradient forward's cache and only the rest is run; vocabulary logits are computed only at the
scored target positions (backbone, then the LM head on those rows).

These are plain functions over one target; `DlmiBatch` keeps the per-target state.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

try:  # the cache class that lets candidates share the prompt prefix
    from transformers import DynamicCache
except ImportError:  # pragma: no cover - older transformers: full forwards
    DynamicCache = None

BIG = 1e6  # one more right leading position outweighs any loss difference


@dataclass
class Scored:
    lead: torch.Tensor  # [R] leading target positions the teacher-forced argmax gets right
    key: torch.Tensor  # [R] float64 rank key, smaller is better
    pred: torch.Tensor  # [R, w] teacher-forced argmax


def position_losses(logits: torch.Tensor, target: torch.Tensor, objective: str, kappa: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(margin [R, w], loss [R, w]) for logits [R, w, V] and target [w]; margin < 0 iff the argmax is right."""
    logits = logits.float()
    at_target = logits.gather(-1, target.expand(logits.shape[0], -1)[..., None])[..., 0]
    other = logits.scatter(-1, target.expand(logits.shape[0], -1)[..., None], -torch.inf).amax(-1)
    margin = other - at_target
    if objective == "ce":
        loss = torch.logsumexp(logits, -1) - at_target
    else:
        loss = torch.relu(margin + kappa)
    return margin, loss


def score(logits: torch.Tensor, target: torch.Tensor, objective: str, kappa: float,
          first_weight: float = 4.0) -> tuple[Scored, torch.Tensor]:
    """Rank keys for candidates' logits [R, w, V]; also the differentiable loss [R].

    The loss sums the per-position losses, the first wrong position's weighted by `first_weight`
    (it is the one the next step of the curriculum needs)."""
    margin, loss = position_losses(logits, target, objective, kappa)
    right = margin.detach() < 0
    lead = right.long().cumprod(1).sum(1)
    first = lead.clamp(max=target.shape[0] - 1)
    weight = torch.ones_like(loss)
    weight[torch.arange(loss.shape[0]), first] += (first_weight - 1.0) * (lead < target.shape[0]).float()
    total = (loss * weight).sum(1)
    key = (target.shape[0] - lead).double() * BIG + total.detach().double()
    return Scored(lead, key, logits.detach().argmax(-1)), total


class PromptScorer:
    """Forwards of `[prefix] + prompt + target[:w-1]` that return logits at the w target positions only."""

    def __init__(self, model: nn.Module, prefix: list[int], share_prefix: bool = True):
        self.model, self.prefix = model, prefix
        self.base, self.head = model.base_model, model.get_output_embeddings()
        self.E = model.get_input_embeddings().weight
        self.share_prefix = share_prefix and DynamicCache is not None

    def _embed(self, ids: torch.Tensor) -> torch.Tensor:
        return self.E[ids]

    def with_gradient(self, prompt: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, object]:
        """(logits [1, w, V], prompt embeddings [1, N, d] with grad, detached cache) for one prompt [N]."""
        w = target.shape[0]
        emb = self._embed(prompt[None]).detach().requires_grad_(True)
        parts = [self._embed(torch.tensor([self.prefix], dtype=torch.long))] if self.prefix else []
        parts += [emb, self._embed(target[None, : w - 1])]
        out = self.base(inputs_embeds=torch.cat(parts, 1), use_cache=self.share_prefix)
        hidden = out.last_hidden_state[:, -w:]
        cache = out.past_key_values if self.share_prefix else None
        if cache is not None and not isinstance(cache, DynamicCache):
            cache = None  # another cache layout: candidates run full forwards
        if cache is not None:
            cache = [(layer.keys.detach(), layer.values.detach()) for layer in cache.layers]
        return self.head(hidden), emb, cache

    @torch.no_grad()
    def candidates(self, prompt: torch.Tensor, position: int, tokens: torch.Tensor, target: torch.Tensor,
                   cache) -> torch.Tensor:
        """Logits [K, w, V] of the prompts that put each of `tokens` [K] at `position` of `prompt` [N]."""
        K, w, P = tokens.shape[0], target.shape[0], len(self.prefix)
        rest = torch.cat([prompt[position + 1 :], target[: w - 1]])
        if cache is not None and P + position > 0:
            ids = torch.cat([tokens[:, None], rest.expand(K, -1)], 1)
            past = DynamicCache([(k[:, :, : P + position].expand(K, -1, -1, -1),
                                  v[:, :, : P + position].expand(K, -1, -1, -1)) for k, v in cache],
                                config=self.model.config)
            hidden = self.base(inputs_embeds=self._embed(ids), past_key_values=past, use_cache=True).last_hidden_state
        else:
            head = torch.cat([torch.tensor(self.prefix, dtype=torch.long), prompt[:position]])
            ids = torch.cat([head.expand(K, -1), tokens[:, None], rest.expand(K, -1)], 1)
            hidden = self.base(inputs_embeds=self._embed(ids), use_cache=False).last_hidden_state
        return self.head(hidden[:, -w:])


def lcs_length(a: list[int], b: list[int]) -> int:
    row = [0] * (len(b) + 1)
    for x in a:
        prev = 0
        for j, y in enumerate(b):
            cur = row[j + 1]
            row[j + 1] = prev + 1 if x == y else max(row[j + 1], row[j])
            prev = cur
    return row[-1]


def copy_ok(prompt: list[int], target: list[int], position: int, token: int, limit: float,
            target_set: set[int]) -> bool:
    """Whether putting `token` at `position` keeps LCS(prompt, target) / len(target) <= limit.

    A token outside the target cannot lengthen the LCS, so only target tokens need the DP."""
    if limit >= 1.0 or token not in target_set:
        return True
    changed = prompt[:position] + [token] + prompt[position + 1 :]
    return lcs_length(changed, target) <= limit * len(target) + 1e-9
