"""Candidate policies for SIP-It. A policy only proposes; the verifier decides and keeps the book.

* `random`: brute force, a seeded random permutation of the vocabulary.
* `gradient`: the guided policy, which merges several rankings into each batch:
  - the LM prior: the model's own next-token distribution given the recovered prefix, best first
    (`prior_share` of every batch, within its `prior_mass` nucleus; it joins the first batch only at
    the last layer, where it costs no forward, and elsewhere only after the first batch missed);
  - the learned state->token map (sipit/token_map.py): a share of the first batch and `map_share` of
    later ones, while its top-`map_top` list lasts (in the first quarter of the model it waits for a
    miss, as the prior does); it is what ranks deep layers, where the table drifts;
  - the first-position table: the state of every token right after the fixed prefix. At the first
    position it is exact, so that position is a lookup; later, its best cosine matches fill the rest
    of the first batch (context shifts norms more than directions);
  - gradient chains: continuous embeddings take SGD steps on the state distance, as in the paper's
    Algorithm 3, many in one batched forward/backward, and each step proposes the untested token
    nearest each chain; chains restart from the best verified tokens;
  - a surrogate, every other batch once the table is spent: a ridge regression from token features to
    the states verified so far at this position, which ranks the whole vocabulary for one small solve.
"""

from __future__ import annotations

import torch

from lit_inversion.sipit.config import SipItConfig
from lit_inversion.sipit.index import TokenIndex
from lit_inversion.sipit.search import PositionSearch
from lit_inversion.precision import resolve_dtype
from lit_inversion.states import within_range

__all__ = ["Policy", "RandomPolicy", "GradientPolicy", "TokenIndex", "make_policy", "surrogate_proposals"]


class Policy:
    needs_states = False  # whether the verifier must keep every verified state for this policy

    def reset(self, search: PositionSearch) -> None:
        raise NotImplementedError

    def propose(self, search: PositionSearch, k: int) -> torch.Tensor:
        raise NotImplementedError


def _untested_in_order(order: torch.Tensor, taken: torch.Tensor, k: int) -> torch.Tensor:
    return order[~taken[order]][:k]


class RandomPolicy(Policy):
    def reset(self, search):
        # A CPU generator (the same order on every device), moved once.
        self.order = torch.randperm(search.vocab_size, generator=search.generator, device="cpu").to(search.tested.device)

    def propose(self, search, k):
        return _untested_in_order(self.order, search.tested, k)


