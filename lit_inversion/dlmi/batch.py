"""What every output -> prompt method shares: a batch of targets, the honest check and the results.

`TargetBatch` holds the targets (padded), one generator per target (seeded from the run seed and the
target's key, so a target follows the same path alone or in any batch), the step counters, the best
prompt any honest check saw, and the tokens a discrete search may use. A method subclasses it with
its own parameters and `step()`: `DlmiBatch` (the relaxed phase and the swap search), `GcgBatch`
(the swap search alone), `ReinforceBatch` (the score-function gradient). None of them inherits
another method's state.

Every target of a batch shares one `Context` (the ids before and after the optimised span; a pool
slot holds one target). All forwards go through the batch's one `PromptScorer`. The honest check
decodes greedily from `before + prompt + after` and scores that against the target; a finished
target's record comes from `final_result`, whose verdict is an unpadded, uncached, batch-of-one decode.
"""

from __future__ import annotations

import copy
import functools
import hashlib
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from lit_inversion.dlmi import search, vocab
from lit_inversion.dlmi.context import Context, bare_context
from lit_inversion.dlmi.scorer import PromptScorer, greedy_decode  # noqa: F401  (greedy_decode: re-exported)
from lit_inversion.dlmi.vocab import allowed_tokens, forbidden_for_target
from lit_inversion.errors import InversionError
from lit_inversion.metrics import lcs_length, lcs_ratio
from lit_inversion.precision import model_dtype_region, resolve_dtype
from lit_inversion.tokens import check_ids, decode

@dataclass
class DlmiResult:
    target_ids: list[int]
    prompt_ids: list[int]
    prompt_text: str
    output_ids: list[int]  # greedy continuation of input_ids, len(target) tokens
    output_text: str
    exact_match: bool
    lcs_ratio: float  # honest: LCS(output, target) / len(target)
    # Paper-style LCS of the teacher-forced argmax: of the soft pass at the last relaxed step (mean over
    # the Gumbel samples), or of the current discrete prompt during a swap search.
    soft_lcs_ratio: float
    steps: int
    seconds: float  # wall time of its batch until this target stopped
    # LCS(prompt, target) / len(target): near 1 when the prompt simply contains the target (copying).
    prompt_target_lcs: float = 0.0
    # Everything the model saw before the target: context before + prompt + context after (BOS included).
    input_ids: list[int] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class StepStats:
    loss: torch.Tensor  # [B] relaxed: mean teacher-forced CE; search: rank key; nan where no step
    tau: torch.Tensor  # [B] mean temperature (nan for methods without one)
    soft_lcs: torch.Tensor  # [B] paper-style LCS of this step (search: of the current prompt)
    phase: str  # "relaxed", "refine", "gcg", "reinforce"


def validate_targets(loaded, targets: Sequence[Sequence[int]], config, contexts: Sequence[Context | None] = (),
                     names: Sequence[str] = ()) -> None:
    """Raise InversionError for inputs the optimisation cannot handle (`contexts[i]`: target i's, default bare)."""
    config.validate()
    if len(targets) == 0:
        raise InversionError("no targets given: pass at least one target token sequence")
    bare = bare_context(loaded.bos_id, config.prepend_bos)
    for i, ids in enumerate(targets):
        name = f"target {names[i]!r}" if i < len(names) else f"target {i}"
        check_ids(list(ids), loaded.vocab_size, name)
        context = (contexts[i] if i < len(contexts) else None) or bare
        if len(context):
            check_ids(context.input_ids([]), loaded.vocab_size, f"the context of {name}")
        total = len(context) + config.prompt_length + len(ids)
        if loaded.max_positions is not None and total > loaded.max_positions:
            raise InversionError(
                f"{name}: context + prompt + target is {total} tokens, more than the model context of "
                f"{loaded.max_positions}: use a shorter context, prompt_length or target"
            )


def target_seed(seed: int, key: object) -> int:
    """A per-target seed that does not depend on the target's place in its batch."""
    return int.from_bytes(hashlib.sha256(f"{seed}:{key}".encode()).digest()[:8], "little") & ((1 << 63) - 1)


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


