"""The output -> prompt methods' settings: one dataclass per method, behind one typed `method`.

`OutputConfig` holds what every method reads (the prompt, the budget, the honest check, the token
rules). `DlmiConfig` (the default), `GbdaConfig` (its published Gumbel-softmax preset), `GcgConfig`
(nanoGCG's options) and `ReinforceConfig` add their own. The CLI takes them as
`--model.method GcgConfig --model.method.search_width 128`; `--model.method.help GcgConfig` lists
each field with the docstring under it.
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace
from typing import ClassVar

import torch

from lit_inversion.dlmi.search import SwapOptions
from lit_inversion.errors import InversionError
from lit_inversion.precision import DTYPES

TEMPERATURES = ("decoupled", "shared", "fixed")
RELAXATIONS = ("soft", "straight_through")
RELAXED_METHODS = ("gumbel", "adc")
OBJECTIVES = ("hinge", "ce")
ACCEPTS = ("best", "improve")
SAMPLINGS = ("random", "greedy")
GROUP_MODES = ("joint", "progressive")
GROUP_LOSSES = ("sum", "mellowmax")


class _Checks:
    """Collects every problem with a config, so one error names them all."""

    def __init__(self) -> None:
        self.problems: list[str] = []

    def need(self, ok: bool, message: str) -> None:
        if not ok:
            self.problems.append(message)

    def one_of(self, config, name: str, options) -> None:
        value = getattr(config, name)
        self.need(value in options, f"{name} must be one of {', '.join(options)} (got {value!r})")

    def positive(self, config, *names: str) -> None:
        for name in names:
            self.need(getattr(config, name) >= 1, f"{name} must be at least 1 (got {getattr(config, name)})")

    def fraction(self, config, *names: str) -> None:
        for name in names:
            value = getattr(config, name)
            self.need(0.0 <= value <= 1.0, f"{name} is a fraction in [0, 1] (got {value})")

    def raise_any(self) -> None:
        if self.problems:
            raise InversionError("; ".join(self.problems))


@dataclass
class OutputConfig:
    """What every output -> prompt method shares."""

    name: ClassVar[str] = "output"
    label: ClassVar[str] = "output inversion"
    inits: ClassVar[tuple[str, ...]] = ("random",)

    prompt_length: int = 20
    """N, the prompt's length in tokens."""
    num_steps: int = 256
    """Optimisation steps per target."""
    max_seconds: float | None = None
    """Wall-clock budget per target (null: steps only); a target stops at whichever comes first. A
    group of G targets (one universal prompt) gets G times it."""
    check_every: int = 8
    """Steps between honest checks (greedy decoding from the discrete prompt); also at the last step."""
    prepend_bos: bool = True
    """The model sees [BOS] + prompt + target."""
    seed: int = 0
    """Run seed; each target's noise is seeded from it and the target's id."""
    compute_dtype: str = "auto"
    """Dtype of the optimisation forwards: auto (bfloat16 on a GPU or a CPU with native bf16, else
    float32), float32, bfloat16 or float16. Honest checks run in the model's own dtype."""
    keep_best: bool = True
    """Return the best prompt any honest check saw, not the last one."""
    init: str = "random"
    """Start prompt: random (random allowed tokens)."""
    max_prompt_target_lcs: float = 0.25
    """No copying: a search rejects prompts whose LCS with the target is above this fraction of it (1.0: off)."""
    forbid_target_tokens: bool = False
    """ARCA's rule: no target token, nor one that prefix-matches one, in the prompt."""
    allow_non_ascii: bool = False
    """Allow non-ASCII tokens in the prompt (special tokens never), as nanoGCG's option."""
    share_prefix: bool = True
    """Candidates reuse the cached keys/values of the prompt before their swap."""
    cache_context: bool = True
    """Compute the keys/values of the context before the span once per target (false: recompute
    them in every forward, as nanoGCG does without its prefix cache; for benchmarks)."""
    group_mode: str = "joint"
    """Groups (targets sharing a "group" value, one prompt for all): joint (every member from the
    start) or progressive (the next member joins once every member in is exact, as llm-attacks)."""
    group_loss: str = "sum"
    """How a group's member losses combine: sum, or mellowmax (a smooth maximum: the worst members count most)."""
    mellowmax_omega: float = 1.0
    """Mellowmax's sharpness (large: the worst member alone)."""
    group_add_every: int = 0
    """Progressive mode: also add the next member every this many steps (0: only once all in are exact)."""

    def validate(self) -> None:
        """Raise InversionError naming every option the run cannot use, with the fix."""
        checks = _Checks()
        self.check(checks)
        checks.raise_any()

    def check(self, checks: _Checks) -> None:
        checks.need(self.prompt_length >= 1, f"prompt_length must be at least 1 (got {self.prompt_length}): "
                    "set prompt_length to a positive number of tokens")
        checks.positive(self, "num_steps", "check_every")
        checks.need(self.max_seconds is None or self.max_seconds > 0,
                    f"max_seconds must be positive, or null for no time budget (got {self.max_seconds})")
        checks.one_of(self, "compute_dtype", ("auto",) + tuple(DTYPES))
        checks.one_of(self, "init", self.inits)
        checks.fraction(self, "max_prompt_target_lcs")
        checks.one_of(self, "group_mode", GROUP_MODES)
        checks.one_of(self, "group_loss", GROUP_LOSSES)
        checks.need(self.mellowmax_omega > 0, f"mellowmax_omega must be positive (got {self.mellowmax_omega})")
        checks.need(self.group_add_every >= 0, f"group_add_every must be 0 (off) or positive (got {self.group_add_every})")

    @property
    def copy_limit(self) -> float:
        """The largest LCS(prompt, target) / M a search accepts (the copy seed opts out)."""
        return 1.0 if self.init == "repeat" else self.max_prompt_target_lcs

    def with_options(self, **options) -> OutputConfig:
        """A copy with `options` set; an option this method lacks is an error naming the method's options."""
        unknown = set(options) - {f.name for f in fields(self)}
        if unknown:
            raise InversionError(f"unknown option(s) {sorted(unknown)} for method {self.name}: "
                                 f"{type(self).__name__} has {', '.join(f.name for f in fields(self))}")
        config = replace(self, **options)
        config.validate()
        return config


