"""The published output -> prompt baselines, selectable next to DLMI through `method`.

Every method's batch is a `TargetBatch` (batch.py), so they share the targets, the honest check
(greedy decoding from the discrete prompt), the results, the pool of slots (`pool.py`), the Lightning module and
checkpoint/resume; none inherits another method's state:

- `dlmi`: the default `DlmiConfig` (unchanged).
- `gbda`: Gumbel-softmax with a fixed tau (`fixed_tau`, 1 by default; the paper also runs 100) and no
  teacher forcing: a `DlmiConfig.paper()` preset on the plain `DlmiBatch`.
- `reinforce`: the score-function gradient over prompts sampled from softmax(Z), with an EMA
  baseline (`reinforce.py`).
- `gcg`: greedy coordinate gradient with nanoGCG's defaults and filters (`gcg.py`).

The baselines follow their papers: float32 (unless `compute_dtype` is set), random init, the final
prompt rather than the best checked one (GCG keeps the best, as nanoGCG returns its best string).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, fields, replace

from lit_inversion.dlmi.algorithm import DlmiBatch, DlmiConfig
from lit_inversion.dlmi.batch import TargetBatch
from lit_inversion.errors import InversionError

METHODS = ("dlmi", "gbda", "reinforce", "gcg")
LABELS = {"dlmi": "DLMI", "gbda": "GBDA", "reinforce": "REINFORCE", "gcg": "GCG"}


@dataclass
class BaselineConfig(DlmiConfig):
    """`DlmiConfig` plus the method choice and the options only the baselines read.

    The inherited fields keep DlmiConfig's defaults; `method_config()` applies each baseline's preset.
    """

    method: str = "dlmi"  # dlmi | gbda | reinforce | gcg
    # --- GCG (nanoGCG's defaults) ---
    search_width: int = 512  # candidate prompts scored per step, per target
    topk: int = 256  # each swap draws from the top-k tokens of the one-hot gradient at its position
    n_replace: int = 1  # positions swapped per candidate
    filter_ids: bool = True  # drop candidates whose decode -> encode round trip changes the ids
    gcg_batch_size: int | None = None  # candidates per scoring forward (None: all); halved on out-of-memory
    fill_token: str | None = None  # start from this one-token string repeated (nanoGCG 'x', GCG '!'); None: `init`
    # --- REINFORCE (samples per step: `gumbel_samples`) ---
    baseline_decay: float = 0.9  # EMA reward baseline: b <- decay * b + (1 - decay) * mean reward

    def validate(self) -> None:
        super().validate()
        problems = []
        if self.method not in METHODS:
            problems.append(f"method must be one of {', '.join(METHODS)} (got {self.method!r})")
        for name in ("search_width", "topk", "n_replace"):
            if getattr(self, name) < 1:
                problems.append(f"{name} must be at least 1 (got {getattr(self, name)})")
        if self.n_replace > self.prompt_length:
            problems.append(f"n_replace ({self.n_replace}) must not exceed prompt_length ({self.prompt_length})")
        if self.gcg_batch_size is not None and self.gcg_batch_size < 1:
            problems.append(f"gcg_batch_size must be at least 1, or null for all candidates "
                            f"(got {self.gcg_batch_size})")
        if self.fill_token is not None and not self.fill_token:
            problems.append("fill_token is empty: give a one-token string such as 'x' or '!', or null")
        if not 0.0 <= self.baseline_decay < 1.0:
            problems.append(f"baseline_decay must be in [0, 1) (got {self.baseline_decay})")
        if self.method in ("reinforce", "gcg") and self.refine_fraction > 0:
            problems.append(f"refine_fraction is a DLMI option: set it to 0 for method {self.method} "
                            f"(got {self.refine_fraction})")
        if problems:
            raise InversionError("; ".join(problems))


def method_config(method: str = "dlmi", **overrides) -> BaselineConfig:
    """The config for `method`: its preset, then `overrides` (any BaselineConfig field)."""
    if method not in METHODS:
        raise InversionError(f"method must be one of {', '.join(METHODS)} (got {method!r})")
    unknown = set(overrides) - {f.name for f in fields(BaselineConfig)}
    if unknown:
        raise InversionError(f"unknown option(s) {sorted(unknown)} for method {method}: "
                             "see lit_inversion.dlmi.BaselineConfig")
    if method == "dlmi":
        base = BaselineConfig()
    elif method == "gbda":
        base = BaselineConfig.paper(method=method, temperature="fixed", teacher_forcing=False)
    elif method == "reinforce":
        base = BaselineConfig.paper(method=method, temperature="fixed")  # tau unused: samples follow softmax(Z)
    else:  # gcg: check every step, as nanoGCG's early stop does
        base = BaselineConfig.paper(method=method, temperature="fixed", check_every=1, keep_best=True)
    config = replace(base, **overrides)
    config.validate()
    return config


def make_batch(loaded, targets: Sequence[Sequence[int]], config: DlmiConfig,
               keys: Sequence[object] | None = None) -> TargetBatch:
    """The batch class of `config.method` (a plain DlmiConfig means DLMI)."""
    method = getattr(config, "method", "dlmi")
    if method == "reinforce":
        from lit_inversion.dlmi.reinforce import ReinforceBatch

        return ReinforceBatch(loaded, targets, config, keys)
    if method == "gcg":
        from lit_inversion.dlmi.gcg import GcgBatch

        return GcgBatch(loaded, targets, config, keys)
    return DlmiBatch(loaded, targets, config, keys)
