"""SIP-It: exact prompt recovery from hidden states, one position at a time.

At position t the prefix is already recovered, so the state there is a function of one token. A
policy proposes untested tokens in batches; the verifier runs them in one batched forward on top of
the prefix's key/value cache, through the first `layer` blocks only, and accepts a token whose state
lies within `atol + rtol * ||target||` of the target (for captures made in bf16/fp16: a calibrated
relative tolerance, and a margin over every other tested token). A token is never tested twice at a
position, so a position costs at most |V| tests.
"""

from __future__ import annotations

import copy
import dataclasses
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from lit_inversion.errors import InversionError
from lit_inversion.precision import model_dtype_region
from lit_inversion.sipit.config import SipItConfig, check_capture_dtype
from lit_inversion.sipit.index import TokenIndex
from lit_inversion.sipit.policies import Policy, make_policy
from lit_inversion.sipit.prior import LanguagePrior, LensPrior, final_norm_and_head
from lit_inversion.sipit.search import GrowingRows, PositionSearch
from lit_inversion.states import LayerProbe

__all__ = ["SipItConfig", "SipItResult", "PositionSearch", "GrowingRows", "invert", "capture_probe"]


@dataclass
class SipItResult:
    recovered_ids: list[int]
    distances: list[float]  # verifier distance of the returned token, per position
    verified: list[bool]  # False where no token was accepted (best candidate returned)
    # 1 - d(returned) / d(nearest other tested token): near 0 when the choice was a toss-up
    # (noisy states), 1 when nothing else came close (or nothing else was tested).
    confidence: list[float]
    candidates_tested: list[int]
    seconds: float
    true_ids: list[int] | None = None
    position_seconds: list[float] = field(default_factory=list)
    recovered_text: str | None = None
    # The robustness condition: d(returned) is below half the gap to every other tested token's state.
    certified: list[bool] = field(default_factory=list)

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


def capture_probe(probe: LayerProbe, capture_dtype: str) -> LayerProbe:
    """A probe at the same layer on a copy of the model cast to `capture_dtype`, as serving stacks run it
    (`model.to(bfloat16)`: weights, activations and the residual stream all in that dtype)."""
    dtype = getattr(torch, check_capture_dtype(capture_dtype))
    # deepcopy with every floating tensor pre-cast in its memo: the copy is built in `dtype` directly,
    # without a second float32 model on the device (tied weights stay tied: the memo is keyed by identity).
    memo: dict[int, object] = {}
    for p in probe.model.parameters():
        memo.setdefault(id(p), torch.nn.Parameter(p.detach().to(dtype), requires_grad=False))
    for b in probe.model.buffers():
        memo.setdefault(id(b), b.to(dtype) if b.is_floating_point() else b.clone())
    model = copy.deepcopy(probe.model, memo).to(dtype)
    return LayerProbe(dataclasses.replace(probe.loaded, model=model), probe.layer)


def invert(
    probe: LayerProbe,
    targets: torch.Tensor,
    prefix: list[int],
    config: SipItConfig | None = None,
    true_ids: list[int] | None = None,
    table: torch.Tensor | TokenIndex | None = None,
    on_position: Callable[[int, int, int], None] | None = None,
    capture_dtype: str = "float32",
    verifier_probe: LayerProbe | None = None,
) -> SipItResult:
    """Recover the prompt whose states at `probe.layer` (after `prefix`) are `targets` [T, d].

    `capture_dtype` is the dtype the model ran in when `targets` were computed; for bfloat16/float16,
    candidates are verified on `verifier_probe` (default: `capture_probe(probe, capture_dtype)`, made here).
    """
    check_capture_dtype(capture_dtype)
    config = config or SipItConfig()
    own = verifier_probe is None and capture_dtype != "float32" and config.verify_in == "capture"
    if own:
        verifier_probe = capture_probe(probe, capture_dtype)
    try:
        # Everything but the chains (which pick their own dtype) runs in float32, whatever autocast the
        # caller (e.g. a trainer's mixed precision) has on: the KV cache feeds the float32 verifier.
        with model_dtype_region(probe.device):
            return _invert(probe, targets, prefix, config, true_ids, table, on_position,
                           capture_dtype, verifier_probe)
    finally:
        if own:
            verifier_probe.close()


def _invert(probe, targets, prefix, config, true_ids, table, on_position, capture_dtype, verifier_probe) -> SipItResult:
    device = probe.device
    embedding = probe.embedding.weight.detach()
    # A TokenIndex is built once by a caller that inverts many prompts (with use_table already applied).
    index = table if isinstance(table, TokenIndex) else TokenIndex(embedding, table if config.use_table else None)
    generator = torch.Generator(device="cpu").manual_seed(config.seed)
    policy: Policy = make_policy(config)
    budget = min(config.max_candidates or embedding.shape[0], embedding.shape[0])
    cache = probe.prefix_cache(prefix)
    low = capture_dtype != "float32" and config.verify_in == "capture"
    low_cache = verifier_probe.prefix_cache(prefix) if low else None
    prior = None
    if config.lm_prior and config.policy == "gradient":
        lens = final_norm_and_head(probe.model) if probe.layer == probe.loaded.num_layers else None
        prior = LensPrior(probe.model, targets, lens, prefix, device) if lens is not None else LanguagePrior(probe.model, prefix, device)
    result = SipItResult([], [], [], [], [], 0.0, true_ids=list(true_ids) if true_ids is not None else None)
    start = time.perf_counter()
    for t in range(targets.shape[0]):
        position_start = time.perf_counter()
        position = len(prefix) + t
        search = PositionSearch(probe, cache, position, targets[t].to(device), config, index, generator,
                                keep_states=policy.needs_states, capture_dtype=capture_dtype,
                                verifier=(verifier_probe, low_cache) if low else (probe, cache),
                                prior=prior.probs if prior is not None else None,
                                prior_is_free=isinstance(prior, LensPrior))
        search.position_is_first = t == 0
        policy.reset(search)
        accepted: tuple[int, float] | None = None
        batch = config.batch_size
        while accepted is None and search.num_tested < budget:
            ids = policy.propose(search, min(batch, budget - search.num_tested))
            batch = min(2 * batch, max(config.batch_size, config.max_batch_size))
            if ids.numel() == 0:
                break
            accepted = search.accepted(ids, search.verify(ids))
        if accepted is None and search.best_id is None:
            raise InversionError(
                f"no candidate at position {t} had a finite distance to the target ({search.num_tested} tested): "
                f"the model's layer-{probe.layer} states overflow or are NaN for every candidate; load the model "
                f"in float32 (or check the target states for NaN/inf)")
        token, distance = accepted if accepted is not None else (search.best_id, search.best_distance)
        result.recovered_ids.append(int(token))
        result.distances.append(distance)
        result.verified.append(accepted is not None)
        result.certified.append(search.certified(int(token), distance))
        result.confidence.append(round(search.confidence(int(token), distance), 4))
        result.candidates_tested.append(search.num_tested)
        result.position_seconds.append(time.perf_counter() - position_start)
        if on_position is not None:
            on_position(t, int(token), search.num_tested)
        extended = search.cache_with(int(token)) if accepted is not None else None
        cache = extended if extended is not None else probe.extend(cache, int(token), position)
        if low:
            low_cache = verifier_probe.extend(low_cache, int(token), position)
        if prior is not None:
            prior.append(int(token))
    result.seconds = time.perf_counter() - start
    return result