@dataclass
class DlmiConfig(OutputConfig):
    """DLMI (lit-inversion's default): a discrete swap search on the exact criterion, optionally after
    the paper's relaxed phase. `DlmiConfig.paper()` is the paper's relaxed method alone."""

    name: ClassVar[str] = "dlmi"
    label: ClassVar[str] = "DLMI"
    inits: ClassVar[tuple[str, ...]] = ("random", "repeat")

    init: str = "random"
    """random: the paper's N(0, 1) logits and random tokens for the search. repeat: the copy seed,
    `anchor t1 .. anchor` prompts that small models continue by copying (the prompt then contains the
    target: no inversion in the privacy sense; records carry prompt_target_lcs)."""
    # --- the relaxed phase (the paper's method) ---
    learning_rate: float = 0.1
    """Adam's learning rate on the prompt logits Z and temperature parameters."""
    tau0: float = 100.0
    """tau_i = eps + tau0 * (1 + tanh(phi_i))."""
    eps: float = 1e-10
    """The temperature floor, and the Gumbel noise's."""
    gumbel_samples: int = 8
    """S Gumbel-softmax samples per target per relaxed step, in one batched forward."""
    temperature: str = "decoupled"
    """decoupled (one learned tau per position), shared (one per target) or fixed (fixed_tau)."""
    fixed_tau: float = 1.0
    """The temperature when temperature is fixed."""
    teacher_forcing: bool = True
    """Teacher-forced target logits; false feeds the model's own soft predictions back (GBDA)."""
    relaxation: str = "soft"
    """soft, or straight_through (hard forward, soft gradient)."""
    relaxed_method: str = "gumbel"
    """gumbel: the paper's Gumbel-softmax with learned temperatures. adc: ADC's dense-to-sparse
    relaxation (SGD with momentum on a distribution per position, projected to its top 2^w tokens, w
    the wrong target tokens), whose best rounded prompt starts the search (ADC+)."""
    adc_learning_rate: float = 10.0
    """ADC: SGD's learning rate."""
    adc_momentum: float = 0.99
    """ADC: SGD's momentum."""
    anneal_from: float = 1.0
    """Fraction of the relaxed steps after which tau is annealed (1.0: never)."""
    anneal_to: float = 0.01
    """tau multiplier reached at the last relaxed step."""
    straight_through_from: float = 1.0
    """Fraction of the relaxed steps after which steps are straight-through (1.0: never)."""
    relax_topk: int | None = None
    """Sparse relaxation over each position's top-k logits (plus the best discrete token). null: auto
    (k = 256 from a 100k vocabulary, where the dense one outgrows the model); 0: dense (the paper's)."""
    # --- the swap search (the whole budget by default) ---
    refine_fraction: float = 1.0
    """Fraction of num_steps spent on the swap search, after the relaxed phase (0: the relaxed phase only)."""
    refine_candidates: int = 64
    """Single-token swaps scored per step, per target."""
    refine_positions: int = 4
    """Prompt positions swapped per step (candidates at one position share its prefix's cache)."""
    swap_tokens: int = 1
    """ACG: positions changed per candidate at the start, annealed to 1 over the first half of the budget."""
    refine_topk: int = 256
    """Swaps are drawn from the top-k tokens of the one-hot gradient (nanoGCG's 256)."""
    refine_objective: str = "hinge"
    """hinge: relu(best other logit - target logit + margin), or ce."""
    margin: float = 1.0
    """The hinge's margin: right positions keep this logit gap."""
    search_window: int = 8
    """Score the right prefix plus this many target positions (0: the whole target). Wider scores
    more of the target per candidate (better honest LCS per evaluation) at a longer forward."""
    refine_accept: str = "improve"
    """improve: move only to a better prompt (restarts after refine_patience steps without one); best:
    always move to the best candidate, as GCG."""
    refine_sampling: str = "random"
    """random: a random draw from each position's top-k; greedy: its best untried ones."""
    refine_distance_weight: float = 0.0
    """Faster-GCG's regulariser: rank swaps by standardised gain minus this times standardised
    embedding distance from the current token (0: off)."""
    refine_dedupe: bool = False
    """Faster-GCG: never score a prompt this target's search has scored before (also across moves)."""
    refine_merge: int = 0
    """I-GCG: also score the step's best 2, 3, .. refine_merge single swaps (at distinct positions)
    applied together (0: off)."""
    refine_buffer: int = 0
    """ACG: keep the refine_buffer best prompts scored; a restart resumes from the best unused one
    instead of re-drawing positions of the best (0: off)."""
    refine_momentum: float = 0.0
    """MAC: rank swaps by a momentum (this decay) of the normalised token gradient (0: off)."""
    filter_ids: bool = True
    """Keep only prompts whose text re-encodes to the same ids (nanoGCG's filter): `prompt_text` pasted
    anywhere then gives `prompt_ids`. The random start, fills, start beam and restarts obey it too."""
    refine_prior: float = 0.0
    """LM prior: rank swaps by the standardised gradient gain plus this times the standardised
    log-probability the model gives the token after the prompt before it (the model's own next-token
    distribution, as BEAST and FLRT use; fluent prompts; 0: off)."""
    beam_positions: int = 4
    """BEAST: a search that starts from random tokens (no relaxed phase, no repeat init) first runs a
    beam over the last beam_positions prompt positions (at most half the prompt), each kept prompt drawing
    beam_samples tokens there from the model's own next-token distribution (0: off)."""
    beam_width: int = 8
    """BEAST: prompts kept per position of the start beam."""
    beam_samples: int = 8
    """BEAST: tokens drawn per kept prompt and position."""
    topic_samples: int = 32
    """Also consider, among the random start's options, this many prompts the model writes after the
    target itself (on-topic text, its target tokens re-drawn within the copy limit; 0: off). Single
    targets only: a group's universal prompt starts as before."""
    refine_patience: int = 16
    """Steps without a better prompt before a restart (0: never; only with improve)."""
    restart_swaps: int = 3
    """Positions of the best prompt a restart re-draws (init repeat: the next seed prompt)."""
    init_scale: float = 10.0
    """How far Z is raised on the repeat init's prompt tokens."""
    init_anchors: tuple[str, ...] = ("\n", ".", ":", "\n\n", '"', " ")
    """Separators tried by the repeat init, and as one-token fills at the search's start."""

    @classmethod
    def paper(cls, **overrides) -> DlmiConfig:
        """The paper's method: float32, learned tau only, no swap search, the final argmax Z, no copy rule."""
        base = cls(compute_dtype="float32", refine_fraction=0.0, keep_best=False, refine_patience=0,
                   max_prompt_target_lcs=1.0, relax_topk=0)
        return replace(base, **overrides)

    def swap_options(self) -> SwapOptions:
        """DLMI's swap search: lead-first ranking over a window; moves only to a better prompt (restarts on a
        plateau), or to the best candidate every step (`refine_accept best`)."""
        return SwapOptions(candidates=self.refine_candidates, topk=self.refine_topk, positions=self.refine_positions,
                           n_replace=1, rank="lead", objective=self.refine_objective, margin=self.margin,
                           window=self.search_window, no_revisit=True,
                           # The copy seed moves between its seed prompts by restarts on a plateau.
                           accept="improve" if self.init == "repeat" else self.refine_accept,
                           patience=self.refine_patience, restart_swaps=self.restart_swaps,
                           copy_limit=self.copy_limit, retokenize=self.filter_ids, chunk=None, sampling=self.refine_sampling,
                           distance_weight=self.refine_distance_weight, dedupe=self.refine_dedupe,
                           merge=self.refine_merge, buffer=self.refine_buffer, momentum=self.refine_momentum,
                           prior=self.refine_prior)

    @property
    def refine_steps(self) -> int:
        return int(round(self.refine_fraction * self.num_steps))

    @property
    def relaxed_steps(self) -> int:
        return self.num_steps - self.refine_steps

    def check(self, checks: _Checks) -> None:
        super().check(checks)
        checks.positive(self, "gumbel_samples", "refine_candidates", "refine_topk", "refine_positions")
        checks.need(self.learning_rate > 0 and self.tau0 > 0 and self.eps > 0,
                    "learning_rate, tau0 and eps must be positive")
        checks.one_of(self, "temperature", TEMPERATURES)
        checks.need(self.temperature != "fixed" or self.fixed_tau > 0, f"fixed_tau must be positive (got {self.fixed_tau})")
        checks.one_of(self, "relaxation", RELAXATIONS)
        checks.one_of(self, "relaxed_method", RELAXED_METHODS)
        checks.need(self.adc_learning_rate > 0 and 0 <= self.adc_momentum < 1,
                    "adc_learning_rate must be positive and adc_momentum in [0, 1)")
        checks.need(self.refine_merge >= 0 and self.refine_buffer >= 0 and self.beam_positions >= 0
                    and self.topic_samples >= 0,
                    "refine_merge, refine_buffer, beam_positions and topic_samples must be 0 (off) or positive")
        checks.need(0 <= self.refine_momentum < 1, f"refine_momentum must be in [0, 1) (got {self.refine_momentum})")
        checks.positive(self, "beam_width", "beam_samples")
        checks.one_of(self, "refine_objective", OBJECTIVES)
        checks.one_of(self, "refine_accept", ACCEPTS)
        checks.one_of(self, "refine_sampling", SAMPLINGS)
        checks.need(self.refine_prior >= 0, f"refine_prior must be 0 (off) or positive (got {self.refine_prior})")
        checks.need(self.refine_distance_weight >= 0,
                    f"refine_distance_weight must be 0 (off) or positive (got {self.refine_distance_weight})")
        checks.fraction(self, "refine_fraction", "anneal_from", "straight_through_from")
        checks.need(1 <= self.swap_tokens <= self.prompt_length,
                    f"swap_tokens must be between 1 and prompt_length ({self.prompt_length}) (got {self.swap_tokens})")
        checks.need(self.relax_topk is None or self.relax_topk >= 0,
                    f"relax_topk must be 0 (dense), a positive number of tokens, or null for auto (got {self.relax_topk})")
        checks.need(self.anneal_to > 0, f"anneal_to must be positive (got {self.anneal_to})")
        checks.need(self.refine_patience >= 0, f"refine_patience must be 0 (off) or positive (got {self.refine_patience})")
        checks.need(self.search_window >= 0 and self.restart_swaps >= 0 and self.margin >= 0,
                    "search_window, restart_swaps and margin must be 0 or positive")


