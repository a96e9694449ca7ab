"""HardPrompts (PEZ, Wen et al., 2023): the SIP-It paper's projected-embedding baseline.

The whole prompt is optimised at once under the same L2 loss on the states at `probe.layer` (the
mean squared error over all T positions, after the same [BOS] prefix as SIP-It). The PEZ trick:
keep a continuous embedding per position; every step projects it onto the nearest token embedding
(L2), runs the forward and backward on the projected (real-token) prompt, and applies that gradient
to the continuous copy with AdamW. The result is the projected prompt with the lowest loss seen.

The default budget is T * |V| steps, the brute-force bound (docs/ALGORITHMS.md §1); `budget_scale`
shrinks it for CPU runs and `num_steps` sets it outright. A step whose projected prompt reproduces
every target state within the SIP-It verifier's tolerance ends the search (an exact recovery).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import ClassVar

import torch

from lit_inversion.errors import InversionError
from lit_inversion.precision import model_dtype_region
from lit_inversion.sipit.algorithm import SipItResult
from lit_inversion.sipit.config import StatesConfig
from lit_inversion.states import LayerProbe


@dataclass
class PezConfig(StatesConfig):
    """HardPrompts (PEZ, Wen et al., 2023): the whole prompt at once, projected onto real tokens every
    step; stops early when every position is within the SIP-It verifier's tolerance."""

    name: ClassVar[str] = "pez"
    label: ClassVar[str] = "PEZ"

    learning_rate: float = 0.1
    """AdamW's learning rate, as in PEZ."""
    weight_decay: float = 0.1
    """AdamW's weight decay, as in PEZ."""
    budget_scale: float = 1.0
    """Steps = ceil(budget_scale * T * |V|), the brute-force bound scaled."""
    num_steps: int | None = None
    """Steps outright (null: the scaled budget)."""

    def __post_init__(self) -> None:
        problems = []
        if not self.learning_rate > 0:
            problems.append(f"learning_rate must be positive (got {self.learning_rate})")
        if self.weight_decay < 0:
            problems.append(f"weight_decay must not be negative (got {self.weight_decay})")
        if not self.budget_scale > 0:
            problems.append(f"budget_scale must be positive (got {self.budget_scale}): "
                            "it multiplies the T * |V| step budget")
        if self.num_steps is not None and self.num_steps < 1:
            problems.append(f"num_steps must be at least 1, or null for budget_scale * T * |V| (got {self.num_steps})")
        if self.rtol < 0 or self.atol < 0:
            problems.append("rtol and atol must not be negative")
        if problems:
            raise InversionError("; ".join(problems))

    def steps_for(self, length: int, vocab_size: int) -> int:
        if self.num_steps is not None:
            return self.num_steps
        return max(1, math.ceil(self.budget_scale * length * vocab_size))


torch.serialization.add_safe_globals([PezConfig])  # checkpoints hold it (see sipit/config.py)


def nearest_tokens(vectors: torch.Tensor, embedding: torch.Tensor) -> torch.Tensor:
    """[T] ids of the embedding rows nearest (L2) to each of `vectors` [T, d]."""
    # ||x - e||^2 = ||x||^2 - 2 x.e + ||e||^2; the first term does not change the argmin.
    scores = 2 * vectors @ embedding.T - (embedding * embedding).sum(-1)
    return scores.argmax(-1)


def invert_pez(probe: LayerProbe, targets: torch.Tensor, prefix: list[int], config: PezConfig | None = None,
               true_ids: list[int] | None = None) -> SipItResult:
    """Recover the prompt whose states at `probe.layer` (after `prefix`) are `targets` [T, d], PEZ-style."""
    # float32 like the SIP-It verifier, and gradients on even under a caller's no_grad.
    with model_dtype_region(probe.device), torch.enable_grad():
        return _invert_pez(probe, targets.float().to(probe.device), list(prefix), config or PezConfig(), true_ids)


def _invert_pez(probe, targets, prefix, config, true_ids) -> SipItResult:
    start = time.perf_counter()
    E = probe.embedding.weight.detach().float()
    T, V = targets.shape[0], E.shape[0]
    generator = torch.Generator(device="cpu").manual_seed(config.seed)  # the same start on every device
    init = torch.randint(V, (T,), generator=generator, device="cpu").to(E.device)
    soft = torch.nn.Parameter(E[init].clone())  # the continuous copy the optimiser moves
    optimizer = torch.optim.AdamW([soft], lr=config.learning_rate, weight_decay=config.weight_decay)
    prefix_emb = E[torch.tensor(prefix, dtype=torch.long, device=E.device)]
    tolerance = config.atol + config.rtol * targets.norm(dim=-1)  # [T]
    budget = config.steps_for(T, V)
    best_loss, best_ids, best_distances = math.inf, init, torch.full((T,), math.inf, device=E.device)
    steps = 0
    while steps < budget:
        ids = nearest_tokens(soft.detach(), E)
        projected = E[ids].clone().requires_grad_(True)
        x = torch.cat([prefix_emb, projected])[None]
        states = probe.forward(inputs_embeds=x)[0, len(prefix):].float()
        diff = states - targets
        loss = (diff * diff).mean()
        steps += 1
        distances = diff.detach().norm(dim=-1)
        value = float(loss.detach())
        if value < best_loss:
            best_loss, best_ids, best_distances = value, ids, distances
        if bool((distances <= tolerance).all()):
            break
        (grad,) = torch.autograd.grad(loss, projected)
        soft.grad = grad  # the PEZ trick: the projected prompt's gradient moves the continuous one
        optimizer.step()
    recovered = best_ids.tolist()
    return SipItResult(
        recovered_ids=recovered,
        distances=best_distances.tolist(),
        verified=(best_distances <= tolerance).tolist(),
        confidence=[],  # SIP-It's per-position margin has no PEZ counterpart
        candidates_tested=[steps] * T,  # every step tests one token at every position
        seconds=time.perf_counter() - start,
        true_ids=list(true_ids) if true_ids is not None else None,
    )
