"""Candidate policies for SIP-It. A policy only proposes; the verifier decides and keeps the book.

* `random`: brute force, a seeded random permutation of the vocabulary.
* `gradient`: the guided policy. Continuous embeddings ("chains") take SGD steps on the state
  distance, as in the paper's Algorithm 3, and each step proposes the untested token nearest to each
  chain. Beyond the paper: many chains step in one batched forward/backward, chains restart from the
  best verified tokens, a cached table of every token's state after the fixed prefix ranks the
  first batch (at the first position the table is exact, so that position becomes a lookup), and
  every other batch comes from a surrogate: a ridge regression from token features to the states
  verified so far at this position, which ranks the whole vocabulary at the cost of one small solve.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from lit_inversion.states import check_finite, resolve_dtype

if TYPE_CHECKING:
    from lit_inversion.sipit.algorithm import PositionSearch, SipItConfig


class TokenIndex:
    """Per-run precomputations the policies search over: embeddings and the first-position table."""

    def __init__(self, embedding: torch.Tensor, table: torch.Tensor | None):
        self.embedding = embedding.detach().float()
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
            generator = torch.Generator().manual_seed(0)
            sample = x[torch.randperm(x.shape[0], generator=generator)[:8192].to(x.device)]
            basis = torch.linalg.svd(sample, full_matrices=False).Vh[:rank].T
            self._features[rank] = x @ basis
        return self._features[rank]

    def table_order(self, target: torch.Tensor) -> torch.Tensor:
        """All tokens by L2 distance of their table state to the target (exact at the first position)."""
        return (self.table_sq - 2 * self.table @ target).argsort()

    def table_cosine_top(self, target: torch.Tensor, k: int) -> torch.Tensor:
        """The k tokens whose table state points most nearly the target's way (context shifts norms)."""
        return (self.table_unit @ target).topk(min(k, self.table_unit.shape[0])).indices


class Policy:
    def reset(self, search: "PositionSearch") -> None:
        raise NotImplementedError

    def propose(self, search: "PositionSearch", k: int) -> torch.Tensor:
        raise NotImplementedError


def _standardise(x: torch.Tensor) -> torch.Tensor:
    return (x - x.mean(0)) / x.std(0).clamp(min=1e-6)


def _untested_in_order(order: torch.Tensor, tested: torch.Tensor, k: int) -> torch.Tensor:
    return order[~tested[order]][:k]


class RandomPolicy(Policy):
    def reset(self, search):
        self.order = torch.randperm(search.vocab_size, generator=search.generator).to(search.tested.device)

    def propose(self, search, k):
        return _untested_in_order(self.order, search.tested, k)


class GradientPolicy(Policy):
    def __init__(self, config: "SipItConfig"):
        self.config = config

    def reset(self, search):
        self.steps = 0
        self.rounds = 0
        self.embeds: torch.Tensor | None = None
        self.table_order: torch.Tensor | None = None
        self.table_is_exact = search.position_is_first
        if search.index.table is not None:
            if self.table_is_exact:
                self.table_order = search.index.table_order(search.target)
            else:
                self.table_order = search.index.table_cosine_top(search.target, self.config.batch_size)

    def _seed_chains(self, search) -> None:
        k = self.config.chains
        best = search.best_verified(k)
        if best.numel() < k:
            extra = torch.randint(0, search.vocab_size, (k - best.numel(),), generator=search.generator)
            best = torch.cat([best, extra.to(best.device)])
        self.embeds = search.embedding[best].float().clone()

    def _step(self, search) -> None:
        if self.embeds is None or self.steps % self.config.snap_every == 0:
            self._seed_chains(search)
        self.steps += 1
        embeds = self.embeds.clone().requires_grad_(True)
        device = search.embedding.device
        low = resolve_dtype(self.config.chain_dtype, device)
        with torch.enable_grad(), torch.autocast(device.type, dtype=low, enabled=low != torch.float32):
            states = search.states(inputs_embeds=embeds.to(search.probe.embedding.weight.dtype))
            loss = ((states.float() - search.target) ** 2).mean(dim=-1).sum()
            (grad,) = torch.autograd.grad(loss, embeds)
        norms = grad.norm(dim=-1, keepdim=True).clamp(min=1.0)
        self.embeds = (embeds - self.config.learning_rate * grad / norms).detach()

    def propose(self, search, k):
        if self.table_order is not None:
            ids = _untested_in_order(self.table_order, search.tested, k)
            if self.table_is_exact or ids.numel() > 0:
                return ids
            self.table_order = None
        self.rounds += 1
        if self.config.surrogate_rank and self.rounds % 2 == 0 and search.num_tested >= 16:
            features = search.index.features(self.config.surrogate_rank)
            return surrogate_proposals(search, features, k, locality=self.config.surrogate_locality)
        self._step(search)
        # Nearest untested token to each chain, in L2.
        dist = search.index.embedding_sq[:, None] - 2 * search.index.embedding @ self.embeds.T  # [V, K]
        dist[search.tested] = torch.inf
        per_chain = -(-k // self.embeds.shape[0])
        nearest = dist.topk(min(per_chain + 2, dist.shape[0]), dim=0, largest=False).indices  # [n, K]
        seen, out = set(), []
        fresh = (~search.tested[nearest.flatten()]).tolist()
        for i, is_fresh in zip(nearest.flatten().tolist(), fresh):
            if is_fresh and i not in seen:
                seen.add(i)
                out.append(i)
                if len(out) == k:
                    break
        if not out:  # everything near is tested: fall back to any untested token
            return _untested_in_order(torch.arange(search.vocab_size, device=search.tested.device), search.tested, k)
        return torch.tensor(out, dtype=torch.long, device=search.tested.device)


def surrogate_proposals(search: "PositionSearch", features: torch.Tensor, k: int, locality: float = 1.0,
                        ridge: float = 1.0) -> torch.Tensor:
    """The k untested tokens whose state a ridge regression, fit on this position's verified states,
    predicts nearest the target. The fit is free (no extra forward) and learns how this context moves
    each token's state; the gradient chains explore where it is wrong. Verified tokens near the target
    weigh more (exp(-locality * (d / median d)^2)): the fit only has to be right near the answer."""
    ids = search.verified_ids.all()
    states = search.verified_states.all()
    scale = states.std(0).clamp(min=1e-3)  # whiten: a few massive dimensions would dominate raw L2
    y = (states - search.target) / scale
    x = features[ids]
    distances = search.verified_distances.all()
    weight = torch.exp(-locality * (distances / distances.median().clamp(min=1e-12)).pow(2))[:, None]
    weight = weight / weight.mean()
    x_mean, y_mean = (weight * x).mean(0), (weight * y).mean(0)
    xc, yc = (x - x_mean) * weight.sqrt(), (y - y_mean) * weight.sqrt()
    lam = ridge * xc.pow(2).sum() / xc.shape[1]
    eye = torch.eye(xc.shape[1], device=xc.device)
    coef = torch.linalg.solve(xc.T @ xc + lam * eye, xc.T @ yc)  # [r, d]
    # ||(f - x_mean) W + y_mean||^2 for every token, without forming the [V, d] prediction.
    centred = features - x_mean
    scores = ((centred @ (coef @ coef.T)) * centred).sum(-1) + 2 * centred @ (coef @ y_mean)
    scores[search.tested] = torch.inf
    return scores.topk(min(k, int((~search.tested).sum())), largest=False).indices


def make_policy(config: "SipItConfig") -> Policy:
    """The policy named by a validated config ("random" or "gradient")."""
    return RandomPolicy() if config.policy == "random" else GradientPolicy(config)
