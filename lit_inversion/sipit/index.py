"""Per-run precomputations the policies search over: token embeddings, the first-position table and
the learned state->token map."""

from __future__ import annotations

import torch

from lit_inversion.sipit.config import SipItConfig
from lit_inversion.sipit.table import first_position_table
from lit_inversion.sipit.token_map import StateTokenMap, learned_token_map
from lit_inversion.states import LayerProbe, check_finite


class TokenIndex:
    """Embeddings, the first-position table and the state->token map, in float32, with the norms the
    rankings need."""

    def __init__(self, embedding: torch.Tensor, table: torch.Tensor | None, token_map: StateTokenMap | None = None):
        self.embedding = embedding.detach().float()
        self.token_map = None if token_map is None else token_map.to(self.embedding.device)
        # The map's cosine ranking needs unit embeddings ([V, d]: 113 MB for SmolLM2, 0.7 GB for a 262k vocabulary).
        self.embedding_unit = None if token_map is None else (
            self.embedding / self.embedding.norm(dim=-1, keepdim=True).clamp(min=1e-6))
        self.embedding_sq = self.embedding.pow(2).sum(-1)
        self.table = None if table is None else table.float()
        self.table_sq = None if table is None else self.table.pow(2).sum(-1)
        self.table_unit = None if table is None else self.table / self.table.norm(dim=-1, keepdim=True).clamp(min=1e-6)
        self._features: dict[int, torch.Tensor] = {}

    def features(self, rank: int) -> torch.Tensor:
        """[V, rank] token features for the surrogate: the standardised table state and embedding, PCA-reduced."""
        if rank not in self._features:
            parts = [_standardise(self.embedding)]
            if self.table is not None:
                parts.append(_standardise(self.table))
            x = torch.cat(parts, dim=1)
            x = x - x.mean(0)
            check_finite(x, "the surrogate's token features", "check the model's embeddings and table for overflow")
            generator = torch.Generator(device="cpu").manual_seed(0)
            sample = x[torch.randperm(x.shape[0], generator=generator, device="cpu")[:8192].to(x.device)]
            basis = torch.linalg.svd(sample, full_matrices=False).Vh[:rank].T
            self._features[rank] = x @ basis
        return self._features[rank]

    def table_order(self, target: torch.Tensor) -> torch.Tensor:
        """All tokens by L2 distance of their table state to the target (exact at the first position)."""
        return (self.table_sq - 2 * self.table @ target).argsort()

    def table_cosine_top(self, target: torch.Tensor, k: int) -> torch.Tensor:
        """The k tokens whose table state points most nearly the target's way (context shifts norms)."""
        return (self.table_unit @ target).topk(min(k, self.table_unit.shape[0])).indices


    def map_top(self, target: torch.Tensor, k: int) -> torch.Tensor:
        """The k tokens whose embedding the state->token map reads from the target (cosine)."""
        scores = self.embedding_unit @ self.token_map.predict(target)
        return scores.topk(min(k, len(scores))).indices


def build_index(probe: LayerProbe, prefix: list[int], config: SipItConfig) -> TokenIndex:
    """The index a run at this layer searches over (the table and map are cached on disk, built once)."""
    table = first_position_table(probe, prefix) if config.use_table else None
    token_map = learned_token_map(probe, prefix) if config.token_map else None
    return TokenIndex(probe.embedding.weight, table, token_map)


def _standardise(x: torch.Tensor) -> torch.Tensor:
    return (x - x.mean(0)) / x.std(0).clamp(min=1e-6)