class TargetBatch(nn.Module):
    """A batch of targets, stepped together by a method's `step()`; `check()` decodes greedily from
    each running target's discrete prompt, keeps the best one and stops targets that match.
    `state_dict()` covers every buffer and (through `get_extra_state`) the generators."""

    phase = "search"

    def __init__(self, loaded, targets: Sequence[Sequence[int]], config, keys: Sequence[object] | None = None,
                 context: Context | None = None):
        super().__init__()
        self.context = context or bare_context(loaded.bos_id, config.prepend_bos)
        validate_targets(loaded, targets, config, [self.context] * len(targets))
        self.loaded, self.config = loaded, config
        self.scorer = PromptScorer(loaded.model, self.context, config.share_prefix, config.cache_context)
        # Every tensor of the batch lives on the model's device, named at each factory call.
        device = self.device
        self.keys = [tuple(int(i) for i in t) for t in targets] if keys is None else list(keys)
        B, N = len(targets), config.prompt_length
        self.lengths = [len(t) for t in targets]
        M = max(self.lengths)
        padded = torch.zeros(B, M, dtype=torch.long, device=device)
        for b, t in enumerate(targets):
            padded[b, : len(t)] = torch.tensor([int(i) for i in t], device=device)
        self.register_buffer("target_ids", padded)
        lengths = torch.tensor(self.lengths, device=device)
        self.register_buffer("target_mask", torch.arange(M, device=device)[None] < lengths[:, None])
        self.generators = [torch.Generator(device=device).manual_seed(target_seed(config.seed, k))
                           for k in self.keys]
        self.register_buffer("steps", torch.zeros(B, dtype=torch.long, device=device))
        self.register_buffer("done", torch.zeros(B, dtype=torch.bool, device=device))  # exact match found: frozen
        # teacher forcing says exact: check
        self.register_buffer("exact_due", torch.zeros(B, dtype=torch.bool, device=device))
        # Tokens a discrete search may put in, per target (special tokens, copy rules).
        self.register_buffer("allowed", self._allowed_tokens(), persistent=False)
        self.register_buffer("best_prompt", torch.zeros(B, N, dtype=torch.long, device=device))
        self.register_buffer("best_output", torch.zeros(B, M, dtype=torch.long, device=device))
        # The last prompt checked.
        self.register_buffer("checked", torch.full((B, N), -1, dtype=torch.long, device=device))
        self.register_buffer("best_lcs", torch.full((B,), -1.0, device=device))
        self.register_buffer("soft_lcs", torch.zeros(B, device=device))
        self.register_buffer("seconds", torch.zeros(B, dtype=torch.float64, device=device))
        # Work spent outside a swap search (relaxed steps, samples, a start beam): prompts scored by a
        # forward, and gradient passes (one per differentiated prompt).
        self.register_buffer("forwards", torch.zeros(B, dtype=torch.long, device=device))
        self.register_buffer("gradients", torch.zeros(B, dtype=torch.long, device=device))
        self._started = time.perf_counter()

    # ----- basics -------------------------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        return self._embeddings.device

    @property
    def batch_size(self) -> int:
        return self.target_ids.shape[0]

    def active(self) -> torch.Tensor:
        """Indices of targets still running (not matched, steps and seconds left)."""
        running = ~self.done & (self.steps < self.config.num_steps)
        if self.config.max_seconds is not None:
            running &= self.seconds < self.config.max_seconds
        return torch.nonzero(running).flatten()

    @property
    def finished(self) -> bool:
        return len(self.active()) == 0

    @property
    def check_due(self) -> bool:
        """Whether the honest check runs after this step: every `check_every` steps, and when the
        batch has stopped (out of steps or seconds), so every result is a checked one."""
        steps = int(self.steps.max())
        return steps % self.config.check_every == 0 or steps >= self.config.num_steps or self.finished

    def work(self) -> tuple[torch.Tensor, torch.Tensor]:
        """([B] forwards, [B] gradient passes) each target has spent: prompts scored by a forward, and
        forward-and-backward passes (its swap search's and the rest)."""
        searches = getattr(self, "searches", None)
        if not searches:
            return self.forwards.clone(), self.gradients.clone()
        return (self.forwards + torch.stack([s.forwards for s in searches]),
                self.gradients + torch.stack([s.gradients for s in searches]))

    def evaluations(self, gradient_cost: int = 3) -> torch.Tensor:
        """[B] candidate evaluations each target has spent: forwards, plus `gradient_cost` per gradient pass
        (a forward and backward cost 2.1-2.3 forwards for SmolLM2 on a CPU; the budget benchmark measures it)."""
        forwards, gradients = self.work()
        return forwards + gradient_cost * gradients

    def target(self, b: int) -> torch.Tensor:
        return self.target_ids[b, : self.lengths[b]]

    def discrete_prompts(self) -> torch.Tensor:
        """[B, N] the prompt each target would return now."""
        raise NotImplementedError

    def step(self) -> StepStats:
        """One optimisation step for every running target."""
        raise NotImplementedError

    def _stats(self, phase: str) -> StepStats:
        B = self.batch_size
        nan = torch.full((B,), math.nan, device=self.device)
        return StepStats(nan, nan.clone(), self.soft_lcs.clone(), phase)

    def _finish_step(self, idx: torch.Tensor) -> None:
        """Count the step; candidates are exact checks, so a flagged match is confirmed by greedy decoding now."""
        if self.exact_due.any():
            self.check(only=self.exact_due.clone())
            self.exact_due[:] = False
        self.steps[idx] += 1
        self.seconds[idx] = time.perf_counter() - self._started

    # ----- model pieces -------------------------------------------------------------------------
    @property
    def _embeddings(self) -> torch.Tensor:
        return self.loaded.model.get_input_embeddings().weight

    def _autocast(self):
        dtype = resolve_dtype(self.config.compute_dtype, self._embeddings.device)
        return torch.autocast(self._embeddings.device.type, dtype=dtype, enabled=dtype != torch.float32)

    def _target_logits(self, prompt_emb: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        """Teacher-forced logits [R, M, V] for prompt embeddings [R, N, d] and target rows [R]."""
        return self.scorer.logits(prompt_emb, self.target_ids[rows])

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

    # ----- discrete search pieces ---------------------------------------------------------------
    def _allowed_tokens(self) -> torch.Tensor:
        """[B, V] bool: the tokens each target's swap search may use."""
        c, tok, V = self.config, self.loaded.tokenizer, self.loaded.vocab_size
        base = allowed_tokens(tok, V, c.allow_non_ascii).clone()
        special = [i for i in (getattr(tok, "all_special_ids", None) or []) if 0 <= i < V]
        base[special] = False
        if int(base.sum()) < 2:
            raise InversionError("fewer than 2 tokens are allowed in swaps: set allow_non_ascii to true")
        rows = []
        for b, n in enumerate(self.lengths):
            row = base.clone()
            if c.forbid_target_tokens:
                row &= ~forbidden_for_target(tok, V, self.target_ids[b, :n].tolist())
            rows.append(row)
        return torch.stack(rows).to(self.device)

    def _random_prompt(self, b: int) -> torch.Tensor:
        """Random allowed tokens for target b, drawn from its generator, within the copy limit (and
        re-encoding to the same ids under `filter_ids`)."""
        return draw_prompt(self.allowed[b], self.config.prompt_length, self.generators[b],
                           lambda prompt: self._copies(b, prompt) or not self._round_trips(prompt))

    def _round_trips(self, prompt: list[int]) -> bool:
        return round_trips(self.loaded.tokenizer, self.config, prompt)

    def _copies(self, b: int, prompt: list[int]) -> bool:
        """Whether `prompt` shares more of target b than the copy limit allows."""
        target = self.target(b).tolist()
        return lcs_length(prompt, target) > self.config.copy_limit * len(target)

    def _swap_search(self, b: int, prompt: torch.Tensor, options: search.SwapOptions,
                     seeds: torch.Tensor | None = None) -> search.SwapSearch:
        return search.SwapSearch(self.scorer, self.target(b), self.allowed[b], prompt, options,
                                 self.generators[b], self.loaded.tokenizer, seeds,
                                 functools.partial(self._random_prompt, b))

    # ----- honest check -------------------------------------------------------------------------
    @torch.no_grad()
    def check(self, only: torch.Tensor | None = None) -> list[DlmiResult]:
        """Greedy-decode from each running target's discrete prompt (or only those in the [B] mask
        `only`); keep the best; stop exact matches."""
        check_batches([self], [only])
        return [self.result(b) for b in range(self.batch_size)]

    @torch.no_grad()
    def due_prompts(self, only: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(rows [R], prompts [R, N]) the honest check decodes: running targets (or those in the mask
        `only`) whose discrete prompt it has not decoded yet (the same prompt decodes the same way)."""
        prompts = self.discrete_prompts()
        todo = ~self.done & (prompts != self.checked).any(1)
        idx = torch.nonzero(todo if only is None else todo & only).flatten()
        self.checked[idx] = prompts[idx]
        return idx, prompts[idx]

    @torch.no_grad()
    def decode(self, prompts: torch.Tensor, num_tokens: int) -> torch.Tensor:
        """[R, num_tokens] greedy continuations of prompts [R, N] (in their context)."""
        # The honest check decodes in the model's own dtype, also under a trainer's mixed precision.
        with model_dtype_region(self._embeddings.device):
            return self.scorer.greedy(prompts, num_tokens)

    @torch.no_grad()
    def take_outputs(self, idx: torch.Tensor, prompts: torch.Tensor, outputs: torch.Tensor) -> None:
        """Score the decoded `outputs` [R, >= M] of `prompts` for rows `idx`: keep the best, stop exact matches."""
        outputs = outputs[:, : self.target_ids.shape[1]]
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

    def result(self, b: int) -> DlmiResult:
        n, tok = self.lengths[b], self.loaded.tokenizer
        prompt, output = self.best_prompt[b].tolist(), self.best_output[b, :n].tolist()
        target = self.target_ids[b, :n].tolist()
        return DlmiResult(target_ids=target, prompt_ids=prompt, prompt_text=decode(tok, prompt),
                          output_ids=output, output_text=decode(tok, output), exact_match=output == target,
                          lcs_ratio=max(0.0, float(self.best_lcs[b])), soft_lcs_ratio=float(self.soft_lcs[b]),
                          steps=int(self.steps[b]), seconds=float(self.seconds[b]),
                          prompt_target_lcs=lcs_ratio(prompt, target), input_ids=self.context.input_ids(prompt))

    @torch.no_grad()
    def final_result(self, b: int) -> DlmiResult:
        """Target b's record: its best prompt, judged by the verdict (`PromptScorer.verdict`: what plain
        transformers' greedy decoding of `input_ids` gives)."""
        result = self.result(b)
        with model_dtype_region(self._embeddings.device):
            output = self.scorer.verdict(self.best_prompt[b], len(result.target_ids))
        result.output_ids, result.output_text = output, decode(self.loaded.tokenizer, output)
        result.exact_match = output == result.target_ids
        result.lcs_ratio = lcs_ratio(output, result.target_ids)
        return result

    # ----- checkpointing ------------------------------------------------------------------------
    # Extra state travels with nn.Module.state_dict(), also when this batch is a submodule, so a
    # checkpoint resumes the noise and (for methods with one) the optimizer exactly.
    optimizer: torch.optim.Optimizer | None = None

    def get_extra_state(self) -> dict:
        state = {"generators": [g.get_state() for g in self.generators], "generator_device": self.device.type}
        if self.optimizer is not None:  # a deep copy: the optimizer updates its moment tensors in place
            state["optimizer"] = copy.deepcopy(self.optimizer.state_dict())
        return state

    def set_extra_state(self, state: dict) -> None:
        if self.optimizer is not None:
            self.optimizer.load_state_dict(state["optimizer"])
        for g, saved in zip(self.generators, state["generators"]):
            restore_generator(g, saved, state.get("generator_device", "cpu"))
        self._started = time.perf_counter() - float(self.seconds.max())  # buffers are loaded first


def round_trips(tokenizer, config, prompt: list[int]) -> bool:
    """Whether `prompt` comes back as the same ids after decode -> encode (always, when the method's
    config has no `filter_ids` or it is off)."""
    return not getattr(config, "filter_ids", False) or vocab.round_trips(tokenizer, prompt)


def draw_prompt(allowed: torch.Tensor, length: int, generator: torch.Generator,
                copies: Callable[[list[int]], bool], tries: int = 100) -> torch.Tensor:
    """`length` random tokens of the [V] mask `allowed`, drawn from `generator` (on the mask's device),
    re-drawn up to `tries` times while `copies(prompt)` rejects it (it copies a target, or does not re-encode)."""
    choices = torch.nonzero(allowed).flatten()
    for _ in range(tries):
        prompt = choices[torch.randint(len(choices), (length,), generator=generator, device=allowed.device)]
        if not copies(prompt.tolist()):
            break
    return prompt


def restore_generator(generator: torch.Generator, saved: torch.Tensor, saved_on: str) -> None:
    """Restore a generator state saved on `saved_on` ("cpu", "cuda"). CPU and CUDA generators have
    different state formats, so a run resumed on the other kind of device continues from a seed derived
    from the saved state: deterministic for that checkpoint, but not the stream the first device drew."""
    if saved_on == generator.device.type:
        generator.set_state(saved)
        return
    digest = hashlib.sha256(saved.cpu().numpy().tobytes()).digest()
    generator.manual_seed(int.from_bytes(digest[:8], "little") & ((1 << 63) - 1))


def check_batches(batches: Sequence[TargetBatch], only: Sequence[torch.Tensor | None] | None = None) -> None:
    """The honest checks of several batches (a pool's slots) in one batched greedy decode (one decode
    costs about as much as a few on a CPU: it is bound by reading the weights); each batch then scores
    its own rows. `only[i]`, if given, masks the rows of batch i to check."""
    masks = list(only) if only is not None else [None] * len(batches)
    due = [(batch, *batch.due_prompts(mask)) for batch, mask in zip(batches, masks)]
    due = [(batch, idx, prompts) for batch, idx, prompts in due if len(idx)]
    if not due:
        return
    longest = max(batch.target_ids.shape[1] for batch, _, _ in due)
    outputs = due[0][0].decode(torch.cat([prompts for _, _, prompts in due]), longest)
    start = 0
    for batch, idx, prompts in due:
        batch.take_outputs(idx, prompts, outputs[start : start + len(idx)])
        start += len(idx)
