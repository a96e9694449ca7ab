"""DLMI: find a prompt whose greedy continuation is a given target (Denamganaï & Subr, 2026).

The paper's method (`DlmiConfig.paper()`): each target owns prompt logits Z [N, V] and temperature
parameters phi. A relaxed step draws S Gumbel-softmax samples p = softmax((Z + g) / tau), feeds
p @ E as the prompt embeddings and lowers the teacher-forced cross-entropy of the target; the answer
is argmax Z. That scores well on the *soft* pass but poorly on the *honest* check (greedy decoding
from the discrete prompt), which is what we report.

The default (`DlmiConfig()`) spends every step on a discrete swap search (`search.py`) that selects
and stops on the exact criterion: single-token swaps ranked by the one-hot gradient of a hinge on
the logit margin, scored by how many leading target positions the teacher-forced argmax gets right
(for a discrete prompt that is exactly what greedy decoding reproduces, so every candidate is a free
exact check), then by the hinge over a window of the next target positions. No copying: swaps that
would lift LCS(prompt, target) / M above `max_prompt_target_lcs` are rejected, and
`forbid_target_tokens` applies ARCA's rule. `refine_fraction < 1` runs the paper's relaxed phase
first and starts the search from its argmax. `init="repeat"` is the opt-in copy seed: prompts that
repeat the target (`anchor t1 .. anchor`), restarted from the next anchor on a plateau.

Token convention (`lit_inversion.tokens`): prompts and targets never contain BOS; the model sees
`[BOS] + prompt + target` when `prepend_bos` is on.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import hashlib
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, replace

import torch
import torch.nn.functional as F
from torch import nn

from lit_inversion.dlmi import search
from lit_inversion.dlmi.vocab import allowed_tokens, forbidden_for_target
from lit_inversion.errors import InversionError
from lit_inversion.metrics import lcs_ratio
from lit_inversion.tokens import check_ids, context_prefix, decode

TEMPERATURES = ("decoupled", "shared", "fixed")
RELAXATIONS = ("soft", "straight_through")
INITS = ("random", "repeat")
OBJECTIVES = ("hinge", "ce")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """The compute dtype `name` stands for on `device` ("auto": bf16 where it is native)."""
    if name != "auto":
        return DTYPES[name]
    if device.type == "cuda" or (device.type == "cpu" and torch.cpu._is_avx512_bf16_supported()):
        return torch.bfloat16
    return torch.float32


@dataclass
class DlmiConfig:
    """DLMI settings: the paper's relaxed phase, then refinement; `DlmiConfig.paper()` is the paper's alone."""

    prompt_length: int = 20  # N
    num_steps: int = 256  # relaxed steps + refinement steps
    learning_rate: float = 0.1  # Adam
    tau0: float = 100.0  # tau_i = eps + tau0 * (1 + tanh(phi_i))
    eps: float = 1e-10
    gumbel_samples: int = 8  # S samples per target per step, one batched forward
    temperature: str = "decoupled"  # decoupled (one tau per position) | shared | fixed
    fixed_tau: float = 1.0  # used when temperature == "fixed"
    teacher_forcing: bool = True
    relaxation: str = "soft"  # soft | straight_through (hard forward, soft gradient)
    check_every: int = 8  # steps between honest checks (greedy decode from the discrete prompt)
    prepend_bos: bool = True
    seed: int = 0
    # --- improvements over the paper (all off in `paper()`) ---
    # "auto": bfloat16 on a GPU or a CPU with native bf16 (AVX512-BF16), else float32 (emulated bf16 is
    # several times slower on CPU). Honest checks always run in the model's own dtype.
    compute_dtype: str = "auto"
    anneal_from: float = 1.0  # fraction of the relaxed steps after which tau is annealed (1.0 = never)
    anneal_to: float = 0.01  # tau multiplier reached at the last relaxed step
    straight_through_from: float = 1.0  # fraction of the relaxed steps after which steps are straight-through
    # --- the discrete swap search (search.py): the default spends every step here ---
    refine_fraction: float = 1.0  # fraction of num_steps spent on the swap search (after the relaxed phase)
    refine_candidates: int = 64  # single-token swaps scored per step, per target
    refine_positions: int = 4  # prompt positions swapped per step (candidates per position share its prefix)
    refine_topk: int = 64  # swaps are drawn from the top-k tokens of the one-hot gradient
    refine_objective: str = "hinge"  # hinge: relu(best other logit - target logit + margin) | ce
    margin: float = 1.0  # kappa of the hinge: right positions keep this logit gap
    search_window: int = 4  # score the right prefix + this many target positions (0 = the whole target)
    refine_patience: int = 16  # steps without a better prompt before a restart (0 = never)
    restart_swaps: int = 3  # positions a restart re-draws at random (init="repeat": the next seed prompt)
    keep_best: bool = True  # return the best prompt seen at any honest check, not the last argmax Z
    # random: the paper's N(0, 1) logits (and random tokens for the swap search). repeat: the copy seed,
    # `anchor t1 .. anchor` prompts that small models continue by copying; the prompt then contains the
    # target, which is no inversion in the privacy sense (records carry `prompt_target_lcs`).
    init: str = "random"
    init_scale: float = 10.0  # how far Z is raised on the "repeat" init prompt's tokens
    init_anchors: tuple[str, ...] = ("\n", ".", ":", "\n\n", '"', " ")  # separators tried by the "repeat" init
    # No copying: the search rejects swaps that would lift LCS(prompt, target) / M above this
    # (not applied with init="repeat", which copies on purpose; 1.0 = off).
    max_prompt_target_lcs: float = 0.25
    forbid_target_tokens: bool = False  # ARCA's rule: no target token, nor one that prefix-matches one, in the prompt
    allow_non_ascii: bool = False  # printable ASCII tokens only, as nanoGCG (special tokens never)
    share_prefix: bool = True  # candidates reuse the cached keys/values of the prompt before their swap

    @classmethod
    def paper(cls, **overrides) -> DlmiConfig:
        """The paper's method: float32, learned tau only, no refinement, final argmax Z."""
        base = cls(compute_dtype="float32", anneal_from=1.0, straight_through_from=1.0, refine_fraction=0.0,
                   keep_best=False, init="random", refine_patience=0, max_prompt_target_lcs=1.0)
        return replace(base, **overrides)

    @property
    def refine_steps(self) -> int:
        return int(round(self.refine_fraction * self.num_steps))

    @property
    def relaxed_steps(self) -> int:
        return self.num_steps - self.refine_steps

    def validate(self) -> None:
        """Raise InversionError naming the option and the fix for a value the run cannot use."""

        def need(ok: bool, message: str) -> None:
            if not ok:
                raise InversionError(message)

        def one_of(name: str, options) -> None:
            value = getattr(self, name)
            need(value in options, f"{name} must be one of {', '.join(options)} (got {value!r})")

        need(self.prompt_length >= 1, f"prompt_length must be at least 1 (got {self.prompt_length}): "
             "set prompt_length to a positive number of tokens")
        for name in ("num_steps", "gumbel_samples", "check_every", "refine_candidates", "refine_topk",
                     "refine_positions"):
            need(getattr(self, name) >= 1, f"{name} must be at least 1 (got {getattr(self, name)})")
        need(self.learning_rate > 0 and self.tau0 > 0 and self.eps > 0, "learning_rate, tau0 and eps must be positive")
        one_of("temperature", TEMPERATURES)
        need(self.temperature != "fixed" or self.fixed_tau > 0, f"fixed_tau must be positive (got {self.fixed_tau})")
        one_of("relaxation", RELAXATIONS)
        one_of("compute_dtype", ("auto",) + tuple(DTYPES))
        one_of("refine_objective", OBJECTIVES)
        one_of("init", INITS)
        for name in ("refine_fraction", "anneal_from", "straight_through_from"):
            need(0.0 <= getattr(self, name) <= 1.0, f"{name} is a fraction in [0, 1] (got {getattr(self, name)})")
        need(self.anneal_to > 0, f"anneal_to must be positive (got {self.anneal_to})")
        need(self.refine_patience >= 0, f"refine_patience must be 0 (off) or positive (got {self.refine_patience})")
        need(self.search_window >= 0 and self.restart_swaps >= 0 and self.margin >= 0,
             "search_window, restart_swaps and margin must be 0 or positive")
        need(0.0 <= self.max_prompt_target_lcs <= 1.0,
             f"max_prompt_target_lcs is a fraction in [0, 1] (got {self.max_prompt_target_lcs}); 1.0 turns it off")