@dataclass
class GbdaConfig(DlmiConfig):
    """GBDA (Guo et al., 2021) as the DLMI paper runs it: Gumbel-softmax at a fixed temperature
    (1; the paper also runs 100), no teacher forcing, float32, the final argmax Z."""

    name: ClassVar[str] = "gbda"
    label: ClassVar[str] = "GBDA"

    compute_dtype: str = "float32"
    keep_best: bool = False
    max_prompt_target_lcs: float = 1.0
    temperature: str = "fixed"
    teacher_forcing: bool = False
    relax_topk: int | None = 0
    refine_fraction: float = 0.0
    refine_patience: int = 0


@dataclass
class GcgConfig(OutputConfig):
    """GCG (Zou et al., 2023) with nanoGCG's defaults and filters: every step scores `search_width`
    prompts that each swap `n_replace` tokens drawn from the top-k of the one-hot gradient, and moves
    to the one with the lowest mean cross-entropy over the target."""

    name: ClassVar[str] = "gcg"
    label: ClassVar[str] = "GCG"

    check_every: int = 1
    compute_dtype: str = "float32"
    max_prompt_target_lcs: float = 1.0
    search_width: int = 512
    """Candidate prompts scored per step, per target."""
    topk: int = 256
    """Each swap draws from the top-k tokens of the one-hot gradient at its position."""
    n_replace: int = 1
    """Positions swapped per candidate."""
    filter_ids: bool = True
    """Drop candidates whose decode -> encode round trip changes the ids."""
    batch_size: int | None = None
    """Candidates per scoring forward (null: all); halved on out-of-memory."""
    fill_token: str | None = None
    """Start from this one-token string repeated (nanoGCG 'x', GCG '!'); null: random tokens."""

    def swap_options(self) -> SwapOptions:
        """nanoGCG: mean cross-entropy over the whole target, always move to the best candidate."""
        return SwapOptions(candidates=self.search_width, topk=self.topk, positions=0, n_replace=self.n_replace,
                           rank="mean", objective="ce", margin=0.0, window=0, accept="best", no_revisit=False,
                           patience=0, restart_swaps=0, copy_limit=self.copy_limit, retokenize=self.filter_ids,
                           chunk=self.batch_size, sampling="random", distance_weight=0.0, dedupe=False, merge=0,
                           buffer=0, momentum=0.0, prior=0.0)

    def check(self, checks: _Checks) -> None:
        super().check(checks)
        checks.positive(self, "search_width", "topk", "n_replace")
        checks.need(self.n_replace <= self.prompt_length,
                    f"n_replace ({self.n_replace}) must not exceed prompt_length ({self.prompt_length})")
        checks.need(self.batch_size is None or self.batch_size >= 1,
                    f"batch_size must be at least 1, or null for all candidates (got {self.batch_size})")
        checks.need(self.fill_token is None or bool(self.fill_token),
                    "fill_token is empty: give a one-token string such as 'x' or '!', or null")