class GradientPolicy(Policy):
    def __init__(self, config: SipItConfig):
        self.config = config
        self.needs_states = config.surrogate_rank > 0

    def reset(self, search):
        self.steps = 0
        self.rounds = 0
        self.batches = 0
        self.embeds: torch.Tensor | None = None
        self.table_order: torch.Tensor | None = None
        self.table_is_exact = search.position_is_first
        if search.index.table is not None:
            if self.table_is_exact:
                self.table_order = search.index.table_order(search.target)
            else:
                self.table_order = search.index.table_cosine_top(search.target, self.config.batch_size)
        self.prior_order: torch.Tensor | None = None
        self.map_order: torch.Tensor | None = None
        self.map_asked = not (self.config.token_map and search.index.token_map is not None) or (
            self.table_is_exact and self.table_order is not None)
        # Except at the last layer (where the lens gives it for free) the prior costs a full-model
        # forward, about what the first batch costs at layer 15, and the map's and table's first batch
        # nearly always hits: there it waits for a miss.
        self.prior_wait = 0 if search.prior_is_free else 1
        # In the first quarter of the model the table's first batch nearly always hits: the map waits too.
        self.map_wait = 0 if 4 * search.probe.layer >= search.probe.loaded.num_layers else 1
        self.prior_asked = not self.config.lm_prior or (self.table_is_exact and self.table_order is not None)

    def _prior_order(self, search) -> torch.Tensor | None:
        if not self.prior_asked and self.batches >= self.prior_wait:
            self.prior_asked = True
            probs = search.prior()
            if probs is not None:
                probs, order = probs.sort(descending=True)
                nucleus = int((probs.cumsum(0) < self.config.prior_mass).sum()) + 1
                self.prior_order = order[:nucleus]
        return self.prior_order

    def propose(self, search, k):
        if self.table_is_exact and self.table_order is not None:
            return _untested_in_order(self.table_order, search.tested, k)
        taken = search.tested.clone()  # tested, or already in this batch
        first = self.batches <= max(self.prior_wait, self.map_wait)
        prior_order = self._prior_order(search)
        if not self.map_asked and self.batches >= self.map_wait:
            self.map_asked = True
            self.map_order = search.index.map_top(search.target, self.config.map_top)
        self.batches += 1
        ranked = [(order, share) for order, share in ((prior_order, self.config.prior_share),
                                                      (self.map_order, self.config.map_share)) if order is not None]
        parts = []
        for order, share in ranked:
            # The first batch is split evenly between the ranked sources and the table's cosine matches.
            count = round(k / (len(ranked) + (self.table_order is not None)) if first else k * share)
            parts.append(_untested_in_order(order, taken, count))
            taken[parts[-1]] = True
        rest = k - sum(len(p) for p in parts)
        if rest > 0:
            parts.append(self._others(search, taken, rest))
        return torch.cat(parts)

    def _others(self, search, taken: torch.Tensor, k: int) -> torch.Tensor:
        if self.table_order is not None:
            ids = _untested_in_order(self.table_order, taken, k)
            if ids.numel() > 0:
                return ids
            self.table_order = None
        self.rounds += 1
        if self.config.surrogate_rank and self.rounds % 2 == 0 and search.num_tested >= 16:
            features = search.index.features(self.config.surrogate_rank)
            return surrogate_proposals(search, features, k, locality=self.config.surrogate_locality, taken=taken)
        self._step(search)
        # Nearest untaken token to each chain, in L2.
        dist = search.index.embedding_sq[:, None] - 2 * search.index.embedding @ self.embeds.T  # [V, K]
        dist[taken] = torch.inf
        per_chain = -(-k // self.embeds.shape[0])
        nearest = dist.topk(min(per_chain + 2, dist.shape[0]), dim=0, largest=False).indices  # [n, K]
        seen, out = set(), []
        fresh = (~taken[nearest.flatten()]).tolist()
        for i, is_fresh in zip(nearest.flatten().tolist(), fresh):
            if is_fresh and i not in seen:
                seen.add(i)
                out.append(i)
                if len(out) == k:
                    break
        if not out:  # everything near is taken: fall back to any untaken token
            return _untested_in_order(torch.arange(search.vocab_size, device=taken.device), taken, k)
        return torch.tensor(out, dtype=torch.long, device=taken.device)

    def _seed_chains(self, search) -> None:
        k = self.config.chains
        best = search.best_verified(k)
        if best.numel() < k:
            extra = torch.randint(0, search.vocab_size, (k - best.numel(),), generator=search.generator, device="cpu")
            best = torch.cat([best, extra.to(best.device)])
        self.embeds = search.embedding[best].float().clone()

    def _step(self, search) -> None:
        if self.embeds is None or self.steps % self.config.snap_every == 0:
            self._seed_chains(search)
        self.steps += 1
        embeds = self.embeds.clone().requires_grad_(True)
        device = search.embedding.device
        low = within_range(resolve_dtype(self.config.chain_dtype, device), search.target)
        with torch.enable_grad(), torch.autocast(device.type, dtype=low, enabled=low != torch.float32):
            states = search.states(inputs_embeds=embeds.to(search.probe.embedding.weight.dtype))
            loss = ((states.float() - search.target) ** 2).mean(dim=-1).sum()
            (grad,) = torch.autograd.grad(loss, embeds)
        norms = grad.norm(dim=-1, keepdim=True).clamp(min=1.0)
        self.embeds = (embeds - self.config.learning_rate * grad / norms).detach()


def surrogate_proposals(search: PositionSearch, features: torch.Tensor, k: int, locality: float = 1.0,
                        ridge: float = 1.0, taken: torch.Tensor | None = None) -> torch.Tensor:
    """The k untaken tokens (default: untested) whose state a ridge regression, fit on this position's
    verified states, predicts nearest the target. The fit is free (no extra forward) and learns how this
    context moves each token's state; the gradient chains explore where it is wrong. Verified tokens
    near the target weigh more (exp(-locality * (d / median d)^2)): the fit only has to be right near
    the answer."""
    taken = search.tested if taken is None else taken
    states = search.verified_states.all()  # the first SURROGATE_ROWS verified (search.py)
    ids = search.verified_ids.all()[: len(states)]
    scale = states.std(0).clamp(min=1e-3)  # whiten: a few massive dimensions would dominate raw L2
    y = (states - search.target) / scale
    x = features[ids]
    distances = search.verified_distances.all()[: len(states)]
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
    scores[taken] = torch.inf
    return scores.topk(min(k, int((~taken).sum())), largest=False).indices


def make_policy(config: SipItConfig) -> Policy:
    """The policy named by a validated config ("random" or "gradient")."""
    return RandomPolicy() if config.policy == "random" else GradientPolicy(config)
