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
    rankings need. Norms, not unit copies: at |V| = 128k, d = 4096 each [V, d] float32 copy is 2.1 GB."""

    def __init__(self, embedding: torch.Tensor, table: torch.Tensor | None, token_map: StateTokenMap | None = None):
        self.embedding = embedding.detach().float()  # the model's own weight when it is float32: no copy
        self.token_map = None if token_map is None else token_map.to(self.embedding.device)
        self.embedding_sq = self.embedding.pow(2).sum(-1)
        self.embedding_norm = self.embedding_sq.sqrt().clamp(min=1e-6)
        self.table = None if table is None else table.float()
        self.table_sq = None if table is None else self.table.pow(2).sum(-1)
        self.table_norm = None if table is None else self.table_sq.sqrt().clamp(min=1e-6)
        self._features: dict[int, torch.Tensor] = {}

    def features(self, rank: int, chunk: int = 8192) -> torch.Tensor:
        """[V, rank] token features for the surrogate: the standardised table state and embedding,
        PCA-reduced (the basis from 8,192 sampled tokens), built chunk by chunk: no [V, 2d] matrix."""
        if rank not in self._features:
            parts = [self.embedding] + ([self.table] if self.table is not None else [])
            stats = [torch.std_mean(p, dim=0) for p in parts]

            def standardised(rows: torch.Tensor) -> torch.Tensor:
                return torch.cat([(p[rows] - mean) / std.clamp(min=1e-6) for p, (std, mean) in zip(parts, stats)], 1)

            vocab, device = self.embedding.shape[0], self.embedding.device
            generator = torch.Generator(device="cpu").manual_seed(0)
            sample = standardised(torch.randperm(vocab, generator=generator, device="cpu")[:8192].to(device))
            check_finite(sample, "the surrogate's token features", "check the model's embeddings and table for overflow")
            basis = torch.linalg.svd(sample - sample.mean(0), full_matrices=False).Vh[:rank].T
            out = torch.empty(vocab, basis.shape[1], device=device)
            for start in range(0, vocab, chunk):
                rows = torch.arange(start, min(vocab, start + chunk), device=device)
                out[rows] = standardised(rows) @ basis
            self._features[rank] = out
        return self._features[rank]

    def table_order(self, target: torch.Tensor) -> torch.Tensor:
        """All tokens by L2 distance of their table state to the target (exact at the first position)."""
        return (self.table_sq - 2 * self.table @ target).argsort()

    def table_cosine_top(self, target: torch.Tensor, k: int) -> torch.Tensor:
        """The k tokens whose table state points most nearly the target's way (context shifts norms)."""
        return ((self.table @ target) / self.table_norm).topk(min(k, self.table.shape[0])).indices

    def map_top(self, target: torch.Tensor, k: int) -> torch.Tensor:
        """The k tokens whose embedding the state->token map reads from the target (cosine)."""
        scores = (self.embedding @ self.token_map.predict(target)) / self.embedding_norm
        return scores.topk(min(k, len(scores))).indices


def build_index(probe: LayerProbe, prefix: list[int], config: SipItConfig) -> TokenIndex:
    """The index a run at this layer searches over (the table and map are cached on disk, built once)."""
    table = first_position_table(probe, prefix) if config.use_table else None
    token_map = learned_token_map(probe, prefix) if config.token_map else None
    return TokenIndex(probe.embedding.weight, table, token_map)
