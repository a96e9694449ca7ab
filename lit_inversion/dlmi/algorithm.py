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

from collections.abc import Sequence
from dataclasses import dataclass, replace

import torch
from torch import nn

from lit_inversion.dlmi import relax, search
from lit_inversion.dlmi.batch import (DTYPES, DlmiResult, StepStats, TargetBatch, anchor_ids,  # noqa: F401
                                      greedy_decode, repeat_prompt, resolve_dtype,
                                      target_seed, validate_targets)
from lit_inversion.errors import InversionError
from lit_inversion.metrics import lcs_ratio

TEMPERATURES = ("decoupled", "shared", "fixed")
RELAXATIONS = ("soft", "straight_through")
INITS = ("random", "repeat")
OBJECTIVES = ("hinge", "ce")
ACCEPTS = ("best", "improve")
SAMPLINGS = ("random", "greedy")


@dataclass
class DlmiConfig:
    """DLMI settings: the paper's relaxed phase, then refinement; `DlmiConfig.paper()` is the paper's alone."""

    prompt_length: int = 20  # N
    num_steps: int = 256  # relaxed steps + refinement steps
    # Wall-clock budget per target in seconds (None: steps only): a target stops at whichever of
    # num_steps and max_seconds it reaches first. Equal-time comparisons between methods use it.
    max_seconds: float | None = None
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
    # Sparse relaxation (relax.py): each position's Gumbel softmax over its top-k logits only (plus the best
    # discrete token). None: auto, on (k = 256) from a 100k vocabulary, where the dense one outgrows the
    # model; 0: the dense relaxation over the whole vocabulary (the paper's).
    relax_topk: int | None = None
    # --- the discrete swap search (search.py): the default spends every step here ---
    refine_fraction: float = 1.0  # fraction of num_steps spent on the swap search (after the relaxed phase)
    refine_candidates: int = 64  # single-token swaps scored per step, per target
    refine_positions: int = 4  # prompt positions swapped per step (candidates per position share its prefix)
    # ACG: positions changed per candidate at the search's start, annealed linearly down to 1 over the
    # first half of the budget (steps or seconds, whichever runs out first). 1: single-token swaps only.
    swap_tokens: int = 1
    # Swaps are drawn from the top-k tokens of the one-hot gradient. 256 (nanoGCG's), not 64: on the real
    # model the one swap that fixed a wrong first position ranked ~230th by gradient (measured).
    refine_topk: int = 256
    refine_objective: str = "hinge"  # hinge: relu(best other logit - target logit + margin) | ce
    margin: float = 1.0  # kappa of the hinge: right positions keep this logit gap
    search_window: int = 4  # score the right prefix + this many target positions (0 = the whole target)
    # improve: move only to a better prompt (restarts after refine_patience steps without one) | best:
    # always move to the best candidate, as GCG (a plateau is crossed sideways). Measured: best 0.41 vs
    # 0.35 on 4 fresh k = 1 targets, but 0.21 vs 0.30 on a fresh bar set, so improve stays the default.
    refine_accept: str = "improve"
    refine_sampling: str = "random"  # random: a random draw from each position's top-k | greedy: its best untried ones
    # Faster-GCG's regulariser: rank swaps by standardised gain minus this times standardised embedding
    # distance from the current token (0 = off).
    refine_distance_weight: float = 0.0
    refine_patience: int = 16  # steps without a better prompt before a restart (0 = never; only with improve)
    restart_swaps: int = 3  # positions of the best prompt a restart re-draws at random (init="repeat": the next seed)
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
                   keep_best=False, init="random", refine_patience=0, max_prompt_target_lcs=1.0,
                   relax_topk=0)
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
        one_of("refine_accept", ACCEPTS)
        one_of("refine_sampling", SAMPLINGS)
        need(self.refine_distance_weight >= 0,
             f"refine_distance_weight must be 0 (off) or positive (got {self.refine_distance_weight})")
        one_of("init", INITS)
        for name in ("refine_fraction", "anneal_from", "straight_through_from"):
            need(0.0 <= getattr(self, name) <= 1.0, f"{name} is a fraction in [0, 1] (got {getattr(self, name)})")
        need(self.max_seconds is None or self.max_seconds > 0,
             f"max_seconds must be positive, or null for no time budget (got {self.max_seconds})")
        need(1 <= self.swap_tokens <= self.prompt_length,
             f"swap_tokens must be between 1 and prompt_length ({self.prompt_length}) (got {self.swap_tokens})")
        need(self.relax_topk is None or self.relax_topk >= 0,
             f"relax_topk must be 0 (dense), a positive number of tokens, or null for auto (got {self.relax_topk})")
        need(self.anneal_to > 0, f"anneal_to must be positive (got {self.anneal_to})")
        need(self.refine_patience >= 0, f"refine_patience must be 0 (off) or positive (got {self.refine_patience})")
        need(self.search_window >= 0 and self.restart_swaps >= 0 and self.margin >= 0,
             "search_window, restart_swaps and margin must be 0 or positive")
        need(0.0 <= self.max_prompt_target_lcs <= 1.0,
             f"max_prompt_target_lcs is a fraction in [0, 1] (got {self.max_prompt_target_lcs}); 1.0 turns it off")


