"""SIP-It settings, shared by the search loop, the verifier and the policies."""

from __future__ import annotations

from dataclasses import dataclass

from lit_inversion.errors import InversionError

CAPTURE_DTYPES = ("float32", "bfloat16", "float16")
# Relative tolerance for captures computed in a low-precision dtype, measured on the default model: a
# bf16 capture (full-sequence forward of the model cast to bf16) lies 0.3-2% of ||h|| from the state
# our verifier computes for the true token in bf16 (incremental, on a KV cache), with a tail to ~3%.
CAPTURE_RTOL = {"bfloat16": 0.06, "float16": 0.01}


@dataclass
class SipItConfig:
    """SIP-It settings (the defaults give exact recovery in float32)."""

    policy: str = "gradient"  # "gradient" (guided) or "random" (brute force)
    batch_size: int = 64  # candidates in the first batched forward at a position
    max_batch_size: int = 256  # later batches double up to this (or batch_size, if larger)
    rtol: float = 1e-4  # verifier tolerance relative to ||target|| (float32 captures)
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
    # A linear map from the layer's state to the token's embedding, fit for ranking once per model and layer
    # on random contexts and cached (sipit/token_map.py): it ranks deep-layer positions the table no longer
    # does; `map_share` of every batch after the first while its top-`map_top` list lasts.
    token_map: bool = True
    map_share: float = 0.25
    map_top: int = 4096
    # The LM's own next-token distribution given the recovered prefix ranks candidates too: half of the
    # first batch at a position, `prior_share` of later ones, while its top-`prior_mass` nucleus lasts.
    lm_prior: bool = True
    prior_share: float = 0.25
    prior_mass: float = 0.999
    # Low-precision captures (capture_dtype bfloat16/float16): accept the nearest tested token when it is
    # within capture_rtol * ||target|| (null: calibrated per dtype) and at most `margin` times as far as
    # the nearest other tested token.
    capture_rtol: float | None = None
    margin: float = 0.5
    # Where low-precision captures are verified: "capture" = on the model cast to the capture dtype (the
    # closest match to a serving stack's states), "float32" = on the float32 model (faster on CPUs
    # without bf16/fp16 units; its states are about as close to the capture, 0.5-2% of ||h||).
    verify_in: str = "capture"
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


def check_capture_dtype(name: str) -> str:
    if name not in CAPTURE_DTYPES:
        raise InversionError(f"capture_dtype '{name}' is unknown: use {', '.join(CAPTURE_DTYPES)} "
                             "(the dtype the model ran in when the states were captured)")
    return name