@dataclass
class DlmiResult:
    target_ids: list[int]
    prompt_ids: list[int]
    prompt_text: str
    output_ids: list[int]  # greedy continuation of [BOS] + prompt, len(target) tokens
    output_text: str
    exact_match: bool
    lcs_ratio: float  # honest: LCS(output, target) / len(target)
    # Paper-style LCS of the teacher-forced argmax: of the soft pass at the last relaxed step (mean over
    # the Gumbel samples), or of the current discrete prompt during refinement.
    soft_lcs_ratio: float
    steps: int
    seconds: float  # wall time of its batch until this target stopped
    # LCS(prompt, target) / len(target): near 1 when the prompt simply contains the target (copying).
    prompt_target_lcs: float = 0.0

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class StepStats:
    loss: torch.Tensor  # [B] relaxed: mean teacher-forced CE; refine: objective key; nan where no step
    tau: torch.Tensor  # [B] mean temperature
    soft_lcs: torch.Tensor  # [B] paper-style LCS of this step (refinement: of the current prompt)
    phase: str  # "relaxed" or "refine"


def validate_targets(loaded, targets: Sequence[Sequence[int]], config: DlmiConfig) -> None:
    """Raise InversionError for inputs the optimisation cannot handle."""
    config.validate()
    if len(targets) == 0:
        raise InversionError("no targets given: pass at least one target token sequence")
    prefix = len(context_prefix(loaded.bos_id, config.prepend_bos))
    for i, ids in enumerate(targets):
        check_ids(list(ids), loaded.vocab_size, f"target {i}")
        total = prefix + config.prompt_length + len(ids)
        if loaded.max_positions is not None and total > loaded.max_positions:
            raise InversionError(
                f"target {i}: BOS + prompt + target is {total} tokens, more than the model context of "
                f"{loaded.max_positions}: use a shorter prompt_length or target"
            )