class DlmiBatch(TargetBatch):
    """DLMI for a batch of targets: prompt logits Z and temperatures (the relaxed phase), then one
    `SwapSearch` per target (the refinement; the whole run by default).

    Each target draws its noise from its own generator, so a target follows the same path alone or
    in any batch. `state_dict()` covers parameters, optimizer, counters, the searches, best prompts
    and generator states, so a run resumes exactly.
    """

    def __init__(self, loaded, targets: Sequence[Sequence[int]], config: DlmiConfig,
                 keys: Sequence[object] | None = None):
        super().__init__(loaded, targets, config, keys)
        c = config
        device = self.device
        B, N, V = self.batch_size, c.prompt_length, loaded.vocab_size
        phi_width = 1 if c.temperature == "shared" else N
        z = torch.stack([torch.randn(N, V, generator=g, device=device) for g in self.generators])
        phi = torch.stack([torch.rand(phi_width, generator=g, device=device) for g in self.generators])
        self.logits = nn.Parameter(z)  # Z, one [N, V] row block per target
        self.phi = nn.Parameter(phi, requires_grad=c.temperature != "fixed")
        params = [self.logits] + ([self.phi] if c.temperature != "fixed" else [])
        self.optimizer = torch.optim.Adam(params, lr=c.learning_rate)
        # Restart points of the search with init="repeat": the `anchor t1 .. anchor` prompts, best first.
        seeds = self._repeat_prompts() if c.init == "repeat" else z.argmax(-1)[:, None].clone()
        self.register_buffer("seeds", seeds)
        if c.init == "repeat":
            with torch.no_grad():
                rows, cols = torch.arange(B, device=device)[:, None], torch.arange(N, device=device)[None]
                self.logits[rows, cols, seeds[:, 0]] += c.init_scale
        self.best_prompt.copy_(self.argmax_prompts())
        # One swap search per target (the refinement); started when the relaxed phase ends.
        options = self.swap_options()
        self.searches = nn.ModuleList(
            [self._swap_search(b, self.best_prompt[b], options, seeds[b] if c.init == "repeat" else None)
             for b in range(B)] if c.refine_steps else [])

    @property
    def relax_topk(self) -> int:
        """Tokens per position of the sparse relaxation; 0: dense."""
        return relax.resolve_topk(self.config.relax_topk, self.logits.shape[-1])

    def swap_options(self) -> search.SwapOptions:
        """DLMI's swap search: lead-first ranking over a window; moves to the best candidate (or only to a
        better prompt, with restarts on a plateau)."""
        c = self.config
        return search.SwapOptions(candidates=c.refine_candidates, topk=c.refine_topk, positions=c.refine_positions,
                                  rank="lead", objective=c.refine_objective, margin=c.margin,
                                  window=c.search_window, no_revisit=True,
                                  # The copy seed moves between its seed prompts by restarts on a plateau.
                                  accept="improve" if c.init == "repeat" else c.refine_accept,
                                  sampling=c.refine_sampling, distance_weight=c.refine_distance_weight,
                                  patience=c.refine_patience, restart_swaps=c.restart_swaps,
                                  copy_limit=self.copy_limit)

    # ----- parameters -----------------------------------------------------------------------
    def tau(self) -> torch.Tensor:
        """[B, N] temperatures (before any anneal)."""
        c = self.config
        B, N = self.batch_size, c.prompt_length
        if c.temperature == "fixed":
            return torch.full((B, N), float(c.fixed_tau), device=self.device)
        return (c.eps + c.tau0 * (1 + torch.tanh(self.phi))).expand(B, N)

    def argmax_prompts(self) -> torch.Tensor:
        return self.logits.detach().argmax(-1)

    @property
    def current(self) -> torch.Tensor:
        """[B, N] each search's current prompt (argmax Z without a refinement)."""
        if not len(self.searches):
            return self.argmax_prompts()
        return torch.stack([s.prompt for s in self.searches])

    def discrete_prompts(self) -> torch.Tensor:
        """[B, N] the prompt each target would return now: argmax Z, or the search's answer."""
        in_refine = (self.steps >= self.config.relaxed_steps)[:, None]
        return torch.where(in_refine, self._search_answers(), self.argmax_prompts())

    def _search_answers(self) -> torch.Tensor:
        """[B, N] each search's best-ranked prompt when it moves to the best candidate every step (it
        may have left a better one), else its current prompt."""
        if not len(self.searches):
            return self.argmax_prompts()
        return torch.stack([s.best if s.options.accept == "best" else s.prompt for s in self.searches])

    def _free_running_logits(self, prompt_emb: torch.Tensor) -> torch.Tensor:
        """GBDA-style: feed the model's own soft predictions back, one position at a time."""
        E = self._embeddings
        R = prompt_emb.shape[0]
        M = self.target_ids.shape[1]
        head, base = self.loaded.model.get_output_embeddings(), self.loaded.model.base_model
        parts = [E[torch.tensor(self.prefix, dtype=torch.long, device=E.device)].expand(R, -1, -1)] if self.prefix else []
        x = torch.cat([p.to(prompt_emb.dtype) for p in parts] + [prompt_emb], 1)
        out = base(inputs_embeds=x, use_cache=True)
        logits = [head(out.last_hidden_state[:, -1:])]
        for _ in range(M - 1):
            soft = torch.softmax(logits[-1].float(), -1).to(x.dtype) @ E.to(x.dtype)
            out = base(inputs_embeds=soft, past_key_values=out.past_key_values, use_cache=True)
            logits.append(head(out.last_hidden_state[:, -1:]))
        return torch.cat(logits, 1)

    # ----- one step -------------------------------------------------------------------------------
    def step(self) -> StepStats:
        """One optimisation step for every running target (all running targets share a phase)."""
        idx = self.active()
        if len(idx) == 0:
            return self._stats("relaxed")
        in_refine = self.steps[idx] >= self.config.relaxed_steps
        if bool(in_refine.any()) != bool(in_refine.all()):
            raise RuntimeError("targets of one batch must be in the same phase; step them together")
        if bool(in_refine.all()):
            stats = self._stats("refine")
            stats.loss[idx] = self._refine_step(idx)
        else:
            stats = self._stats("relaxed")
            loss, tau = self._relaxed_step(idx)
            stats.loss[idx], stats.tau[idx] = loss.float(), tau.float()
        self._finish_step(idx)
        stats.soft_lcs = self.soft_lcs.clone()
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
        k = self.relax_topk
        ids = None
        if k:  # sparse: gradients reach only the gathered logits
            ids = relax.support(self.logits[idx], k, self.best_prompt[idx])
            z = self.logits[idx[:, None, None], torch.arange(N, device=idx.device)[None, :, None], ids]  # [A, N, k]
        else:
            z = self.logits[idx]
        # Gumbel noise per target from its own generator: independent of the batch composition.
        g = torch.stack([relax.gumbel((S, N, k or V), self.generators[b], c.eps) for b in idx.tolist()])
        p = relax.relaxed_one_hot(z, g, tau)  # [A, S, N, k or V]
        rows = idx.repeat_interleave(S)
        E = self._embeddings
        self.optimizer.zero_grad(set_to_none=True)
        with self._autocast():
            soft = relax.mix(p, E, ids)  # [A*S, N, d]
            if straight:  # forward the hard sample, backward through the soft one
                soft = E[relax.hard_ids(p, ids)].to(soft.dtype) + soft - soft.detach()
            logits = self._target_logits(soft, rows) if c.teacher_forcing else self._free_running_logits(soft)
        row_loss = self._token_losses(logits, rows)  # [A*S]
        per_target = row_loss.view(len(idx), S).mean(1)
        per_target.sum().backward()  # a sum keeps each target's gradient independent of the batch
        self._masked_optimizer_step(idx)
        lcs = torch.tensor(self._lcs_rows(logits.detach().argmax(-1), rows), device=idx.device).view(len(idx), S).mean(1)
        self.soft_lcs[idx] = lcs
        return per_target.detach(), tau.detach().mean(1)

    def _masked_optimizer_step(self, idx: torch.Tensor) -> None:
        """Adam step that leaves stopped targets' parameters untouched (their moments may decay)."""
        if len(idx) == self.batch_size:  # the usual case (one target per pool slot): nothing to restore
            self.optimizer.step()
            return
        frozen = torch.ones(self.batch_size, dtype=torch.bool, device=idx.device)
        frozen[idx] = False
        saved = (self.logits.data[frozen].clone(), self.phi.data[frozen].clone())
        self.optimizer.step()
        self.logits.data[frozen], self.phi.data[frozen] = saved

    @torch.no_grad()
    def _repeat_prompts(self) -> torch.Tensor:
        """[B, K, N] per target, the `anchor t1 t2 ... anchor` prompts over K anchors, best-ranked first."""
        c = self.config
        anchors = anchor_ids(self.loaded.tokenizer, c.init_anchors)
        best = []
        for b, n in enumerate(self.lengths):
            target = self.target_ids[b, :n].tolist()
            options = torch.tensor([repeat_prompt(target, c.prompt_length, a) for a in anchors], device=self.device)
            keys = self._discrete_key(options, torch.full((len(anchors),), b, device=self.device))
            best.append(options[keys.argsort()])
        return torch.stack(best)

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

    def _start_refinement(self, b: int) -> None:
        """Start target b's search from argmax Z after a relaxed phase; from the copy seed with
        init="repeat"; else from the best-ranked of a random prompt and one-token fills (the anchors
        repeated), within the copy limit."""
        c = self.config
        if c.relaxed_steps > 0:
            start = self.argmax_prompts()[b]
        elif c.init == "repeat":
            start = self.seeds[b, 0]
        else:
            target = self.target(b).tolist()
            options = [self._random_prompt(b)]
            for a in anchor_ids(self.loaded.tokenizer, c.init_anchors):
                fill = [a] * c.prompt_length
                if self.allowed[b, a] and search.lcs_length(fill, target) <= self.copy_limit * len(target):
                    options.append(torch.tensor(fill, device=self.device))
            options = torch.stack(options)
            start = options[self._discrete_key(options, torch.full((len(options),), b, device=self.device)).argmin()]
        self.searches[b].reset(start, forget_best=True)

    def _refine_step(self, idx: torch.Tensor) -> torch.Tensor:
        """One swap-search step per running target.

        Targets run one after another: each one's candidates already fill a large forward, and a
        target's cost never depends on the batch it is in."""
        keys = []
        with self._autocast():
            for b in idx.tolist():
                if int(self.steps[b]) == self.config.relaxed_steps:
                    self._start_refinement(b)
                out = self.searches[b].step(self.checked[b], n_replace=self._swap_tokens(b))
                self.soft_lcs[b] = lcs_ratio(out.pred.tolist(), self.target(b).tolist())
                self.exact_due[b] = out.exact_due
                keys.append(out.key)
        return torch.tensor(keys, device=self.device)

    def _swap_tokens(self, b: int) -> int:
        """ACG's schedule: `swap_tokens` positions per candidate at the search's start, 1 from half way."""
        c = self.config
        if c.swap_tokens == 1:
            return 1
        done = (int(self.steps[b]) - c.relaxed_steps) / max(1, c.refine_steps)
        if c.max_seconds is not None:
            done = max(done, float(self.seconds[b]) / c.max_seconds)
        return max(1, round(c.swap_tokens - (c.swap_tokens - 1) * min(1.0, 2 * done)))
