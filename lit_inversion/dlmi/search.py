"""The discrete swap search: single-token swaps ranked by the one-hot gradient, scored on the exact criterion.

For a discrete prompt the teacher-forced argmax at every target position equals the target exactly
when greedy decoding reproduces it (same ids, same forward), so every scored candidate is a free
exact check. Candidates are ranked by `lead` (how many leading target positions the argmax gets
right) first, then by a per-position loss: the hinge `relu(best other logit - target logit + kappa)`
summed over the scored window (or the cross-entropy). Only the first `lead + window` target
positions are scored (a curriculum over the target prefix that also shortens every forward).

Cost: the candidates that change position p share the prompt before p, so its keys/values come from
the gradient forward's cache and only the rest is run; vocabulary logits are computed only at the
scored target positions (backbone, then the LM head on those rows).

`SwapSearch` is the one swap search of the package: DLMI's refinement and the GCG baseline are two
option sets of it (`SwapOptions`): the ranking (`lead`: right prefix first, then the per-position loss
over a window; `mean`: GCG's mean cross-entropy with a full match winning), the acceptance rule
(`improve`: move only to a better prompt; `best`: always move to the best candidate, as nanoGCG
without a buffer), and the filters (allowed tokens, copy limit, decode -> encode round trip).

Move-set options from the GCG literature, each off unless set: `dedupe` (Faster-GCG: no prompt is
scored twice), `merge` (I-GCG: the step's best single swaps also applied together), `buffer` (ACG:
restarts from the best prompts kept), `momentum` (MAC: a momentum of the token gradient ranks swaps).
Every search counts its work (`forwards`: prompts scored; `gradients`: gradient passes), which
budgets compare; its scorer times the model calls (`PromptScorer.model_seconds`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from accelerate.utils.memory import should_reduce_batch_size
from torch import nn

from lit_inversion.dlmi.scorer import PromptScorer
from lit_inversion.errors import InversionError
from lit_inversion.metrics import lcs_length

BIG = 1e6  # one more right leading position outweighs any loss difference


@dataclass
class Scored:
    lead: torch.Tensor  # [R] leading target positions the teacher-forced argmax gets right
    key: torch.Tensor  # [R] float64 rank key, smaller is better
    pred: torch.Tensor  # [R, w] teacher-forced argmax


def _margins(logits: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(margin [R, w], target logit [R, w], argmax [R, w]) for logits [R, w, V] and target [w].

    The best other logit comes from the top two: one pass over the vocabulary, no [R, w, V] copy
    (at |V| = 262k a masked copy of the candidates' logits cost 3x as much, measured)."""
    at_target = logits.gather(-1, target.expand(logits.shape[0], -1)[..., None])[..., 0].float()
    values, ids = logits.topk(2, -1)
    other = torch.where(ids[..., 0] == target, values[..., 1], values[..., 0]).float()
    return other - at_target, at_target, ids[..., 0].detach()


