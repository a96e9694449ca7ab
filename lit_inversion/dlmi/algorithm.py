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
`before + prompt + after + target` (the batch's `Context`; bare: `[BOS] + prompt + target`).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from lit_inversion.dlmi import relax, search
from lit_inversion.dlmi.batch import StepStats, TargetBatch, anchor_ids, repeat_prompt
from lit_inversion.dlmi.config import DlmiConfig
from lit_inversion.dlmi.context import Context, bare_context
from lit_inversion.dlmi.scorer import continue_ids
from lit_inversion.metrics import lcs_ratio
from lit_inversion.tokens import encode


class DlmiBatch(TargetBatch):
    """DLMI for a batch of targets: prompt logits Z and temperatures (the relaxed phase), then one
    `SwapSearch` per target (the refinement; the whole run by default).

    Each target draws its noise from its own generator, so a target follows the same path alone or
    in any batch. `state_dict()` covers parameters, optimizer, counters, the searches, best prompts
    and generator states, so a run resumes exactly.
    """

    def __init__(self, loaded, targets: Sequence[Sequence[int]], config: DlmiConfig,
                 keys: Sequence[object] | None = None, context: Context | None = None):
        super().__init__(loaded, targets, config, keys, context)
        c = config
        device = self.device
        B, N, V = self.batch_size, c.prompt_length, loaded.vocab_size
        phi_width = 1 if c.temperature == "shared" else N
        z = torch.stack([torch.randn(N, V, generator=g, device=device) for g in self.generators])
        phi = torch.stack([torch.rand(phi_width, generator=g, device=device) for g in self.generators])
        adc = c.relaxed_method == "adc"
        # Z, one [N, V] row block per target (ADC: a distribution per position, started dense)
        self.logits = nn.Parameter(torch.softmax(z, -1) if adc else z)
        self.phi = nn.Parameter(phi, requires_grad=c.temperature != "fixed" and not adc)
        if adc:
            self.optimizer = torch.optim.SGD([self.logits], lr=c.adc_learning_rate, momentum=c.adc_momentum)
        else:
            params = [self.logits] + ([self.phi] if c.temperature != "fixed" else [])
            self.optimizer = torch.optim.Adam(params, lr=c.learning_rate)
        # ADC+: the best-ranked rounded prompt of the relaxed phase, the search's start.
        self.register_buffer("rounded", z.argmax(-1))
        self.register_buffer("rounded_key", torch.full((B,), torch.inf, dtype=torch.float64, device=device))
        # Restart points of the search with init="repeat": the `anchor t1 .. anchor` prompts, best first.
        seeds = self._repeat_prompts() if c.init == "repeat" else z.argmax(-1)[:, None].clone()
        self.register_buffer("seeds", seeds)
        if c.init == "repeat":
            with torch.no_grad():
                rows, cols = torch.arange(B, device=device)[:, None], torch.arange(N, device=device)[None]
                self.logits[rows, cols, seeds[:, 0]] += c.init_scale
        self.best_prompt.copy_(self.argmax_prompts())
        # One swap search per target (the refinement); started when the relaxed phase ends.
        options = c.swap_options()
        self.searches = nn.ModuleList(
            [self._swap_search(b, self.best_prompt[b], options, seeds[b] if c.init == "repeat" else None)
             for b in range(B)] if c.refine_steps else [])

    @property
    def relax_topk(self) -> int:
        """Tokens per position of the sparse relaxation; 0: dense."""
        return relax.resolve_topk(self.config.relax_topk, self.logits.shape[-1])

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
        if c.relaxed_method == "adc":
            return self._adc_step(idx)
        self.gradients[idx] += c.gumbel_samples
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
            logits = (self._target_logits(soft, rows) if c.teacher_forcing
                      else self.scorer.free_running_logits(soft, self.target_ids.shape[1]))
        row_loss = self._token_losses(logits, rows)  # [A*S]
        per_target = row_loss.view(len(idx), S).mean(1)
        with self.scorer.timed():
            per_target.sum().backward()  # a sum keeps each target's gradient independent of the batch
        self._masked_optimizer_step(idx)
        lcs = torch.tensor(self._lcs_rows(logits.detach().argmax(-1), rows), device=idx.device).view(len(idx), S).mean(1)
        self.soft_lcs[idx] = lcs
        return per_target.detach(), tau.detach().mean(1)

    def _adc_step(self, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """ADC (Hu et al., 2024): SGD with momentum on each position's distribution over the vocabulary,
        embedded as z @ E; then z is projected onto its top 2^w tokens per position, w the wrong target
        tokens under teacher forcing (dense while far, one-hot once right). Its rounded prompt is ranked
        as the search ranks prompts, and the best one starts the search (ADC+)."""
        E = self._embeddings
        self.optimizer.zero_grad(set_to_none=True)
        with self._autocast():
            logits = self._target_logits(self.logits[idx].to(E.dtype) @ E, idx)
        loss = self._token_losses(logits, idx)
        loss.sum().backward()
        self._masked_optimizer_step(idx)
        with torch.no_grad():
            wrong = ((logits.argmax(-1) != self.target_ids[idx]) & self.target_mask[idx]).sum(1)
            self.logits.data[idx] = relax.adc_project(self.logits.data[idx], 2 ** wrong.clamp(max=30))
            rounded = self.logits[idx].argmax(-1)
            keys = self._discrete_key(rounded, idx)
            better = keys < self.rounded_key[idx]
            self.rounded[idx[better]], self.rounded_key[idx[better]] = rounded[better], keys[better]
        self.gradients[idx] += 1
        self.forwards[idx] += 1
        self.soft_lcs[idx] = torch.tensor(self._lcs_rows(logits.detach().argmax(-1), idx), device=idx.device)
        return loss.detach(), torch.full((len(idx),), float("nan"), device=idx.device)

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
        """Start target b's search from argmax Z (ADC: its best rounded prompt) after a relaxed phase;
        from the copy seed with init="repeat"; else from the best-ranked of a random prompt, the model's
        own text after the target (`topic_samples`) and one-token fills (the anchors repeated), within the
        copy limit, its last positions then re-drawn by a BEAST beam (`beam_positions`)."""
        c = self.config
        if c.relaxed_steps > 0:
            start = self.rounded[b] if c.relaxed_method == "adc" else self.argmax_prompts()[b]
            start = self._within_copy_limit(b, start.clone())
        elif c.init == "repeat":
            start = self.seeds[b, 0]
        else:
            options = [self._random_prompt(b)] + self._topic_prompts(b)
            for a in anchor_ids(self.loaded.tokenizer, c.init_anchors):
                fill = [a] * c.prompt_length
                if self.allowed[b, a] and not self._copies(b, fill) and self._round_trips(fill):
                    options.append(torch.tensor(fill, device=self.device))
            options = torch.stack(options)
            start = options[self._discrete_key(options, torch.full((len(options),), b, device=self.device)).argmin()]
            self.forwards[b] += len(options)
            if c.beam_positions:
                start = self._beam_start(b, start)
        self.searches[b].reset(start, forget_best=True)

    @torch.no_grad()
    def _topic_prompts(self, b: int) -> list[torch.Tensor]:
        """`topic_samples` prompts the model writes after `[BOS] + target + "\n\n"` (allowed tokens
        only): text on the target's topic, its target tokens re-drawn until within the copy limit; those
        that re-encode to their ids (under `filter_ids`). Natural targets need their topic set, which
        a random start lacks."""
        c, g = self.config, self.generators[b]
        if not c.topic_samples:
            return []
        before = list(bare_context(self.loaded.bos_id, c.prepend_bos).before)
        separator = encode(self.loaded.tokenizer, "\n\n")
        head = torch.tensor(before + self.target(b).tolist() + separator, device=self.device)

        def sample(logits: torch.Tensor) -> torch.Tensor:
            probs = torch.softmax(logits.float().masked_fill(~self.allowed[b], -torch.inf), -1)
            return torch.multinomial(probs, 1, generator=g)[:, 0]

        with self._autocast():
            prompts = continue_ids(self.loaded.model, head.expand(c.topic_samples, -1), c.prompt_length, sample)
        self.forwards[b] += c.topic_samples
        prompts = [self._within_copy_limit(b, p) for p in prompts]
        return [p for p in prompts if not self._copies(b, p.tolist()) and self._round_trips(p.tolist())]

    def _within_copy_limit(self, b: int, prompt: torch.Tensor) -> torch.Tensor:
        """`prompt` with target tokens re-drawn (random allowed tokens) until it is within the copy limit."""
        target = self.target(b).tolist()
        fresh = self._random_prompt(b)
        for p in range(len(prompt)):
            if not self._copies(b, prompt.tolist()):
                break
            if int(prompt[p]) in target:
                prompt[p] = fresh[p]
        return prompt

    @torch.no_grad()
    def _beam_start(self, b: int, start: torch.Tensor) -> torch.Tensor:
        """BEAST (Sadasivan et al., 2024) over the last `beam_positions` positions of `start`: each kept
        prompt draws `beam_samples` tokens at the position from the model's own next-token distribution
        (allowed tokens only), and the `beam_width` best-ranked prompts go on."""
        c, g = self.config, self.generators[b]
        beams = start[None]
        # At most half the prompt (so p >= 1: every draw has context): on a 5-token prompt a 4-position
        # beam left the search at LCS 0.33 where 2 positions (and no beam) matched a 3-token target
        # (tests/test_real_model.py).
        for p in range(c.prompt_length - min(c.beam_positions, c.prompt_length // 2), c.prompt_length):
            with self._autocast():
                logits = self.scorer.next_token_logits(beams[:, :p]).float()
            probs = torch.softmax(logits.masked_fill(~self.allowed[b], -torch.inf), -1)
            draws = min(c.beam_samples, int((probs[0] > 0).sum()))
            tokens = torch.multinomial(probs, draws, generator=g)  # [K, S] without replacement
            candidates = beams.repeat_interleave(draws, 0)
            candidates[:, p] = tokens.flatten()
            candidates = candidates.unique(dim=0)
            keys = self._discrete_key(candidates, torch.full((len(candidates),), b, device=self.device))
            copying = torch.tensor([self._copies(b, row) or not self._round_trips(row) for row in candidates.tolist()],
                                   dtype=torch.bool, device=self.device)
            keys = keys.masked_fill(copying, torch.inf)
            self.forwards[b] += len(beams) + len(candidates)
            beams = candidates[keys.argsort()[: c.beam_width]]
        return beams[0]

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
