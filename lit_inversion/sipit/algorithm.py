"""SIP-It: exact prompt recovery from hidden states, one position at a time.

At position t the prefix is already recovered, so the state there is a function of one token. A
policy proposes untested tokens in batches; the verifier runs them in one batched forward on top of
the prefix's key/value cache, through the first `layer` blocks only, and accepts a token whose state
lies within `atol + rtol * ||target||` of the target. A token is never tested twice at a position,
so a position costs at most |V| tests.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from lit_inversion.errors import InversionError
from lit_inversion.sipit.policies import Policy, TokenIndex, make_policy
from lit_inversion.states import LayerProbe, expand_cache, resolve_dtype


@dataclass
class SipItConfig:
    """SIP-It settings (the defaults give exact recovery in float32)."""

    policy: str = "gradient"  # "gradient" (guided) or "random" (brute force)
    batch_size: int = 64  # candidates in the first batched forward at a position
    max_batch_size: int = 256  # later batches double up to this (or batch_size, if larger)
    rtol: float = 1e-4  # verifier tolerance relative to ||target||
    atol: float = 1e-4
    max_candidates: int | None = None  # per position; None = the whole vocabulary (exactness guarantee)
    chains: int = 16  # parallel gradient chains of the guided policy
    learning_rate: float = 1.0
    chain_dtype: str = "auto"  # the chains' forward/backward dtype (ranking only); auto as screen_dtype
    # Dtype of the batched screening forward (auto = bfloat16 where the hardware computes it fast).
    # Candidates screened within tolerance + screen_slack * ||target|| are re-run in float32, and only a
    # float32 distance accepts. Off by default: bf16 states of the default model are usually within ~1%
    # of the norm, but one measured token was off by 7%, and a missed token costs a whole-vocabulary pass.
    screen_dtype: str = "float32"
    screen_slack: float = 0.25
    snap_every: int = 50  # re-seed chains on the best verified tokens every N steps
    surrogate_rank: int = 128  # every other batch from a ridge fit on the verified states (0 = chains only)
    surrogate_locality: float = 1.0  # how much more verified tokens near the target weigh in that fit
    use_table: bool = True  # rank with a cached table of every token's state after the fixed prefix
    seed: int = 0

    def __post_init__(self) -> None:
        problems = []
        if self.policy not in ("gradient", "random"):
            problems.append(f"policy '{self.policy}' is unknown: use 'gradient' or 'random'")
        for name in ("batch_size", "max_batch_size", "chains", "snap_every"):
            if getattr(self, name) < 1:
                problems.append(f"{name} must be at least 1 (got {getattr(self, name)})")
        if self.max_candidates is not None and self.max_candidates < 1:
            problems.append(f"max_candidates must be at least 1 or null for the whole vocabulary (got {self.max_candidates})")
        for name in ("chain_dtype", "screen_dtype"):
            if getattr(self, name) not in ("auto", "float32", "bfloat16", "float16"):
                problems.append(f"{name} '{getattr(self, name)}' is unknown: use auto, float32, bfloat16 or float16")
        if self.surrogate_rank < 0:
            problems.append(f"surrogate_rank must be 0 (off) or positive (got {self.surrogate_rank})")
        if self.rtol < 0 or self.atol < 0 or self.screen_slack < 0 or self.surrogate_locality < 0:
            problems.append("rtol, atol, screen_slack and surrogate_locality must not be negative")
        if problems:
            raise InversionError("; ".join(problems))


@dataclass
class SipItResult:
    recovered_ids: list[int]
    distances: list[float]  # verifier distance of the returned token, per position
    verified: list[bool]  # False where no token came within tolerance (best candidate returned)
    # 1 - d(returned) / d(nearest other tested token): near 0 when the choice was a toss-up
    # (noisy states), 1 when nothing else came close (or nothing else was tested).
    confidence: list[float]
    candidates_tested: list[int]
    seconds: float
    true_ids: list[int] | None = None
    position_seconds: list[float] = field(default_factory=list)
    recovered_text: str | None = None

    @property
    def exact_match(self) -> bool | None:
        return None if self.true_ids is None else self.recovered_ids == list(self.true_ids)

    @property
    def token_accuracy(self) -> float | None:
        if self.true_ids is None:
            return None
        hits = sum(int(a == b) for a, b in zip(self.recovered_ids, self.true_ids))
        return hits / max(1, len(self.true_ids))

    @property
    def max_distance(self) -> float:
        return max(self.distances) if self.distances else 0.0


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
    """Everything a policy may use at one position; the verifier keeps the book of tested tokens."""

    def __init__(self, probe: LayerProbe, cache, position: int, target: torch.Tensor, config: SipItConfig,
                 index: TokenIndex, generator: torch.Generator):
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
        self.tested = torch.zeros(self.vocab_size, dtype=torch.bool, device=self.embedding.device)
        self.tolerance = config.atol + config.rtol * float(self.target.norm())
        self.screen_dtype = resolve_dtype(config.screen_dtype, self.embedding.device)
        self.screen_radius = self.tolerance + config.screen_slack * float(self.target.norm())
        self.best_id: int | None = None
        self.best_distance = math.inf
        self.second_distance = math.inf
        # Every verified token with its distance (and state, for the surrogate), in test order.
        self.verified_ids = GrowingRows()
        self.verified_distances = GrowingRows()
        self.verified_states = GrowingRows()

    @property
    def num_tested(self) -> int:
        return int(self.tested.sum())

    def states(self, input_ids: torch.Tensor | None = None, inputs_embeds: torch.Tensor | None = None) -> torch.Tensor:
        x = input_ids if input_ids is not None else inputs_embeds
        cache = expand_cache(self.cache, x.shape[0])
        ids = input_ids[:, None] if input_ids is not None else None
        embeds = inputs_embeds[:, None, :] if inputs_embeds is not None else None
        return self.probe.forward(input_ids=ids, inputs_embeds=embeds, cache=cache, start=self.position)[:, 0]

    def _states(self, ids: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        device = self.embedding.device.type
        with torch.no_grad(), torch.autocast(device, dtype=dtype, enabled=dtype != torch.float32):
            return self.states(input_ids=ids).float()

    def verify(self, ids: torch.Tensor) -> torch.Tensor:
        """Distances of the candidates' states to the target; marks them tested.

        A low-precision screen is re-run in float32 for every candidate it puts near the target, so
        whatever is within tolerance is a float32 distance.
        """
        if bool(self.tested[ids].any()):
            raise RuntimeError("policy proposed a token that was already tested at this position")
        states = self._states(ids, self.screen_dtype)
        distances = (states - self.target).norm(dim=-1)
        if self.screen_dtype != torch.float32:
            near = distances <= self.screen_radius
            if bool(near.any()):
                distances[near] = (self._states(ids[near], torch.float32) - self.target).norm(dim=-1)
        if self.config.surrogate_rank and self.config.policy == "gradient":  # the surrogate's training data
            self.verified_states.append(states)
        self.tested[ids] = True
        self.verified_ids.append(ids)
        self.verified_distances.append(distances)
        values, order = distances.topk(min(2, len(ids)), largest=False)
        for value, j in zip(values.tolist(), order.tolist()):
            if value < self.best_distance:
                self.second_distance = self.best_distance
                self.best_distance, self.best_id = value, int(ids[j])
            elif value < self.second_distance:
                self.second_distance = value
        return distances

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


def invert(
    probe: LayerProbe,
    targets: torch.Tensor,
    prefix: list[int],
    config: SipItConfig | None = None,
    true_ids: list[int] | None = None,
    table: torch.Tensor | TokenIndex | None = None,
    on_position: Callable[[int, int, int], None] | None = None,
) -> SipItResult:
    """Recover the prompt whose states at `probe.layer` (after `prefix`) are `targets` [T, d]."""
    # Everything but the chains (which pick their own dtype) runs in float32, whatever autocast the
    # caller (e.g. a trainer's mixed precision) has on: the KV cache feeds the float32 verifier.
    with torch.autocast(probe.device.type, enabled=False):
        return _invert(probe, targets, prefix, config or SipItConfig(), true_ids, table, on_position)


def _invert(probe, targets, prefix, config, true_ids, table, on_position) -> SipItResult:
    device = probe.device
    embedding = probe.embedding.weight.detach()
    # A TokenIndex is built once by a caller that inverts many prompts (with use_table already applied).
    index = table if isinstance(table, TokenIndex) else TokenIndex(embedding, table if config.use_table else None)
    generator = torch.Generator(device="cpu").manual_seed(config.seed)
    policy: Policy = make_policy(config)
    budget = min(config.max_candidates or embedding.shape[0], embedding.shape[0])
    cache = probe.prefix_cache(prefix)
    result = SipItResult([], [], [], [], [], 0.0, true_ids=list(true_ids) if true_ids is not None else None)
    start = time.perf_counter()
    for t in range(targets.shape[0]):
        position_start = time.perf_counter()
        position = len(prefix) + t
        search = PositionSearch(probe, cache, position, targets[t].to(device), config, index, generator)
        search.position_is_first = t == 0
        policy.reset(search)
        accepted: int | None = None
        accepted_distance = math.inf
        batch = config.batch_size
        while accepted is None and search.num_tested < budget:
            ids = policy.propose(search, min(batch, budget - search.num_tested))
            batch = min(2 * batch, max(config.batch_size, config.max_batch_size))
            if ids.numel() == 0:
                break
            distances = search.verify(ids)
            within = distances <= search.tolerance
            if bool(within.any()):
                j = int(torch.where(within, distances, math.inf).argmin())
                accepted, accepted_distance = int(ids[j]), float(distances[j])
        token = accepted if accepted is not None else search.best_id
        distance = accepted_distance if accepted is not None else search.best_distance
        result.recovered_ids.append(int(token))
        result.distances.append(distance)
        result.verified.append(accepted is not None)
        result.confidence.append(round(search.confidence(int(token), distance), 4))
        result.candidates_tested.append(search.num_tested)
        result.position_seconds.append(time.perf_counter() - position_start)
        if on_position is not None:
            on_position(t, int(token), search.num_tested)
        cache = probe.extend(cache, int(token), position)
    result.seconds = time.perf_counter() - start
    return result