def target_seed(seed: int, key: object) -> int:
    """A per-target seed that does not depend on the target's place in its batch."""
    return int.from_bytes(hashlib.sha256(f"{seed}:{key}".encode()).digest()[:8], "little") & ((1 << 63) - 1)


def on_model_device(method):
    """Run a DlmiBatch method with tensor factories on the model's device (see `DlmiBatch.on_device`)."""

    @functools.wraps(method)
    def wrapper(self, *args, **kwargs):
        with self.on_device():
            return method(self, *args, **kwargs)

    return wrapper


class DlmiBatch(nn.Module):
    """Prompt parameters and optimizer state for a batch of targets, stepped together.

    `step()` does one optimisation step for every target still running; `check()` decodes greedily
    from each running target's discrete prompt, keeps the best one and stops targets that match.
    Each target draws its noise from its own generator (seeded from `seed` and its key), so a target
    follows the same path alone or in any batch. `state_dict()` covers parameters, optimizer,
    counters, best prompts and generator states, so a run resumes exactly.

    In a LightningModule: hold a DlmiBatch as a submodule, use manual optimisation, call `step()`
    per training step and `check()` every `check_every` steps, as `run_batch` does.
    """

    def __init__(self, loaded, targets: Sequence[Sequence[int]], config: DlmiConfig,
                 keys: Sequence[object] | None = None):
        super().__init__()
        validate_targets(loaded, targets, config)
        self.loaded, self.config = loaded, config
        with self.on_device():  # every tensor of the batch lives on the model's device
            self.keys = [tuple(int(i) for i in t) for t in targets] if keys is None else list(keys)
            B, N, V = len(targets), config.prompt_length, loaded.vocab_size
            self.lengths = [len(t) for t in targets]
            M = max(self.lengths)
            padded = torch.zeros(B, M, dtype=torch.long)
            for b, t in enumerate(targets):
                padded[b, : len(t)] = torch.tensor([int(i) for i in t])
            self.register_buffer("target_ids", padded)
            self.register_buffer("target_mask", torch.arange(M)[None] < torch.tensor(self.lengths)[:, None])
            self.prefix = context_prefix(loaded.bos_id, config.prepend_bos)

            self.generators = [torch.Generator(device=self.device).manual_seed(target_seed(config.seed, k))
                               for k in self.keys]
            phi_width = 1 if config.temperature == "shared" else N
            z = torch.stack([torch.randn(N, V, generator=g) for g in self.generators])
            phi = torch.stack([torch.rand(phi_width, generator=g) for g in self.generators])
            self.logits = nn.Parameter(z)  # Z, one [N, V] row block per target
            self.phi = nn.Parameter(phi, requires_grad=config.temperature != "fixed")
            params = [self.logits] + ([self.phi] if config.temperature != "fixed" else [])
            self.optimizer = torch.optim.Adam(params, lr=config.learning_rate)

            self.register_buffer("steps", torch.zeros(B, dtype=torch.long))
            self.register_buffer("done", torch.zeros(B, dtype=torch.bool))  # exact match found: frozen
            self.register_buffer("current", z.argmax(-1))  # discrete prompt refined in the last phase
            self.register_buffer("current_key", torch.full((B,), math.inf))  # objective key of `current`
            # Swaps already verified against the current prompt: never verified twice (reset on a move).
            self.register_buffer("tried", torch.zeros(B, N, V, dtype=torch.bool) if config.refine_steps else torch.zeros(0))
            self.register_buffer("lead", torch.zeros(B, dtype=torch.long))  # right target prefix of `current`
            self.register_buffer("exact_due", torch.zeros(B, dtype=torch.bool))  # teacher forcing says exact: check
            # Tokens the swap search may put in, per target (special tokens, copy rules).
            self.register_buffer("allowed", self._allowed_tokens(), persistent=False)
            self.register_buffer("best_prompt", z.argmax(-1))
            self.register_buffer("best_output", torch.zeros(B, M, dtype=torch.long))
            self.register_buffer("checked", torch.full((B, N), -1, dtype=torch.long))  # last prompt checked
            self.register_buffer("best_lcs", torch.full((B,), -1.0))
            # Restart points of the refinement: the "repeat" init prompts, best first.
            seeds = self._repeat_prompts() if config.init == "repeat" else self.best_prompt[:, None].clone()
            self.register_buffer("seeds", seeds)
            self.register_buffer("restarts", torch.zeros(B, dtype=torch.long))
            self.register_buffer("stalled", torch.zeros(B, dtype=torch.long))  # refine steps without a longer prefix
            if config.init == "repeat":
                with torch.no_grad():
                    self.logits[torch.arange(B)[:, None], torch.arange(N)[None], self.seeds[:, 0]] += config.init_scale
                self.best_prompt.copy_(self.argmax_prompts())
                self.current.copy_(self.best_prompt)  # what check() decodes before the first step
            self.register_buffer("soft_lcs", torch.zeros(B))
            self.register_buffer("seconds", torch.zeros(B, dtype=torch.float64))
            self._started = time.perf_counter()

    # ----- parameters -----------------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        return self._embeddings.device

    def on_device(self):
        """Tensor factories inside default to the model's device (nothing to do on CPU)."""
        return contextlib.nullcontext() if self.device.type == "cpu" else torch.device(self.device)

    @property
    def batch_size(self) -> int:
        return self.target_ids.shape[0]

    def tau(self) -> torch.Tensor:
        """[B, N] temperatures (before any anneal)."""
        c = self.config
        B, N = self.batch_size, c.prompt_length
        if c.temperature == "fixed":
            return torch.full((B, N), float(c.fixed_tau))
        return (c.eps + c.tau0 * (1 + torch.tanh(self.phi))).expand(B, N)

    def active(self) -> torch.Tensor:
        """Indices of targets still running (not matched, steps left)."""
        return torch.nonzero(~self.done & (self.steps < self.config.num_steps)).flatten()

    @property
    def finished(self) -> bool:
        return len(self.active()) == 0

    def argmax_prompts(self) -> torch.Tensor:
        return self.logits.detach().argmax(-1)

    def discrete_prompts(self) -> torch.Tensor:
        """[B, N] the prompt each target would return now: argmax Z, or the refined prompt."""
        in_refine = (self.steps >= self.config.relaxed_steps)[:, None]
        return torch.where(in_refine, self.current, self.argmax_prompts())

    # ----- model pieces -------------------------------------------------------------------------
    @property
    def _embeddings(self) -> torch.Tensor:
        return self.loaded.model.get_input_embeddings().weight

    def _autocast(self):
        dtype = resolve_dtype(self.config.compute_dtype, self._embeddings.device)
        return torch.autocast(self._embeddings.device.type, dtype=dtype, enabled=dtype != torch.float32)

    def _target_logits(self, prompt_emb: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        """Teacher-forced logits [R, M, V] for prompt embeddings [R, N, d] and target rows [R]."""
        E = self._embeddings
        R, N = prompt_emb.shape[:2]
        M = self.target_ids.shape[1]
        parts = [E[torch.tensor(self.prefix, dtype=torch.long)].expand(R, -1, -1)] if self.prefix else []
        parts += [prompt_emb, E[self.target_ids[rows, :-1]]]
        x = torch.cat([p.to(prompt_emb.dtype) for p in parts], 1)
        hidden = self.loaded.model.base_model(inputs_embeds=x, use_cache=False).last_hidden_state
        start = len(self.prefix) + N - 1
        # Only the M target positions need vocabulary logits: slice before the lm head.
        return self.loaded.model.get_output_embeddings()(hidden[:, start : start + M])

    def _free_running_logits(self, prompt_emb: torch.Tensor) -> torch.Tensor:
        """GBDA-style: feed the model's own soft predictions back, one position at a time."""
        E = self._embeddings
        R = prompt_emb.shape[0]
        M = self.target_ids.shape[1]
        head, base = self.loaded.model.get_output_embeddings(), self.loaded.model.base_model
        parts = [E[torch.tensor(self.prefix, dtype=torch.long)].expand(R, -1, -1)] if self.prefix else []
        x = torch.cat([p.to(prompt_emb.dtype) for p in parts] + [prompt_emb], 1)
        out = base(inputs_embeds=x, use_cache=True)
        logits = [head(out.last_hidden_state[:, -1:])]
        for _ in range(M - 1):
            soft = torch.softmax(logits[-1].float(), -1).to(x.dtype) @ E.to(x.dtype)
            out = base(inputs_embeds=soft, past_key_values=out.past_key_values, use_cache=True)
            logits.append(head(out.last_hidden_state[:, -1:]))
        return torch.cat(logits, 1)

    def _token_losses(self, logits: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        """[R] mean cross-entropy over each row's real (unpadded) target tokens."""
        R, M, V = logits.shape
        ce = F.cross_entropy(logits.float().reshape(R * M, V), self.target_ids[rows].reshape(-1), reduction="none")
        mask = self.target_mask[rows].float()
        return (ce.view(R, M) * mask).sum(1) / mask.sum(1)

    def _lcs_rows(self, predictions: torch.Tensor, rows: torch.Tensor) -> list[float]:
        out = []
        for pred, r in zip(predictions.tolist(), rows.tolist()):
            n = self.lengths[r]
            out.append(lcs_ratio(pred[:n], self.target_ids[r, :n].tolist()))
        return out

    # ----- one step -------------------------------------------------------------------------------
    @on_model_device
    def step(self) -> StepStats:
        """One optimisation step for every running target (all running targets share a phase)."""
        idx = self.active()
        B = self.batch_size
        stats = StepStats(torch.full((B,), math.nan), self.tau().detach().mean(1), self.soft_lcs.clone(), "relaxed")
        if len(idx) == 0:
            return stats
        in_refine = self.steps[idx] >= self.config.relaxed_steps
        if bool(in_refine.any()) != bool(in_refine.all()):
            raise RuntimeError("targets of one batch must be in the same phase; step them together")
        if bool(in_refine.all()):
            stats.phase = "refine"
            loss = self._refine_step(idx)
            if self.exact_due.any():  # candidates are exact checks: confirm a match by greedy decoding now
                self.check(only=self.exact_due.clone())
                self.exact_due[:] = False
        else:
            loss, tau = self._relaxed_step(idx)
            stats.tau[idx] = tau
        stats.loss[idx] = loss
        stats.soft_lcs = self.soft_lcs.clone()
        self.steps[idx] += 1
        self.seconds[idx] = time.perf_counter() - self._started
        return stats

    def _anneal_factor(self, step: int) -> float:
        c = self.config
        start = c.anneal_from * c.relaxed_steps
        if c.anneal_from >= 1.0 or step < start:
            return 1.0
        ramp = min(1.0, (step - start + 1) / max(1.0, c.relaxed_steps - start))
        return float(c.anneal_to ** ramp)

    def _relaxed_step(self, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        c = self.config
        S, N, V = c.gumbel_samples, c.prompt_length, self.logits.shape[-1]
        step = int(self.steps[idx[0]])
        straight = c.relaxation == "straight_through" or step >= c.straight_through_from * c.relaxed_steps
        tau = self.tau()[idx] * self._anneal_factor(step)  # [A, N]
        # Gumbel noise per target from its own generator: independent of the batch composition.
        u = torch.stack([torch.rand(S, N, V, generator=self.generators[b]) for b in idx.tolist()])
        g = -torch.log(-torch.log(c.eps + (0.999 - c.eps) * u))
        p = torch.softmax((self.logits[idx, None] + g) / tau[:, None, :, None], -1).flatten(0, 1)  # [A*S, N, V]
        rows = idx.repeat_interleave(S)
        E = self._embeddings
        self.optimizer.zero_grad(set_to_none=True)
        with self._autocast():
            soft = p @ E
            if straight:  # forward the hard sample, backward through the soft one
                soft = E[p.argmax(-1)].to(soft.dtype) + soft - soft.detach()
            logits = self._target_logits(soft, rows) if c.teacher_forcing else self._free_running_logits(soft)
        row_loss = self._token_losses(logits, rows)  # [A*S]
        per_target = row_loss.view(len(idx), S).mean(1)
        per_target.sum().backward()  # a sum keeps each target's gradient independent of the batch
        self._masked_optimizer_step(idx)
        lcs = torch.tensor(self._lcs_rows(logits.detach().argmax(-1), rows)).view(len(idx), S).mean(1)
        self.soft_lcs[idx] = lcs
        return per_target.detach(), tau.detach().mean(1)

    def _masked_optimizer_step(self, idx: torch.Tensor) -> None:
        """Adam step that leaves stopped targets' parameters untouched (their moments may decay)."""
        frozen = torch.ones(self.batch_size, dtype=torch.bool)
        frozen[idx] = False
        saved = (self.logits.data[frozen].clone(), self.phi.data[frozen].clone()) if frozen.any() else None
        self.optimizer.step()
        if saved is not None:
            self.logits.data[frozen], self.phi.data[frozen] = saved

    @torch.no_grad()
    def _repeat_prompts(self) -> torch.Tensor:
        """[B, K, N] per target, the `anchor t1 t2 ... anchor` prompts over K anchors, best-ranked first."""
        c = self.config
        anchors = anchor_ids(self.loaded.tokenizer, c.init_anchors)
        best = []
        for b, n in enumerate(self.lengths):
            target = self.target_ids[b, :n].tolist()
            options = torch.tensor([repeat_prompt(target, c.prompt_length, a) for a in anchors])
            keys = self._discrete_key(options, torch.full((len(anchors),), b))
            best.append(options[keys.argsort()])
        return torch.stack(best)

    # ----- discrete refinement (the swap search, search.py) ----------------------------------------
    def _allowed_tokens(self) -> torch.Tensor:
        """[B, V] bool: the tokens each target's swap search may use."""
        c, tok, V = self.config, self.loaded.tokenizer, self.loaded.vocab_size
        base = allowed_tokens(tok, V, c.allow_non_ascii).clone()
        special = [i for i in (getattr(tok, "all_special_ids", None) or []) if 0 <= i < V]
        base[special] = False
        rows = []
        for b, n in enumerate(self.lengths):
            row = base.clone()
            if c.forbid_target_tokens:
                row &= ~forbidden_for_target(tok, V, self.target_ids[b, :n].tolist())
            rows.append(row)
        return torch.stack(rows)

    @property
    def copy_limit(self) -> float:
        """The largest LCS(prompt, target) / M the search accepts (the copy seed opts out)."""
        return 1.0 if self.config.init == "repeat" else self.config.max_prompt_target_lcs

    def _objective(self, logits: torch.Tensor, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(rank key [R], summed loss [R]) of teacher-forced logits [R, M, V]: the right target prefix
        first, then the objective over the whole target (padding counts as right)."""
        c = self.config
        keys, losses = [], []
        for r, b in enumerate(rows.tolist()):
            n = self.lengths[b]
            scored, loss = search.score(logits[r : r + 1, :n], self.target_ids[b, :n], c.refine_objective, c.margin)
            keys.append(scored.key[0])
            losses.append(loss[0])
        return torch.stack(keys), torch.stack(losses)

    @torch.no_grad()
    def _discrete_key(self, prompts: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        with self._autocast():
            return self._objective(self._target_logits(self._embeddings[prompts], rows), rows)[0]

    def _random_prompt(self, b: int) -> torch.Tensor:
        """Random allowed tokens for target b, drawn from its generator, within the copy limit."""
        choices = torch.nonzero(self.allowed[b]).flatten()
        target = self.target_ids[b, : self.lengths[b]].tolist()
        for _ in range(100):
            prompt = choices[torch.randint(len(choices), (self.config.prompt_length,), generator=self.generators[b])]
            if search.lcs_length(prompt.tolist(), target) <= self.copy_limit * len(target):
                break
        return prompt

    def _start_refinement(self, idx: torch.Tensor) -> None:
        """Start from argmax Z after a relaxed phase; from the copy seed with init="repeat"; else from
        the best-scored of a random prompt and one-token fills (the anchors repeated), within the copy limit."""
        c = self.config
        for b in idx.tolist():
            if c.relaxed_steps > 0:
                start = self.argmax_prompts()[b]
            elif c.init == "repeat":
                start = self.seeds[b, 0]
            else:
                target = self.target_ids[b, : self.lengths[b]].tolist()
                options = [self._random_prompt(b)]
                for a in anchor_ids(self.loaded.tokenizer, c.init_anchors):
                    fill = [a] * c.prompt_length
                    if self.allowed[b, a] and search.lcs_length(fill, target) <= self.copy_limit * len(target):
                        options.append(torch.tensor(fill))
                options = torch.stack(options)
                start = options[self._discrete_key(options, torch.full((len(options),), b)).argmin()]
            self.current[b] = start
        self.tried[idx] = False
        self.lead[idx] = 0
        self.stalled[idx] = 0

    def _scorer(self) -> search.PromptScorer:
        if getattr(self, "_prompt_scorer", None) is None:
            self._prompt_scorer = search.PromptScorer(self.loaded.model, self.prefix, self.config.share_prefix)
        return self._prompt_scorer

    def _refine_step(self, idx: torch.Tensor) -> torch.Tensor:
        """One swap-search step per running target: gradient, candidates, exact-criterion ranking.

        Targets run one after another: each one's candidates already fill a large forward, and a
        target's cost never depends on the batch it is in."""
        c = self.config
        first = self.steps[idx] == c.relaxed_steps
        if first.any():
            self._start_refinement(idx[first])
        keys = []
        with self._autocast():
            for b in idx.tolist():
                keys.append(self._search_one(b))
        return torch.tensor(keys)

    def _search_one(self, b: int) -> float:
        c, E, g = self.config, self._embeddings, self.generators[b]
        n = self.lengths[b]
        target = self.target_ids[b, :n]
        w = n if c.search_window == 0 else min(n, int(self.lead[b]) + c.search_window)
        prompt = self.current[b].clone()
        scorer = self._scorer()
        while True:
            logits, emb, cache = scorer.with_gradient(prompt, target[:w])
            now, loss = search.score(logits, target[:w], c.refine_objective, c.margin)
            self.lead[b] = int(now.lead[0])
            if not (w < n and int(now.lead[0]) == w):
                break
            w = min(n, w + c.search_window)  # the window is all right: widen it before searching
        self.soft_lcs[b] = lcs_ratio(now.pred[0].tolist(), target.tolist())
        if int(now.lead[0]) == n and not torch.equal(self.checked[b], prompt):
            self.exact_due[b] = True  # the teacher-forced argmax is the target: step() checks it now
            return float(now.key[0])
        (grad,) = torch.autograd.grad(loss.sum(), emb)
        gain = -(grad[0].float() @ E.detach().float().T)  # [N, V] first-order gain of each swap
        blocked = ~self.allowed[b][None] | self.tried[b]
        blocked[torch.arange(c.prompt_length), prompt] = True
        gain.masked_fill_(blocked, -torch.inf)
        k = min(c.refine_topk, gain.shape[-1])
        top_gain, top = gain.topk(k, -1)  # [N, k]
        open_positions = torch.nonzero(torch.isfinite(top_gain[:, 0])).flatten()
        if len(open_positions) == 0:
            return self._stall(b, float(now.key[0]))
        order = open_positions[torch.randperm(len(open_positions), generator=g)][: c.refine_positions]
        per = max(1, c.refine_candidates // len(order))
        target_list, prompt_list = target.tolist(), prompt.tolist()
        target_set = set(target_list)
        best_key, best = float(now.key[0]), None
        for p in sorted(order.tolist()):
            finite = int(torch.isfinite(top_gain[p]).sum())
            pick = top[p, torch.randperm(finite, generator=g)[:per]]
            self.tried[b, p, pick] = True
            pick = torch.tensor([t for t in pick.tolist()
                                 if search.copy_ok(prompt_list, target_list, p, t, self.copy_limit, target_set)],
                                dtype=torch.long)
            if len(pick) == 0:
                continue
            cand_logits = scorer.candidates(prompt, p, pick, target[:w], cache)
            scored, _ = search.score(cand_logits, target[:w], c.refine_objective, c.margin)
            i = int(scored.key.argmin())
            if float(scored.key[i]) < best_key:
                best_key, best = float(scored.key[i]), (p, int(pick[i]), int(scored.lead[i]))
        if best is None:
            return self._stall(b, float(now.key[0]))
        p, token, lead = best
        self.current[b, p] = token
        self.lead[b] = lead
        self.exact_due[b] = lead == n and w == n
        self.tried[b] = False  # a new prompt has a new neighbourhood
        self.stalled[b] = 0
        return best_key

    def _stall(self, b: int, key: float) -> float:
        """No better swap this step; after `refine_patience` such steps, restart."""
        self.stalled[b] += 1
        if self.config.refine_patience and int(self.stalled[b]) >= self.config.refine_patience:
            self._restart_stalled(torch.tensor([b]))
        return key

    def _restart_stalled(self, idx: torch.Tensor) -> None:
        """Restart stalled targets: the next copy seed (init="repeat"), else re-draw `restart_swaps`
        random positions of the current prompt (the best honest prompt is kept anyway)."""
        c = self.config
        for b in idx.tolist():
            self.restarts[b] += 1
            if c.init == "repeat":
                self.current[b] = self.seeds[b, int(self.restarts[b]) % self.seeds.shape[1]]
            else:
                fresh = self._random_prompt(b)
                positions = torch.randperm(c.prompt_length, generator=self.generators[b])[: c.restart_swaps]
                changed = self.current[b].clone()
                changed[positions] = fresh[positions]
                target = self.target_ids[b, : self.lengths[b]].tolist()
                if search.lcs_length(changed.tolist(), target) <= self.copy_limit * len(target):
                    self.current[b] = changed
            self.tried[b] = False
            self.stalled[b] = 0
            self.lead[b] = 0

    # ----- honest check --------------------------------------------------------------------------
    @torch.no_grad()
    @on_model_device
    def check(self, only: torch.Tensor | None = None) -> list[DlmiResult]:
        """Greedy-decode from each running target's discrete prompt (or only those in the [B] mask
        `only`); keep the best; stop exact matches."""
        prompts = self.discrete_prompts()
        # A prompt already checked decodes the same way: skip it (refinement moves are rare late on).
        todo = ~self.done & (prompts != self.checked).any(1)
        idx = torch.nonzero(todo if only is None else todo & only).flatten()
        self.checked[idx] = prompts[idx]
        if len(idx):
            prompts = prompts[idx]
            prefix = torch.tensor(self.prefix, dtype=torch.long).expand(len(idx), -1)
            # The honest check decodes in the model's own dtype, also under a trainer's mixed precision.
            with torch.autocast(self._embeddings.device.type, enabled=False):
                outputs = greedy_decode(self.loaded.model, torch.cat([prefix, prompts], 1), self.target_ids.shape[1])
            for a, b in enumerate(idx.tolist()):
                n = self.lengths[b]
                out, tgt = outputs[a, :n].tolist(), self.target_ids[b, :n].tolist()
                score = lcs_ratio(out, tgt)
                if score >= float(self.best_lcs[b]) or not self.config.keep_best:  # ties: the newer prompt
                    self.best_lcs[b], self.best_prompt[b] = score, prompts[a]
                    self.best_output[b] = outputs[a]
                self.seconds[b] = time.perf_counter() - self._started
                if out == tgt:
                    self.done[b] = True
                    self.best_lcs[b], self.best_prompt[b], self.best_output[b] = 1.0, prompts[a], outputs[a]
        return [self.result(b) for b in range(self.batch_size)]

    def result(self, b: int) -> DlmiResult:
        n, tok = self.lengths[b], self.loaded.tokenizer
        prompt, output = self.best_prompt[b].tolist(), self.best_output[b, :n].tolist()
        target = self.target_ids[b, :n].tolist()
        return DlmiResult(target_ids=target, prompt_ids=prompt, prompt_text=decode(tok, prompt),
                          output_ids=output, output_text=decode(tok, output), exact_match=output == target,
                          lcs_ratio=max(0.0, float(self.best_lcs[b])), soft_lcs_ratio=float(self.soft_lcs[b]),
                          steps=int(self.steps[b]), seconds=float(self.seconds[b]),
                          prompt_target_lcs=lcs_ratio(prompt, target))

    # ----- checkpointing -------------------------------------------------------------------------
    # Extra state travels with nn.Module.state_dict(), also when this batch is a submodule
    # (e.g. of a LightningModule), so a checkpoint resumes the optimizer and the noise exactly.
    def get_extra_state(self) -> dict:
        # A deep copy: the optimizer updates its moment tensors in place.
        return {"optimizer": copy.deepcopy(self.optimizer.state_dict()),
                "generators": [g.get_state() for g in self.generators]}

    def set_extra_state(self, state: dict) -> None:
        self.optimizer.load_state_dict(state["optimizer"])
        for g, s in zip(self.generators, state["generators"]):
            g.set_state(s)
        self._started = time.perf_counter() - float(self.seconds.max())  # buffers are loaded first


def anchor_ids(tokenizer, anchors: Sequence[str]) -> list[int]:
    """The anchors that are single tokens, else [EOS] (else [0])."""
    ids = []
    for text in anchors:
        encoded = tokenizer(text, add_special_tokens=False)["input_ids"]
        if len(encoded) == 1 and int(encoded[0]) not in ids:
            ids.append(int(encoded[0]))
    eos = getattr(tokenizer, "eos_token_id", None)
    return ids or [int(eos) if eos is not None else 0]


def repeat_prompt(target: list[int], length: int, anchor: int) -> list[int]:
    """A prompt that asks for the target by repetition: `anchor t1 t2 ... anchor` (induction copying)."""
    if length == 1:
        return [anchor]
    if len(target) >= length - 2:
        return [anchor] + target[: length - 2] + [anchor]
    unit = [anchor] + target
    return (unit * (length // len(unit) + 1) + [anchor])[-length:]


@torch.no_grad()
def greedy_decode(model: nn.Module, input_ids: torch.Tensor, num_tokens: int) -> torch.Tensor:
    """[B, num_tokens] greedy continuation (no sampling, no early stop at EOS), with a KV cache."""
    out = model(input_ids=input_ids, use_cache=True)
    tokens = [out.logits[:, -1].argmax(-1)]
    for _ in range(num_tokens - 1):
        out = model(input_ids=tokens[-1][:, None], past_key_values=out.past_key_values, use_cache=True)
        tokens.append(out.logits[:, -1].argmax(-1))
    return torch.stack(tokens, 1)


def run_batch(batch: DlmiBatch, callback: Callable[[DlmiBatch, StepStats], None] | None = None) -> list[DlmiResult]:
    """Step a batch until every target matches or runs out of steps, checking every `check_every` steps."""
    c = batch.config
    while not batch.finished:
        stats = batch.step()
        if callback is not None:
            callback(batch, stats)
        steps = int(batch.steps.max())
        if steps % c.check_every == 0 or steps >= c.num_steps:
            batch.check()
    return [batch.result(b) for b in range(batch.batch_size)]


def invert_outputs(loaded, targets: Sequence[Sequence[int]], config: DlmiConfig | None = None,
                   batch_size: int | None = None, keys: Sequence[object] | None = None,
                   callback: Callable[[DlmiBatch, StepStats], None] | None = None,
                   batch_class: Callable[..., DlmiBatch] | None = None) -> list[DlmiResult]:
    """Find, for each target, a prompt whose greedy continuation reproduces it (DLMI, or the method
    whose batch `batch_class(loaded, targets, config, keys)` builds)."""
    config = config or DlmiConfig()
    validate_targets(loaded, targets, config)
    keys = list(keys) if keys is not None else None
    size = batch_size or len(targets)
    results: list[DlmiResult] = []
    for start in range(0, len(targets), size):
        chunk = targets[start : start + size]
        batch = (batch_class or DlmiBatch)(loaded, chunk, config, None if keys is None else keys[start : start + size])
        results.extend(run_batch(batch, callback))
    return results

