"""The LM's own next-token distribution given the recovered prefix ("Hidden No More", Thomas et al.).

On natural text the true token is usually among the model's first few guesses. The prior keeps its
own full-model key/value cache (all blocks and the head) and is lazy: recovered tokens queue up and
are fed in one forward when a position first asks for the distribution, so positions that never ask
(e.g. shallow layers, where the table's first batch hits) cost nothing, and the others one forward.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from lit_inversion.states import full_forward


class LanguagePrior:
    def __init__(self, model: nn.Module, prefix: Sequence[int], device: torch.device):
        from transformers import DynamicCache

        self.model = model
        self.device = device
        self.cache = DynamicCache()
        self.fed = 0  # tokens in the cache
        self.pending: list[int] = list(prefix)
        self._probs: torch.Tensor | None = None

    def append(self, token: int) -> None:
        """A recovered token (queued until the distribution is next asked for)."""
        self.pending.append(token)

    def probs(self) -> torch.Tensor | None:
        """[V] next-token probabilities after every token appended so far (None with no token at all)."""
        if self.pending:
            ids = torch.tensor([self.pending], device=self.device)
            positions = torch.arange(self.fed, self.fed + len(self.pending), device=self.device)[None]
            with torch.no_grad(), full_forward(self.model):
                out = self.model(input_ids=ids, position_ids=positions, past_key_values=self.cache, use_cache=True)
            self.fed += len(self.pending)
            self.pending = []
            self._probs = out.logits[0, -1].float().softmax(-1)
        return self._probs
