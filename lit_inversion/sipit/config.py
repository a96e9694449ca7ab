"""SIP-It settings, shared by the search loop, the verifier and the policies."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from lit_inversion.errors import InversionError

CAPTURE_DTYPES = ("float32", "bfloat16", "float16")
# Relative tolerance for captures computed in a low-precision dtype, measured on the default model: a
# bf16 capture (full-sequence forward of the model cast to bf16) lies 0.3-2% of ||h|| from the state
# our verifier computes for the true token in bf16 (incremental, on a KV cache), with a tail to ~3%.
CAPTURE_RTOL = {"bfloat16": 0.06, "float16": 0.01}


@dataclass
class StatesConfig:
    """What both hidden states -> prompt methods share: the verifier's tolerance and the seed."""

    name: ClassVar[str] = "states"
    label: ClassVar[str] = "hidden states inversion"

    rtol: float = 1e-4
    """A token is accepted when its state is within atol + rtol * ||target|| (float32 captures)."""
    atol: float = 1e-4
    """The tolerance's absolute part."""
    seed: int = 0
    """Seed of the policy's (or PEZ's) random draws."""


@dataclass
class SipItConfig(StatesConfig):
    """SIP-It (Nikolaou et al., 2025): position by position, a gradient-guided policy proposes
    candidate tokens until the verifier accepts one. The defaults give exact recovery in float32."""

    name: ClassVar[str] = "sipit"
    label: ClassVar[str] = "SIP-It"

    policy: str = "gradient"
    """gradient (guided) or random (brute force)."""
    batch_size: int = 64
    """Candidates in the first batched forward at a position."""
    max_batch_size: int = 256
    """Later batches double up to this (or batch_size, if larger)."""
    max_candidates: int | None = None
    """Candidates per position before giving up; null: the whole vocabulary (the exactness guarantee)."""
    chains: int = 16
    """Parallel gradient chains of the guided policy."""
    learning_rate: float = 1.0
    """The chains' step size."""
    chain_dtype: str = "auto"
    """The chains' forward/backward dtype (ranking only); auto: a mixed-precision trainer's, else as screen_dtype."""
    screen_dtype: str = "float32"
    """Dtype of the batched screening forward (auto: bfloat16 where the hardware computes it fast).
    Candidates screened within tolerance + screen_slack * ||target|| are re-run in float32, and only a
    float32 distance accepts. float32 by default: bf16 states are usually within ~1% of the norm, but
    one measured token was off by 7%, and a missed token costs a whole-vocabulary pass."""
    screen_slack: float = 0.25
    """How far past the tolerance a low-precision screen still sends a candidate to the float32 check."""
    snap_every: int = 50
    """Re-seed the chains on the best verified tokens every N steps."""
    surrogate_rank: int = 128
    """Every other batch comes from a ridge fit on the verified states (0: chains only)."""
    surrogate_locality: float = 1.0
    """How much more verified tokens near the target weigh in that fit."""
    use_table: bool = True
    """Rank with a cached table of every token's state after the fixed prefix."""
    token_map: bool = True
    """A linear map from the layer's state to the token's embedding, fit once per model and layer and
    cached: it ranks deep-layer positions the table no longer does."""
    map_share: float = 0.25
    """Share of every batch after the first that the token map proposes, while its top list lasts."""
    map_top: int = 4096
    """Length of the token map's list per position."""
    lm_prior: bool = True
    """The LM's own next-token distribution given the recovered prefix ranks candidates too."""
    prior_share: float = 0.25
    """Share of later batches from the LM prior (half of the first), while its nucleus lasts."""
    prior_mass: float = 0.999
    """The LM prior's nucleus: its top tokens up to this probability mass."""
    capture_rtol: float | None = None
    """Low-precision captures: accept the nearest tested token within capture_rtol * ||target|| (null:
    calibrated per dtype) ..."""
    margin: float = 0.5
    """... and at most this times as far as the nearest other tested token."""
    verify_in: str = "capture"
    """Where low-precision captures are verified: capture (the model cast to the capture dtype) or
    float32 (faster on CPUs without bf16/fp16 units; about as close to the capture)."""

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
        if not 0 <= self.map_share <= 1 or self.map_top < 1:
            problems.append(f"map_share must be in [0, 1] and map_top at least 1 (got {self.map_share} and {self.map_top})")
        if not 0 <= self.prior_share <= 1 or not 0 < self.prior_mass <= 1:
            problems.append(f"prior_share must be in [0, 1] and prior_mass in (0, 1] "
                            f"(got {self.prior_share} and {self.prior_mass})")
        if self.capture_rtol is not None and self.capture_rtol < 0:
            problems.append(f"capture_rtol must not be negative (got {self.capture_rtol})")
        if self.verify_in not in ("capture", "float32"):
            problems.append(f"verify_in '{self.verify_in}' is unknown: use capture or float32")
        if not 0 < self.margin <= 1:
            problems.append(f"margin must be in (0, 1] (got {self.margin})")
        if problems:
            raise InversionError("; ".join(problems))


# `--ckpt_path last` loads the module's hyperparameters (the method's config among them) with torch's
# safe unpickler, which needs the class named.
torch.serialization.add_safe_globals([SipItConfig])


def check_capture_dtype(name: str) -> str:
    if name not in CAPTURE_DTYPES:
        raise InversionError(f"capture_dtype '{name}' is unknown: use {', '.join(CAPTURE_DTYPES)} "
                             "(the dtype the model ran in when the states were captured)")
    return name