@dataclass
class ReinforceConfig(OutputConfig):
    """REINFORCE (Williams, 1992): the score-function gradient over prompts sampled from softmax(Z),
    with an EMA reward baseline; float32, the final argmax Z."""

    name: ClassVar[str] = "reinforce"
    label: ClassVar[str] = "REINFORCE"

    compute_dtype: str = "float32"
    keep_best: bool = False
    max_prompt_target_lcs: float = 1.0
    learning_rate: float = 0.1
    """Adam's learning rate on the prompt logits Z."""
    samples: int = 8
    """Prompts sampled per target per step, scored in one batched forward."""
    baseline_decay: float = 0.9
    """EMA reward baseline: b <- decay * b + (1 - decay) * mean reward."""

    def check(self, checks: _Checks) -> None:
        super().check(checks)
        checks.positive(self, "samples")
        checks.need(self.learning_rate > 0, f"learning_rate must be positive (got {self.learning_rate})")
        checks.need(0.0 <= self.baseline_decay < 1.0, f"baseline_decay must be in [0, 1) (got {self.baseline_decay})")


CONFIGS: dict[str, type[OutputConfig]] = {c.name: c for c in (DlmiConfig, GbdaConfig, GcgConfig, ReinforceConfig)}
METHODS = tuple(CONFIGS)
# Checkpoints hold the module's hyperparameters, the method's config among them; `--ckpt_path last`
# loads them with torch's safe (weights-only) unpickler, which needs the classes named.
torch.serialization.add_safe_globals(list(CONFIGS.values()))


def method_config(method: str | OutputConfig = "dlmi", **options) -> OutputConfig:
    """The config of `method` (a name in METHODS, or a config to start from) with `options` set."""
    if isinstance(method, OutputConfig):
        return method.with_options(**options)
    if method not in CONFIGS:
        raise InversionError(f"method must be one of {', '.join(METHODS)} (got {method!r})")
    return CONFIGS[method]().with_options(**options)