def position_losses(logits: torch.Tensor, target: torch.Tensor, objective: str,
                    kappa: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(margin, loss, argmax), each [R, w], for logits [R, w, V] and target [w]; margin < 0 iff the argmax is right."""
    margin, at_target, pred = _margins(logits, target)
    if objective == "ce":
        loss = torch.logsumexp(logits.float(), -1) - at_target
    else:
        loss = torch.relu(margin + kappa)
    return margin, loss, pred


def score(logits: torch.Tensor, target: torch.Tensor, objective: str, kappa: float,
          first_weight: float = 4.0) -> tuple[Scored, torch.Tensor]:
    """Rank keys for candidates' logits [R, w, V]; also the differentiable loss [R].

    The loss sums the per-position losses, the first wrong position's weighted by `first_weight`
    (it is the one the next step of the curriculum needs)."""
    margin, loss, pred = position_losses(logits, target, objective, kappa)
    right = margin.detach() < 0
    lead = right.long().cumprod(1).sum(1)
    first = lead.clamp(max=target.shape[0] - 1)
    weight = torch.ones_like(loss)
    weight[torch.arange(loss.shape[0], device=loss.device), first] += (first_weight - 1.0) * (lead < target.shape[0]).float()
    total = (loss * weight).sum(1)
    key = (target.shape[0] - lead).double() * BIG + total.detach().double()
    return Scored(lead, key, pred), total


def _standardise(x: torch.Tensor) -> torch.Tensor:
    """Each row of x [P, V] to zero mean and unit standard deviation."""
    return (x - x.mean(1, keepdim=True)) / x.std(1, keepdim=True).clamp(min=1e-12)


def map_with_backoff(fn: Callable[[int, int], object], total: int, batch_size: int) -> tuple[list, int]:
    """[fn(start, end) for consecutive slices of range(total)], halving the slice on out-of-memory
    and retrying the failed slice. Returns the results and the slice size that worked.

    accelerate decides what is out-of-memory; its find_executable_batch_size is not used because it
    re-runs every slice after a failure and collects garbage on each call (every GCG step)."""
    results, start = [], 0
    while start < total:
        end = min(total, start + batch_size)
        try:
            results.append(fn(start, end))
        except Exception as error:
            if not should_reduce_batch_size(error):
                raise
            if batch_size == 1:
                raise InversionError("out of memory scoring a single GCG candidate: use a shorter prompt_length "
                                     "or target, or a smaller model") from error
            batch_size = max(1, batch_size // 2)
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            continue
        start = end
    return results, batch_size


@dataclass(frozen=True)
class SwapOptions:
    """How one `SwapSearch` proposes, scores and accepts swaps. Read-only during a run, and with no
    defaults of its own: a method's config builds it (`DlmiConfig.swap_options()`, `GcgConfig.swap_options()`),
    so each knob has one name and one default, the config's."""

    candidates: int  # candidate prompts scored per step
    topk: int  # each swap draws from the top-k tokens of the one-hot gradient at its position
    positions: int  # prompt positions a step swaps at (a random subset); 0 = every position
    n_replace: int  # positions changed per candidate
    rank: str  # lead: right target prefix first, then `objective` over the window | mean: GCG's mean CE
    objective: str  # per-position loss of the lead rank: hinge on the logit margin | ce
    margin: float  # kappa of the hinge
    window: int  # lead rank: score the right prefix + this many target positions (0 = the whole target)
    accept: str  # improve: move only to a better prompt | best: always to the best candidate
    no_revisit: bool  # a swap scored against the current prompt is not scored again (reset on a move)
    patience: int  # steps without a move before a restart (0 = never)
    restart_swaps: int  # positions of the best prompt a restart re-draws (seeded restarts: the next seed)
    copy_limit: float  # largest LCS(prompt, target) / M a candidate may have (1.0 = off)
    retokenize: bool  # drop candidates whose decode -> encode round trip changes the ids (and such restarts)
    chunk: int | None  # candidates per scoring forward (None: a whole group); halved on out-of-memory
    sampling: str  # random: a random draw from each position's top-k | greedy: its best untried ones
    distance_weight: float  # rank swaps by standardised gain minus this times standardised embedding distance
    dedupe: bool  # Faster-GCG: never score a prompt this target's search has scored before
    merge: int  # I-GCG: also score the step's best 2..merge single swaps (distinct positions) applied together
    buffer: int  # ACG: keep the best `buffer` prompts scored; a restart resumes from the best unused one
    momentum: float  # MAC: rank swaps by a momentum of the normalised token gradient (0 = off)
    prior: float  # rank swaps by standardised gain plus this times the standardised LM log-prior (0 = off)


@dataclass
class SwapStep:
    key: float  # rank key of the prompt after the step (smaller is better)
    lead: int  # right target prefix under teacher forcing
    pred: torch.Tensor  # [w] teacher-forced argmax of the scored window
    exact_due: bool  # the teacher-forced argmax is the whole target: confirm by greedy decoding now


class SwapSearch(nn.Module):
    """One target's swap search; its state (prompt, counters, best prompt, visited swaps) is buffers,
    so it travels with the owning batch's state_dict.

    One `step()`: the gradient of the ranking loss at the current prompt (one forward and backward,
    whose key/value cache the candidates reuse), `candidates` swaps drawn from the per-position top-k
    of the one-hot gradient, filtered, scored in groups that share the prompt before their first
    changed position, then the acceptance rule. The random draws come from the target's generator."""

    def __init__(self, scorer: PromptScorer, target: torch.Tensor, allowed: torch.Tensor, prompt: torch.Tensor,
                 options: SwapOptions, generator: torch.Generator, tokenizer=None,
                 seeds: torch.Tensor | None = None, random_prompt: Callable[[], torch.Tensor] | None = None):
        super().__init__()
        self.scorer, self.options, self.generator, self.tokenizer = scorer, options, generator, tokenizer
        self.chunk = options.chunk  # candidates per scoring forward: adapts (halves) on out-of-memory
        self.random_prompt = random_prompt
        N, V, device = prompt.shape[0], allowed.shape[0], prompt.device
        self.register_buffer("target", target.clone(), persistent=False)
        self._copy_targets = [target.tolist()]
        self.register_buffer("allowed", allowed, persistent=False)
        self.register_buffer("seeds", seeds if seeds is not None else torch.zeros(0, N, dtype=torch.long, device=device),
                             persistent=False)
        self.register_buffer("prompt", prompt.clone())
        self.register_buffer("tried", torch.zeros(N, V if options.no_revisit else 0, dtype=torch.bool, device=device))
        self.register_buffer("lead", torch.zeros((), dtype=torch.long, device=device))
        self.register_buffer("key", torch.tensor(torch.inf, dtype=torch.float64, device=device))
        self.register_buffer("stalled", torch.zeros((), dtype=torch.long, device=device))
        self.register_buffer("restarts", torch.zeros((), dtype=torch.long, device=device))
        # The best prompt the search has ranked (restarts start from it, perturbed).
        self.register_buffer("best", prompt.clone())
        self.register_buffer("best_key", torch.tensor(torch.inf, dtype=torch.float64, device=device))
        # Work spent: prompts scored by a forward, and gradient passes (a forward and backward of one prompt).
        self.register_buffer("forwards", torch.zeros((), dtype=torch.long, device=device))
        self.register_buffer("gradients", torch.zeros((), dtype=torch.long, device=device))
        d = scorer.E.shape[1]
        self.register_buffer("velocity", torch.zeros(N if options.momentum else 0, d, device=device))
        K = options.buffer
        self.register_buffer("kept", prompt.repeat(K, 1))
        self.register_buffer("kept_keys", torch.full((K,), torch.inf, dtype=torch.float64, device=device))
        # dedupe: every scored prompt X, as "line" hash(X without position q) -> the tokens X[q] seen there,
        # for each q; the single swaps already scored at position p of a prompt P are the line of (P, p).
        self.lines: dict[int, set[int]] = {}

    def reset(self, prompt: torch.Tensor, forget_best: bool = False) -> None:
        """Start again from `prompt` (a restart; a new phase also forgets the best prompt)."""
        if forget_best:
            self.best.copy_(prompt)
            self.best_key.fill_(torch.inf)
            self.velocity.zero_()
            self.kept_keys.fill_(torch.inf)
        self.prompt.copy_(prompt)
        self.tried.zero_()
        self.lead.zero_()
        self.stalled.zero_()
        self.key.fill_(torch.inf)

    # ----- ranking ------------------------------------------------------------------------------
    def rank(self, logits: torch.Tensor, target: torch.Tensor) -> tuple[Scored, torch.Tensor]:
        """(rank keys, differentiable loss [R]) of logits [R, w, V] for target [w]."""
        o = self.options
        if o.rank == "lead":
            return score(logits, target, o.objective, o.margin)
        margin, ce, pred = position_losses(logits, target, "ce", 0.0)
        lead = (margin.detach() < 0).long().cumprod(1).sum(1)
        mean = ce.mean(1)
        # A full match wins outright (nanoGCG's early stop); otherwise the mean cross-entropy.
        key = mean.detach().double() - BIG * (lead == target.shape[0]).double()
        return Scored(lead, key, pred), mean

    # ----- one step -----------------------------------------------------------------------------
    def step(self, checked: torch.Tensor | None = None, n_replace: int | None = None) -> SwapStep:
        """One search step. `checked`: the last prompt the owner decoded greedily (no new exact flag for it);
        `n_replace`: positions changed per candidate this step (default: the options')."""
        o = self.options
        prompt = self.prompt.clone()
        now, gradient, cache = self._gradient(prompt)
        self._note(prompt, int(now.lead[0]), float(now.key[0]))
        self._remember(prompt[None])
        full = self.total_length
        if int(now.lead[0]) == full and (checked is None or not torch.equal(checked, prompt)):
            return SwapStep(float(now.key[0]), full, now.pred[0], True)  # confirm before moving away
        grad = self._with_momentum(gradient())
        candidates = self._propose(lambda positions: self._gain(grad, positions), prompt, n_replace)
        if len(candidates) == 0:
            return self._stall(now)
        keys, leads, preds = self._score(candidates, prompt, cache)
        if o.merge > 1:
            candidates, keys, leads, preds = self._merged(candidates, keys, leads, preds, prompt, cache)
        self._keep(candidates, keys)
        i = int(keys.argmin())
        if o.accept == "improve" and float(keys[i]) >= float(now.key[0]):
            return self._stall(now)
        self.prompt.copy_(candidates[i])
        self.tried.zero_()  # a new prompt has a new neighbourhood
        self.stalled.zero_()
        self._note(candidates[i], int(leads[i]), float(keys[i]))
        return SwapStep(float(keys[i]), int(leads[i]), preds[i], int(leads[i]) == full)

    # ----- what is optimised: one target here, a group's members in `universal.GroupSearch` -----
    @property
    def total_length(self) -> int:
        """The lead of an exact prompt."""
        return self.target.shape[0]

    @property
    def copy_targets(self) -> list[list[int]]:
        """The targets a prompt must not copy."""
        return self._copy_targets

    @property
    def cost(self) -> int:
        """Forwards per scored prompt (one per target scored)."""
        return 1

    def _gradient(self, prompt: torch.Tensor) -> tuple[Scored, Callable[[], torch.Tensor], object]:
        """(score of `prompt` [1], a function giving the ranking loss's gradient [N, d] at its embeddings,
        the cache the candidates share). Sets the scored window `self.window` (widened while all right)."""
        o, target = self.options, self.target
        n = target.shape[0]
        w = n if (o.window == 0 or o.rank != "lead") else min(n, int(self.lead) + o.window)
        while True:
            logits, emb, cache = self.scorer.with_gradient(prompt, target[:w])
            self.gradients += 1
            now, loss = self.rank(logits, target[:w])
            if not (w < n and int(now.lead[0]) == w):
                break
            w = min(n, w + o.window)  # the window is all right: widen it before searching
        self.window = w

        def gradient() -> torch.Tensor:
            with self.scorer.timed():
                return torch.autograd.grad(loss.sum(), emb)[0][0]

        return now, gradient, cache

    def _score_rows(self, prompts: torch.Tensor, first: int, cache) -> Scored:
        """Rank keys of prompts [R, N] that agree with the cached prompt before `first`."""
        target = self.target[: self.window]
        return self.rank(self.scorer.prompts(prompts, first, target, cache), target)[0]

    def get_extra_state(self) -> dict:
        return {"lines": {key: sorted(tokens) for key, tokens in self.lines.items()}}

    def set_extra_state(self, state: dict) -> None:
        self.lines = {int(key): set(tokens) for key, tokens in state.get("lines", {}).items()}

    def _note(self, prompt: torch.Tensor, lead: int, key: float) -> None:
        self.lead.fill_(lead)
        self.key.fill_(key)
        if key < float(self.best_key):
            self.best_key.fill_(key)
            self.best.copy_(prompt)

    def _with_momentum(self, grad: torch.Tensor) -> torch.Tensor:
        """MAC: the velocity v <- mu v + g / |g| of the prompt gradient [N, d] (the one-hot gradient is
        linear in it), or the gradient itself without momentum."""
        mu = self.options.momentum
        if not mu:
            return grad
        self.velocity.mul_(mu).add_(grad.float() / grad.float().norm().clamp(min=1e-12))
        return self.velocity

    # ----- memory of scored prompts (dedupe) and of the best ones (buffer) -------------------
    @staticmethod
    def _line(prompt: list[int], q: int) -> int:
        return hash((q, tuple(prompt[:q]), tuple(prompt[q + 1 :])))

    def _remember(self, prompts: torch.Tensor) -> None:
        if not self.options.dedupe:
            return
        for row in prompts.tolist():
            for q, token in enumerate(row):
                self.lines.setdefault(self._line(row, q), set()).add(token)

    def _seen(self, prompts: torch.Tensor) -> torch.Tensor:
        """[C] bool: which prompts [C, N] were scored before."""
        rows = prompts.tolist()
        return torch.tensor([row[0] in self.lines.get(self._line(row, 0), ()) for row in rows],
                            dtype=torch.bool, device=prompts.device)

    def _keep(self, candidates: torch.Tensor, keys: torch.Tensor) -> None:
        """ACG's buffer: the `buffer` best distinct prompts scored so far, with their keys."""
        K = self.options.buffer
        if not K:
            return
        prompts = torch.cat([self.kept, candidates])
        all_keys = torch.cat([self.kept_keys, keys.to(self.kept_keys.dtype)])
        order = all_keys.argsort()
        chosen: list[int] = []
        for i in order.tolist():
            if len(chosen) == K or not torch.isfinite(all_keys[i]):
                break
            if all(not torch.equal(prompts[i], prompts[j]) for j in chosen):
                chosen.append(i)
        index = torch.tensor(chosen, dtype=torch.long, device=prompts.device)
        self.kept_keys.fill_(torch.inf)
        self.kept[: len(chosen)] = prompts[index]
        self.kept_keys[: len(chosen)] = all_keys[index]

    def _merged(self, candidates: torch.Tensor, keys: torch.Tensor, leads: torch.Tensor, preds: torch.Tensor,
                prompt: torch.Tensor, cache):
        """I-GCG's multi-coordinate update: the best single swaps at distinct positions applied together
        (the best two, three, .. `merge`), scored and appended to the step's candidates."""
        changed = candidates != prompt
        single = changed.sum(1) == 1
        position = changed.long().argmax(1)
        picks, used = [], set()
        for i in keys.argsort().tolist():
            p = int(position[i])
            if single[i] and p not in used:
                picks.append(i)
                used.add(p)
            if len(picks) == self.options.merge:
                break
        merged, current = [], prompt.clone()
        for i in picks:
            current = current.clone()
            current[position[i]] = candidates[i, position[i]]
            merged.append(current)
        merged = merged[1:]  # the first is a single swap, already scored
        if not merged:
            return candidates, keys, leads, preds
        merged = self._filter(torch.stack(merged), prompt)
        if self.options.dedupe and len(merged):
            merged = merged[~self._seen(merged)]
        if not len(merged):
            return candidates, keys, leads, preds
        k, l, p = self._score(merged, prompt, cache, together=True)
        return (torch.cat([candidates, merged]), torch.cat([keys, k]), torch.cat([leads, l]), torch.cat([preds, p]))

    def _gain(self, grad: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """[P, V] the first-order gain -grad . e_v of each swap at `positions`, from the gradient [N, d] at
        the prompt's embeddings; in E's own dtype (no [V, d] copy)."""
        E = self.scorer.E.detach()
        gain = -(grad[positions].to(E.dtype) @ E.T).float()
        w, prior = self.options.distance_weight, self.options.prior
        if w or prior:
            gain = _standardise(gain)
        if w:  # the first-order gain is trusted less far from the current token (Faster-GCG)
            gain = gain - w * _standardise(torch.cdist(E[self.prompt[positions]].float(), E.float()))
        if prior:  # tokens the model itself would write there (BEAST's sampling, FLRT's fluency)
            gain = gain + prior * _standardise(self.scorer.log_prior(self.prompt, positions))
        return gain

    def _propose(self, gain: Callable[[torch.Tensor], torch.Tensor], prompt: torch.Tensor,
                 n_replace: int | None = None) -> torch.Tensor:
        """[C, N] filtered candidate prompts; `gain(positions)` gives the swaps' gains [P, V] there;
        `n_replace` positions change per candidate (default: the options')."""
        o, g = self.options, self.generator
        n_replace = n_replace or o.n_replace
        N, V = prompt.shape[0], self.allowed.shape[0]
        blocked = ~self.allowed[None].expand(N, -1).clone()
        if o.no_revisit:
            blocked |= self.tried
        if o.dedupe:
            row = prompt.tolist()
            for q in range(N):
                seen = self.lines.get(self._line(row, q))
                if seen:
                    blocked[q, torch.tensor(sorted(seen), dtype=torch.long, device=blocked.device)] = True
        blocked[torch.arange(N, device=prompt.device), prompt] = True  # a swap must change the token
        k = min(o.topk, V)
        finite = (~blocked).sum(1).clamp(max=k)  # usable tokens per position (in its top-k)
        open_positions = torch.nonzero(finite > 0).flatten()
        if len(open_positions) == 0:
            return prompt[None][:0]
        if o.positions:
            open_positions = open_positions[torch.randperm(len(open_positions), generator=g, device=g.device)][: o.positions]
        # Gains only at the positions swapped this step: a [P, V] product instead of [N, V] (at
        # |V| = 262k each row costs as much as an LM head row).
        top = torch.zeros(N, k, dtype=torch.long, device=blocked.device)
        top[open_positions] = gain(open_positions).masked_fill(blocked[open_positions], -torch.inf).topk(k, -1).indices
        if n_replace == 1:
            # Stratified by position (C / positions each, without repeats), so each group shares a prefix.
            per = max(1, o.candidates // len(open_positions))
            rows = []
            for p in sorted(open_positions.tolist()):
                usable = int(finite[p])
                order = (torch.arange(usable, device=g.device) if o.sampling == "greedy"
                         else torch.randperm(usable, generator=g, device=g.device))
                pick = top[p, order[:per]]
                cand = prompt.repeat(len(pick), 1)
                cand[:, p] = pick
                rows.append(cand)
                if o.no_revisit:
                    self.tried[p, pick] = True
            candidates = torch.cat(rows)
        else:
            r = min(n_replace, len(open_positions))
            C = o.candidates
            where = open_positions[torch.rand(C, len(open_positions), generator=g, device=g.device).argsort(1)[:, :r]]
            index = (torch.rand(C, r, generator=g, device=g.device) * finite[where]).long()  # where: [C, r]
            candidates = prompt.repeat(C, 1)
            candidates.scatter_(1, where, top[where, index])
            if o.dedupe:
                candidates = candidates.unique(dim=0)
                candidates = candidates[~self._seen(candidates)]
        return self._filter(candidates, prompt)

    def _copies(self, prompt: list[int]) -> bool:
        """Whether `prompt` shares more of a target than the copy limit allows."""
        return any(lcs_length(prompt, t) > self.options.copy_limit * len(t) + 1e-9 for t in self.copy_targets)

    def _filter(self, candidates: torch.Tensor, prompt: torch.Tensor) -> torch.Tensor:
        o = self.options
        keep = [True] * len(candidates)  # decided on the host: one transfer of the candidates, one back
        if o.copy_limit < 1.0:
            target_set, current = {t for target in self.copy_targets for t in target}, set(prompt.tolist())
            for i, cand in enumerate(candidates.tolist()):
                if (set(cand) - current) & target_set:  # a token outside the targets cannot lengthen an LCS
                    keep[i] = not self._copies(cand)
        keep = torch.tensor(keep, dtype=torch.bool, device=candidates.device)
        if o.retokenize and self.tokenizer is not None:
            from lit_inversion.dlmi.vocab import retokenization_mask

            same = retokenization_mask(self.tokenizer, candidates)
            # From a prompt that does not round-trip itself (a relaxed phase's argmax), any candidate may go
            # on while none does: the filter must not freeze the search.
            if bool(same.any()) or self._round_trips(prompt):
                keep &= same
        return candidates[keep]

    def _round_trips(self, prompt: torch.Tensor) -> bool:
        """Whether `prompt` [N] comes back as the same ids after decode -> encode (always, without the filter)."""
        if not self.options.retokenize or self.tokenizer is None:
            return True
        from lit_inversion.dlmi.vocab import round_trips

        return round_trips(self.tokenizer, prompt)

    def _score(self, candidates: torch.Tensor, prompt: torch.Tensor, cache,
               together: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(keys [C], leads [C], teacher-forced argmax [C, w]), scored in groups sharing the prompt
        before their first changed position (one cached prefix per group); `together`: one group from
        the earliest such position (a few candidates: one forward costs less than several)."""
        self.forwards += len(candidates) * self.cost
        self._remember(candidates)
        first = (candidates != prompt).long().argmax(1)
        if together:
            first = first.min().expand(len(first))
        device = candidates.device
        keys = torch.empty(len(candidates), dtype=torch.float64, device=device)
        leads = torch.empty(len(candidates), dtype=torch.long, device=device)
        preds = None  # [C, w]: w is the scored window's width
        for p in first.unique().tolist():
            rows = torch.nonzero(first == p).flatten()

            def run(s: int, e: int, rows=rows, p=p):
                return self._score_rows(candidates[rows[s:e]], p, cache)

            parts, used = map_with_backoff(run, len(rows), self.chunk or len(rows))
            if self.chunk is not None and used < self.chunk:
                self.chunk = used  # later steps start at the size that fitted
            keys[rows] = torch.cat([s.key for s in parts])
            leads[rows] = torch.cat([s.lead for s in parts])
            pred = torch.cat([s.pred for s in parts])
            if preds is None:
                preds = torch.empty(len(candidates), pred.shape[1], dtype=torch.long, device=device)
            preds[rows] = pred
        return keys, leads, preds

    def _stall(self, now: Scored) -> SwapStep:
        """No move this step; after `patience` such steps, restart."""
        self.stalled += 1
        if self.options.patience and int(self.stalled) >= self.options.patience:
            self.restart()
        return SwapStep(float(now.key[0]), int(now.lead[0]), now.pred[0], False)

    def restart(self) -> None:
        """The next seed prompt if there are seeds; else the best prompt ranked so far with
        `restart_swaps` random positions re-drawn (within the copy limit)."""
        self.restarts += 1
        if len(self.seeds):
            self.reset(self.seeds[int(self.restarts) % len(self.seeds)])
            return
        if self.options.buffer:
            others = torch.isfinite(self.kept_keys) & (self.kept != self.prompt).any(1)
            if others.any():  # the best kept prompt other than this one, taken out of the buffer
                i = int(torch.where(others, self.kept_keys, torch.inf).argmin())
                self.kept_keys[i] = torch.inf
                self.reset(self.kept[i].clone())
                return
        changed = self.best.clone()
        if self.random_prompt is not None and self.options.restart_swaps:
            fresh = self.random_prompt()
            positions = torch.randperm(len(changed), generator=self.generator,
                                       device=self.generator.device)[: self.options.restart_swaps]
            changed[positions] = fresh[positions]
            if self._copies(changed.tolist()) or not self._round_trips(changed):
                changed = self.best.clone()
        self.reset(changed)
