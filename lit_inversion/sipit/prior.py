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


def final_norm_and_head(model: nn.Module) -> tuple[nn.Module, nn.Module] | None:
    """The model's final norm and vocabulary head, where they are plain attributes (Llama-style `norm`,
    GPT-2's `ln_f`); None for architectures this does not recognise."""
    backbone = model.get_decoder() if hasattr(model, "get_decoder") else model
    norm = next((getattr(backbone, name) for name in ("norm", "ln_f", "final_layernorm", "final_layer_norm")
                 if isinstance(getattr(backbone, name, None), nn.Module)), None)
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    return (norm, head) if norm is not None and head is not None else None


class LensPrior:
    """The prior at the model's last layer, for free: the target state of the previous position is the
    very state the model reads its next-token distribution from, so the final norm and the head give the
    prior without a forward (a full-model forward per position is ~0.13 s on CPU for the default model)."""

    def __init__(self, model: nn.Module, targets: torch.Tensor, norm_and_head: tuple[nn.Module, nn.Module],
                 prefix: Sequence[int] = (), device: torch.device | None = None):
        self.norm, self.head = norm_and_head
        self.targets = targets
        self.softcap = getattr(getattr(model, "config", None), "final_logit_softcapping", None)
        self.position = 0  # prompt tokens recovered so far
        # The first position's prior follows the fixed prefix (BOS), whose state is not a target: one forward.
        self.first = LanguagePrior(model, prefix, device or targets.device) if prefix else None

    def append(self, token: int) -> None:
        self.position += 1
        self.first = None

    def probs(self) -> torch.Tensor | None:
        if self.position == 0:
            return self.first.probs() if self.first is not None else None
        state = self.targets[self.position - 1][None].to(self.head.weight.device, self.head.weight.dtype)
        with torch.no_grad():
            logits = self.head(self.norm(state))[0].float()
        if self.softcap:
            logits = torch.tanh(logits / self.softcap) * self.softcap
        return logits.softmax(-1)
