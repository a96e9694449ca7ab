"""The verifier's book at one position: what was tested, how far each state was from the target,
and the acceptance rule. It knows nothing of which policy proposes."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from lit_inversion.sipit.config import CAPTURE_RTOL, SipItConfig
from lit_inversion.sipit.index import TokenIndex
from lit_inversion.precision import resolve_dtype
from lit_inversion.states import LayerProbe, expand_cache, within_range


# The surrogate fits on at most this many verified states per position (a position that tests the whole
# vocabulary would otherwise keep |V| x d floats: 2.1 GB at |V| = 128k, d = 4096).
SURROGATE_ROWS = 16384


class GrowingRows:
    """Rows appended batch by batch into one buffer that doubles when full, so reading all of them
    never re-concatenates the batches (a hard position verifies ~100 batches)."""

    def __init__(self):
        self.buffer: torch.Tensor | None = None
        self.size = 0

    def __len__(self) -> int:
        return self.size

    def append(self, rows: torch.Tensor) -> None:
        if self.buffer is None or self.size + len(rows) > len(self.buffer):
            capacity = max(256, 2 * self.size, self.size + len(rows))
            grown = rows.new_empty((capacity, *rows.shape[1:]))
            if self.buffer is not None:
                grown[: self.size] = self.buffer[: self.size]
            self.buffer = grown
        self.buffer[self.size : self.size + len(rows)] = rows
        self.size += len(rows)

    def all(self) -> torch.Tensor:
        """A view of every row appended so far (valid until the next append)."""
        return self.buffer[: self.size]


class PositionSearch:
    """Everything a policy may use at one position; the verifier keeps the book of tested tokens.

    `probe`/`cache` compute float32 states (the policies' gradient chains use them). For a capture made
    in a low-precision dtype, `verifier` is a (probe, cache) pair on the model cast to that dtype, and
    candidates are verified there, as the capturing stack computed them.
    """

    def __init__(self, probe: LayerProbe, cache, position: int, target: torch.Tensor, config: SipItConfig,
                 index: TokenIndex, generator: torch.Generator, *, keep_states: bool = False,
                 capture_dtype: str = "float32", verifier: tuple[LayerProbe, object] | None = None,
                 prior: Callable[[], torch.Tensor | None] | None = None, prior_is_free: bool = False):
        self.probe = probe
        self.cache = cache
        self.position = position
        self.target = target.float()
        self.config = config
        self.index = index
        self.embedding = index.embedding
        self.vocab_size = index.embedding.shape[0]
        self.generator = generator
        self.position_is_first = False
        self.keep_states = keep_states  # the policy fits a surrogate on the verified states
        self._prior = prior  # computes the LM's next-token probabilities given the prefix, on demand
        self.prior_is_free = prior_is_free  # no forward to compute it (the last layer's lens)
        self.tested = torch.zeros(self.vocab_size, dtype=torch.bool, device=self.embedding.device)
        norm = float(self.target.norm())
        self.exact = capture_dtype == "float32"
        if self.exact:
            self.tolerance = config.atol + config.rtol * norm
        else:
            rtol = config.capture_rtol if config.capture_rtol is not None else CAPTURE_RTOL[capture_dtype]
            self.tolerance = config.atol + rtol * norm
        self.verifier = verifier
        self.screen_dtype = within_range(resolve_dtype(config.screen_dtype, self.embedding.device), self.target)
        self.screen_radius = self.tolerance + config.screen_slack * norm
        self.best_id: int | None = None
        self.best_distance = math.inf
        self.second_distance = math.inf
        # Every verified token with its distance (and state, for the surrogate), in test order.
        self.verified_ids = GrowingRows()
        self.verified_distances = GrowingRows()
        self.verified_states = GrowingRows()
        self._last_batch: tuple[torch.Tensor, object] | None = None  # ids and batch cache of the last float32 forward

    def prior(self) -> torch.Tensor | None:
        """[V] the LM's next-token probabilities given the recovered prefix (None without a prior)."""
        return self._prior() if self._prior is not None else None

    @property
    def num_tested(self) -> int:
        return int(self.tested.sum())

    def states(self, input_ids: torch.Tensor | None = None, inputs_embeds: torch.Tensor | None = None) -> torch.Tensor:
        """Float32-model states of candidate tokens (or embeddings) at this position."""
        return _forward(self.probe, self.cache, self.position, input_ids, inputs_embeds)

    def _states(self, ids: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        device = self.embedding.device.type
        with torch.no_grad(), torch.autocast(device, dtype=dtype, enabled=dtype != torch.float32):
            return self.states(input_ids=ids).float()

    def _capture_states(self, ids: torch.Tensor) -> torch.Tensor:
        probe, cache = self.verifier
        with torch.no_grad():
            return _forward(probe, cache, self.position, ids, None).float()

    def verify(self, ids: torch.Tensor) -> torch.Tensor:
        """Distances of the candidates' states to the target; marks them tested.

        A low-precision screen is re-run in float32 for every candidate it puts near the target, so
        whatever is within tolerance of a float32 capture is a float32 distance.
        """
        if bool(self.tested[ids].any()):
            raise RuntimeError("policy proposed a token that was already tested at this position")
        if self.exact:
            if self.screen_dtype == torch.float32:
                with torch.no_grad():
                    states, batch_cache = _forward(self.probe, self.cache, self.position, ids, None, keep_cache=True)
                states = states.float()
                self._last_batch = (ids, batch_cache)
            else:
                states = self._states(ids, self.screen_dtype)
            distances = (states - self.target).norm(dim=-1)
            if self.screen_dtype != torch.float32:
                near = distances <= self.screen_radius
                if bool(near.any()):
                    distances[near] = (self._states(ids[near], torch.float32) - self.target).norm(dim=-1)
        else:
            states = self._capture_states(ids)
            distances = (states - self.target).norm(dim=-1)
        if self.keep_states and len(self.verified_states) < SURROGATE_ROWS:
            self.verified_states.append(states)
        self.tested[ids] = True
        self.verified_ids.append(ids)
        self.verified_distances.append(distances)
        values, order = distances.topk(min(2, len(ids)), largest=False)
        # One host sync for the batch's two nearest (ids are exact in float64).
        nearest = torch.stack([values.double(), ids[order].double()]).tolist()
        for value, token in zip(*nearest):
            if value < self.best_distance:
                self.second_distance = self.best_distance
                self.best_distance, self.best_id = value, int(token)
            elif value < self.second_distance:
                self.second_distance = value
        return distances

    def accepted(self, ids: torch.Tensor, distances: torch.Tensor) -> tuple[int, float] | None:
        """The token the last verified batch settles the position on, with its distance, or None.

        Float32 captures: any candidate within tolerance (the map is injective, rounding aside).
        Low-precision captures: rounding noise can bring a wrong token's state near, so the nearest
        tested token must also stand out, at most `margin` times as far as the next nearest.
        """
        if self.exact:
            masked = torch.where(distances <= self.tolerance, distances, math.inf)
            j = masked.argmin()
            distance, token = torch.stack([masked[j].double(), ids[j].double()]).tolist()  # one host sync
            return None if math.isinf(distance) else (int(token), distance)
        if self.best_distance <= self.tolerance and self.best_distance <= self.config.margin * self.second_distance:
            return self.best_id, self.best_distance
        return None

    def cache_with(self, token: int):
        """The batch-1 prefix cache extended by `token`, sliced from the last verified batch that ran it
        (saving the one-token forward that extending the cache would cost: ~20% of an easy position at
        layer 30 on CPU), or None if that batch did not run it in float32."""
        if self._last_batch is None:
            return None
        ids, batch_cache = self._last_batch
        rows = torch.nonzero(ids == token).flatten()
        if len(rows) == 0:
            return None
        from transformers import DynamicCache

        j = int(rows[0])
        data = [(k[j : j + 1].clone(), v[j : j + 1].clone()) for k, v, *_ in batch_cache if k is not None]
        return DynamicCache(ddp_cache_data=data)

    def certified(self, token: int, distance: float) -> bool:
        """The paper's robustness condition against every other tested token u: the distance to the target
        is below half the gap ||F(u) - F(token)||, which is at least d(u) - distance."""
        nearest_other = self.second_distance if token == self.best_id else self.best_distance
        return 3 * distance < nearest_other

    def confidence(self, token: int, distance: float) -> float:
        nearest_other = self.second_distance if token == self.best_id else self.best_distance
        if math.isinf(nearest_other):  # nothing else was tested
            return 1.0
        if nearest_other <= 0:
            return 0.0
        return max(0.0, 1.0 - distance / nearest_other)

    def best_verified(self, k: int) -> torch.Tensor:
        """Ids of the k verified tokens nearest to the target so far."""
        if not len(self.verified_ids):
            return torch.empty(0, dtype=torch.long, device=self.embedding.device)
        distances = self.verified_distances.all()
        return self.verified_ids.all()[distances.topk(min(k, len(distances)), largest=False).indices]


def _forward(probe: LayerProbe, cache, position: int, input_ids: torch.Tensor | None,
             inputs_embeds: torch.Tensor | None, keep_cache: bool = False):
    """States [B, d] of one token per row after the prefix `cache` (and the batch cache, if `keep_cache`)."""
    x = input_ids if input_ids is not None else inputs_embeds
    batch = expand_cache(cache, x.shape[0])
    ids = input_ids[:, None] if input_ids is not None else None
    embeds = inputs_embeds[:, None, :] if inputs_embeds is not None else None
    states = probe.forward(input_ids=ids, inputs_embeds=embeds, cache=batch, start=position)[:, 0]
    return (states, batch) if keep_cache else states
