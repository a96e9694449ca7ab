"""Universal prompts: one prompt span optimised for a group of targets, each in its own context.

A group's members share the span; each has its own `Context` (chat turns, prefix / suffix) and its own
target. The swap search (`GroupSearch`) scores every candidate on every member that has joined: the rank
key counts the members' wrong leading target positions first (all members' together), then combines
their losses (`group_loss`: the sum, as llm-attacks' `multiple` mode, or a mellowmax that weights the
worst members most); the gradient that ranks swaps is the same combination of the members' gradients.
`group_mode="progressive"` starts with the first member and adds the next once every member in is exact
(or every `group_add_every` steps), as llm-attacks' progressive goals.

Across ranks (`Members` with a process group) each rank scores the same candidates on its own
contiguous share of the members; the per-member values are gathered and combined in member order, so
every rank takes the same step, and the result equals one process's (the same sums, in the same order).

A group is solved when the one prompt reproduces every member's target by greedy decoding in that
member's context; its record (`GroupResult`) has one pair per member, every pair from the one prompt.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass

import torch
import torch.distributed as dist
from torch import nn

from lit_inversion.dlmi import search
from lit_inversion.dlmi.batch import StepStats, anchor_ids, draw_prompt, restore_generator, round_trips, target_seed
from lit_inversion.dlmi.config import DlmiConfig, OutputConfig
from lit_inversion.dlmi.context import Context, bare_context
from lit_inversion.dlmi.data import OutputGroup, check_group_config, validate_group
from lit_inversion.dlmi.scorer import PromptScorer
from lit_inversion.dlmi.vocab import allowed_tokens, forbidden_for_target
from lit_inversion.errors import InversionError
from lit_inversion.metrics import lcs_length, lcs_ratio
from lit_inversion.precision import model_dtype_region, resolve_dtype
from lit_inversion.tokens import decode


# ----- who scores which members -------------------------------------------------------------------
class Members:
    """The members this process scores (a contiguous share, so gathering rank by rank keeps member
    order), and the gathers that bring every member's values to every rank."""

    def __init__(self, count: int, device: torch.device, process_group=None):
        self.group, self.device = process_group, device
        self.world = dist.get_world_size(process_group) if process_group is not None else 1
        self.rank = dist.get_rank(process_group) if process_group is not None else 0
        if self.world > count:
            raise InversionError(f"a group of {count} members cannot be split over {self.world} processes: "
                                 "use at most as many processes as members")
        self.local = list(range(self.rank * count // self.world, (self.rank + 1) * count // self.world))

    def gather(self, values: list) -> list:
        """This rank's per-member values (for its local members, in order) -> every member's, in member
        order, on every rank. Tensors travel on the CPU and arrive on this rank's device."""
        if self.world == 1:
            return values
        parts = self.gather_one([v.cpu() if isinstance(v, torch.Tensor) else v for v in values])
        return [v.to(self.device) if isinstance(v, torch.Tensor) else v for part in parts for v in part]

    def gather_one(self, value) -> list:
        """Every rank's `value`, in rank order."""
        if self.world == 1:
            return [value]
        parts: list = [None] * self.world
        dist.all_gather_object(parts, value, group=self.group)
        return parts


@dataclass
class Member:
    index: int  # place in the group (member order)
    id: str
    scorer: PromptScorer
    target: torch.Tensor  # [n]


# ----- the search -------------------------------------------------------------------------------
class GroupSearch(search.SwapSearch):
    """The swap search of one group: `SwapSearch`'s proposals, filters, acceptance and restarts, with the
    scoring of every joined member combined into one key."""

    def __init__(self, members: list[Member], lengths: list[int], all_targets: list[list[int]], communicator: Members,
                 allowed: torch.Tensor, prompt: torch.Tensor, options: search.SwapOptions, generator: torch.Generator,
                 tokenizer, random_prompt: Callable[[], torch.Tensor], combine: str = "sum", omega: float = 1.0):
        first = members[0]
        super().__init__(first.scorer, first.target, allowed, prompt, options, generator, tokenizer,
                         random_prompt=random_prompt)
        self.members, self.lengths, self.communicator = members, lengths, communicator
        self.combine, self.omega = combine, omega
        self._copy_targets = [list(t) for t in all_targets]
        device = prompt.device
        # Members in (the first `joined`); each member's lead at the current prompt (its window).
        self.register_buffer("joined", torch.tensor(len(lengths), dtype=torch.long, device=device))
        self.register_buffer("member_leads", torch.zeros(len(lengths), dtype=torch.long, device=device))
        self.windows: dict[int, int] = {}

    # ----- which members count now --------------------------------------------------------------
    def _in(self) -> list[Member]:
        return [m for m in self.members if m.index < int(self.joined)]

    @property
    def total_length(self) -> int:
        return sum(self.lengths[: int(self.joined)])

    @property
    def cost(self) -> int:
        return len(self._in())

    def _window(self, m: Member) -> int:
        o, n = self.options, self.lengths[m.index]
        return n if (o.window == 0 or o.rank != "lead") else min(n, int(self.member_leads[m.index]) + o.window)

    # ----- combining members -----------------------------------------------------------------------
    def _weights(self, losses: torch.Tensor) -> torch.Tensor:
        """d combined / d loss_m for the members' losses [J]: 1 (sum) or mellowmax's softmax weights."""
        if self.combine == "sum":
            return torch.ones_like(losses)
        return torch.softmax(self.omega * losses, 0)

    def _combined(self, leads: torch.Tensor, losses: torch.Tensor) -> torch.Tensor:
        """Rank keys [R] from the members' leads and losses, each [J, R] in member order."""
        lengths = torch.tensor(self.lengths[: leads.shape[0]], device=leads.device)[:, None]
        if self.combine == "sum":
            loss = losses.sum(0)
        else:  # mellowmax: (1 / w) log mean exp(w L), a smooth maximum over the members
            loss = (torch.logsumexp(self.omega * losses, 0) - math.log(losses.shape[0])) / self.omega
        if self.options.rank == "lead":
            return (lengths - leads).sum(0).double() * search.BIG + loss.double()
        return loss.double() - search.BIG * (leads == lengths).all(0).double()

    # ----- the hooks of SwapSearch -----------------------------------------------------------------
    def _gradient(self, prompt: torch.Tensor):
        o = self.options
        local = []
        for m in self._in():
            n, w = self.lengths[m.index], self._window(m)
            while True:
                logits, emb, cache = m.scorer.with_gradient(prompt, m.target[:w])
                self.gradients += 1
                now, loss = self.rank(logits, m.target[:w])
                if not (w < n and int(now.lead[0]) == w):
                    break
                w = min(n, w + o.window)
            self.windows[m.index] = w
            local.append((m, now, loss, emb, cache))
        caches = {m.index: cache for m, _, _, _, cache in local}
        stats = self.communicator.gather([torch.stack([now.lead[0].double(), loss.detach()[0].double()])
                                          for _, now, loss, _, _ in local])
        stats = torch.stack(stats)  # [J, 2]
        leads, losses = stats[:, 0].long()[:, None], stats[:, 1].float()[:, None]
        self.member_leads[: leads.shape[0]] = leads[:, 0]  # the same on every rank (a checkpoint holds all)
        key = self._combined(leads, losses)
        # This rank's joined members' teacher-forced argmax (none yet on a rank whose members join later).
        pred = torch.cat([now.pred[0] for _, now, _, _, _ in local] or [prompt.new_zeros(0)])[None]
        now = search.Scored(leads.sum(0), key, pred)

        def gradient() -> torch.Tensor:
            weights = self._weights(losses[:, 0])
            with self.scorer.timed():
                grads = [torch.autograd.grad(loss.sum(), emb)[0][0].float() for _, _, loss, emb, _ in local]
            total = None
            for weight, grad in zip(weights, self.communicator.gather(grads)):
                total = weight * grad if total is None else total + weight * grad
            return total

        return now, gradient, caches

    def _score_rows(self, prompts: torch.Tensor, first: int, cache) -> search.Scored:
        local, preds = [], []
        for m in self._in():
            target = m.target[: self.windows[m.index]]
            scored, loss = self.rank(m.scorer.prompts(prompts, first, target, cache[m.index]), target)
            local.append(torch.stack([scored.lead.double(), loss.detach().double()]))
            preds.append(scored.pred)
        stats = torch.stack(self.communicator.gather(local))  # [J, 2, R]
        leads, losses = stats[:, 0].long(), stats[:, 1].float()
        pred = torch.cat(preds, 1) if preds else prompts.new_zeros(len(prompts), 0)
        return search.Scored(leads.sum(0), self._combined(leads, losses), pred)

    def keys(self, prompts: torch.Tensor) -> torch.Tensor:
        """Rank keys [R] of whole prompts [R, N] (no cache): picks the start prompt."""
        for m in self._in():
            self.windows[m.index] = self._window(m)
        return self._score_rows(prompts, 0, {m.index: None for m in self._in()}).key

    def soft_lcs(self, pred: torch.Tensor) -> float:
        """Mean over this rank's joined members of LCS(teacher-forced argmax, target) on the scored windows."""
        scores, start = [], 0
        for m in self._in():
            w = self.windows.get(m.index, 0)
            scores.append(lcs_ratio(pred[start : start + w].tolist(), m.target[:w].tolist()) if w else 0.0)
            start += w
        return sum(scores) / max(1, len(scores))


# ----- results ------------------------------------------------------------------------------
@dataclass
class PairResult:
    id: str
    input_ids: list[int]  # the member's context around the group's prompt
    target_ids: list[int]
    output_ids: list[int]  # greedy continuation of input_ids
    output_text: str
    exact_match: bool
    lcs_ratio: float
    joined_step: int | None  # the step it joined the optimisation (0: from the start; None: never, progressive)
    solved_step: int | None  # the first honest check that found it exact (None: never)


@dataclass
class GroupResult:
    prompt_ids: list[int]
    prompt_text: str
    pairs: list[PairResult]
    steps: int
    seconds: float
    soft_lcs_ratio: float
    mode: str
    prompt_target_lcs: float = 0.0  # the largest over the members

    @property
    def exact_match(self) -> bool:
        return all(p.exact_match for p in self.pairs)

    @property
    def lcs_ratio(self) -> float:
        """The mean per-pair honest LCS."""
        return sum(p.lcs_ratio for p in self.pairs) / len(self.pairs)

    def to_dict(self) -> dict:
        return {**asdict(self), "exact_match": self.exact_match, "lcs_ratio": self.lcs_ratio}


# ----- the batch -------------------------------------------------------------------------------
class GroupBatch(nn.Module):
    """One group in a pool slot: the pool's view of a target (steps, honest checks, results), for many
    members at once. Its state (counters, the best prompt, the search) is buffers, so a checkpoint
    resumes the group where it was."""

    def __init__(self, loaded, group: OutputGroup, config: OutputConfig, process_group=None):
        super().__init__()
        check_group_config(config)
        validate_group(loaded, group, config)
        self.loaded, self.config, self.group = loaded, config, group
        device = loaded.model.get_input_embeddings().weight.device
        self.communicator = Members(len(group.members), device, process_group)
        bare = bare_context(loaded.bos_id, config.prepend_bos)
        self.contexts: list[Context] = [m.context or bare for m in group.members]
        self.targets = [list(m.ids) for m in group.members]
        share, cache = config.share_prefix, config.cache_context
        self.members = [Member(i, group.members[i].id, PromptScorer(loaded.model, self.contexts[i], share, cache),
                               torch.tensor(self.targets[i], dtype=torch.long, device=device))
                        for i in self.communicator.local]
        self.generator = torch.Generator(device=device).manual_seed(target_seed(config.seed, group.id))
        J, N, M = len(self.targets), config.prompt_length, max(len(t) for t in self.targets)
        self.register_buffer("allowed", self._allowed_tokens(device), persistent=False)
        self.register_buffer("steps", torch.zeros(1, dtype=torch.long, device=device))
        self.register_buffer("done", torch.zeros(1, dtype=torch.bool, device=device))
        self.register_buffer("seconds", torch.zeros(1, dtype=torch.float64, device=device))
        self.register_buffer("soft_lcs", torch.zeros(1, device=device))
        self.register_buffer("best_lcs", torch.full((1,), -1.0, device=device))  # mean per-pair honest LCS
        self.register_buffer("best_prompt", torch.zeros(1, N, dtype=torch.long, device=device))
        self.register_buffer("best_outputs", torch.zeros(J, M, dtype=torch.long, device=device))
        self.register_buffer("checked", torch.full((1, N), -1, dtype=torch.long, device=device))
        self.register_buffer("joined_step", torch.full((J,), -1, dtype=torch.long, device=device))
        self.register_buffer("solved_step", torch.full((J,), -1, dtype=torch.long, device=device))
        self.register_buffer("forwards", torch.zeros(1, dtype=torch.long, device=device))
        self.register_buffer("started", torch.zeros((), dtype=torch.bool, device=device))
        progressive = config.group_mode == "progressive"
        self.joined_step[: 1 if progressive else J] = 0
        start = self._random_prompt()
        self.search = GroupSearch(self.members, [len(t) for t in self.targets], self.targets, self.communicator,
                                  self.allowed, start, config.swap_options(), self.generator, loaded.tokenizer,
                                  self._random_prompt, config.group_loss, config.mellowmax_omega)
        self.search.joined.fill_(1 if progressive else J)
        self.best_prompt[0] = start
        self._started = time.perf_counter()

    # ----- the pool's view ------------------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        return self.best_prompt.device

    def _running(self) -> bool:
        c = self.config
        # The time budget is per target: a group of G members gets G times it (one step scores all G).
        over = c.max_seconds is not None and float(self.seconds[0]) >= c.max_seconds * len(self.targets)
        return not bool(self.done[0]) and int(self.steps[0]) < c.num_steps and not over

    @property
    def finished(self) -> bool:
        return not self._running()

    @property
    def check_due(self) -> bool:
        steps = int(self.steps[0])
        return steps % self.config.check_every == 0 or steps >= self.config.num_steps or self.finished

    def work(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.forwards + self.search.forwards, self.search.gradients.view(1).clone()

    # ----- start ------------------------------------------------------------------------------------
    def _allowed_tokens(self, device: torch.device) -> torch.Tensor:
        c, tok, V = self.config, self.loaded.tokenizer, self.loaded.vocab_size
        allowed = allowed_tokens(tok, V, c.allow_non_ascii).clone()
        special = [i for i in (getattr(tok, "all_special_ids", None) or []) if 0 <= i < V]
        allowed[special] = False
        if c.forbid_target_tokens:
            for target in self.targets:
                allowed &= ~forbidden_for_target(tok, V, target)
        if int(allowed.sum()) < 2:
            raise InversionError(f"group {self.group.id!r}: fewer than 2 tokens are allowed in swaps: "
                                 "set allow_non_ascii to true or forbid_target_tokens to false")
        return allowed.to(device)

    def _copies(self, prompt: list[int]) -> bool:
        """Whether `prompt` shares more of any member's target than the copy limit allows."""
        return any(lcs_length(prompt, t) > self.config.copy_limit * len(t) + 1e-9 for t in self.targets)

    def _random_prompt(self) -> torch.Tensor:
        return draw_prompt(self.allowed, self.config.prompt_length, self.generator,
                           lambda prompt: self._copies(prompt) or not round_trips(self.loaded.tokenizer, self.config, prompt))

    @torch.no_grad()
    def _start(self) -> None:
        """DLMI: the best-ranked of the random start and the one-token fills (GCG: its random start)."""
        if isinstance(self.config, DlmiConfig):
            options = [self.search.prompt.clone()]
            for a in anchor_ids(self.loaded.tokenizer, self.config.init_anchors):
                fill = [a] * self.config.prompt_length
                if self.allowed[a] and not self._copies(fill) and round_trips(self.loaded.tokenizer, self.config, fill):
                    options.append(torch.tensor(fill, device=self.device))
            options = torch.stack(options)
            self.forwards += len(options) * self.search.cost
            start = options[self.search.keys(options).argmin()]
            self.search.reset(start, forget_best=True)
            self.best_prompt[0] = start
        self.started.fill_(True)

    # ----- one step -----------------------------------------------------------------------------
    def step(self) -> StepStats:
        nan = torch.full((1,), math.nan, device=self.device)
        if not self._running():
            return StepStats(nan, nan.clone(), self.soft_lcs.clone(), "group")
        dtype = resolve_dtype(self.config.compute_dtype, self.device)
        with torch.autocast(self.device.type, dtype=dtype, enabled=dtype != torch.float32):
            if not bool(self.started):
                self._start()
            out = self.search.step(self.checked[0])
        self.soft_lcs[0] = self.search.soft_lcs(out.pred)
        self.steps += 1
        self._clock()
        if out.exact_due:
            self.check()
        loss = torch.tensor([out.key], device=self.device)
        return StepStats(loss, nan.clone(), self.soft_lcs.clone(), "group")

    def _clock(self) -> None:
        # Every rank must agree to stop: the slowest clock decides.
        elapsed = time.perf_counter() - self._started
        self.seconds[0] = max(self.communicator.gather_one(elapsed)) if self.communicator.world > 1 else elapsed

    # ----- the honest check -------------------------------------------------------------------------
    @torch.no_grad()
    def _decode(self, prompt: torch.Tensor, verdict: bool = False) -> list[list[int]]:
        """Every member's greedy continuation of its context around `prompt` [N], in member order."""
        with model_dtype_region(self.device):
            local = [m.scorer.verdict(prompt, len(m.target)) if verdict
                     else m.scorer.greedy(prompt[None], len(m.target))[0].tolist() for m in self.members]
        return self.communicator.gather(local)

    @torch.no_grad()
    def check(self) -> GroupResult:
        """Decode the current prompt for every member; keep the best prompt (mean pair LCS); note solved
        members; add the next member (progressive) or stop (all exact)."""
        prompt = self.search.best if self.search.options.accept == "best" else self.search.prompt
        if not torch.equal(prompt, self.checked[0]) and not bool(self.done[0]):
            self.checked[0] = prompt
            outputs = self._decode(prompt)
            exact = [o == t for o, t in zip(outputs, self.targets)]
            score = sum(lcs_ratio(o, t) for o, t in zip(outputs, self.targets)) / len(outputs)
            step = int(self.steps[0])
            for j, e in enumerate(exact):
                if e and int(self.solved_step[j]) < 0:
                    self.solved_step[j] = step
            if score >= float(self.best_lcs[0]):
                self.best_lcs[0], self.best_prompt[0] = score, prompt
                for j, o in enumerate(outputs):
                    self.best_outputs[j, : len(o)] = torch.tensor(o, device=self.device)
            if all(exact):
                self.done[0] = True
            self._maybe_add(exact, step)
        return self.result(0)

    def _maybe_add(self, exact: list[bool], step: int) -> None:
        """Progressive: the next member joins once every member in is exact, or on the schedule."""
        joined = int(self.search.joined)
        if bool(self.done[0]) or joined == len(self.targets):
            return
        every = self.config.group_add_every
        if all(exact[:joined]) or (every and step > 0 and step - int(self.joined_step[joined - 1]) >= every):
            self.joined_step[joined] = step
            self.search.joined.fill_(joined + 1)
            self.search.reset(self.search.prompt.clone(), forget_best=True)  # the keys changed meaning

    def result(self, b: int = 0) -> GroupResult:
        tok = self.loaded.tokenizer
        prompt = self.best_prompt[0].tolist()
        pairs = []
        for j, (m, target) in enumerate(zip(self.group.members, self.targets)):
            output = self.best_outputs[j, : len(target)].tolist()
            pairs.append(PairResult(m.id, self.contexts[j].input_ids(prompt), target, output, decode(tok, output),
                                    output == target, max(0.0, lcs_ratio(output, target)) if self.best_lcs[0] >= 0 else 0.0,
                                    _step_or_none(self.joined_step[j]), _step_or_none(self.solved_step[j])))
        return GroupResult(prompt, decode(tok, prompt), pairs, int(self.steps[0]), float(self.seconds[0]),
                           float(self.soft_lcs[0]), self.config.group_mode,
                           max(lcs_ratio(prompt, t) for t in self.targets))

    @torch.no_grad()
    def final_result(self, b: int = 0) -> GroupResult:
        """The group's record: its best prompt judged by the verdict (batch of one, unpadded, uncached) per member."""
        result = self.result(0)
        outputs = self._decode(self.best_prompt[0], verdict=True)
        for pair, output in zip(result.pairs, outputs):
            pair.output_ids, pair.output_text = output, decode(self.loaded.tokenizer, output)
            pair.exact_match, pair.lcs_ratio = output == pair.target_ids, lcs_ratio(output, pair.target_ids)
        return result

    # ----- checkpointing ----------------------------------------------------------------------------
    def get_extra_state(self) -> dict:
        return {"generator": self.generator.get_state(), "generator_device": self.device.type}

    def set_extra_state(self, state: dict) -> None:
        restore_generator(self.generator, state["generator"], state.get("generator_device", "cpu"))
        self._started = time.perf_counter() - float(self.seconds[0])


def _step_or_none(step: torch.Tensor) -> int | None:
    return int(step) if int(step) >= 0 else None


def group_record(group_id: str, result: GroupResult) -> dict:
    """The results file's record of a group: its prompt and one pair per member."""
    return {"id": group_id, "group": True, "mode": result.mode, "prompt_ids": result.prompt_ids,
            "prompt_text": result.prompt_text, "exact_match": result.exact_match, "lcs_ratio": result.lcs_ratio,
            "soft_lcs_ratio": result.soft_lcs_ratio, "steps": result.steps, "seconds": round(result.seconds, 3),
            "prompt_target_lcs": result.prompt_target_lcs, "pairs": [asdict(p) for p in result.pairs]}


def run_groups(loaded, groups: Sequence[OutputGroup], config: OutputConfig, process_group=None,
               on_step: Callable[[GroupBatch], None] | None = None) -> list[GroupResult]:
    """Optimise each group to the end, one after another (all ranks of `process_group` together)."""
    results = []
    for group in groups:
        batch = GroupBatch(loaded, group, config, process_group)
        while not batch.finished:
            batch.step()
            if batch.check_due:
                batch.check()
            if on_step is not None:
                on_step(batch)
        results.append(batch.final_result())
    return results

