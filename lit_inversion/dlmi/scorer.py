"""The one forward of output inversion: `before + prompt + after + target -> logits`.

Every method (the relaxed phase, GBDA's free-running pass, REINFORCE, GCG and the swap search, the
BEAST start beam) and the honest check go through `PromptScorer`, so they all see the same ids.

The `before` ids (BOS, a system prompt, the chat turns before the span) are the same for every
candidate: their keys and values are computed once per target (`cache_context`) and every
optimisation forward starts from them. Candidates that agree on the prompt before position p also
share the gradient forward's cache up to p (`share_prefix`). The honest check decodes greedily from
`input_ids`; `verdict` is the final one: unpadded, uncached, batch of one, as plain transformers does.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator, Sequence

import torch
from torch import nn

from lit_inversion.dlmi.context import Context

try:  # the cache class that lets forwards share the keys and values of what comes before
    from transformers import DynamicCache
except ImportError:  # pragma: no cover - older transformers: full forwards
    DynamicCache = None

Layers = list[tuple[torch.Tensor, torch.Tensor]]


def _layers(cache) -> Layers | None:
    """Detached per-layer (keys, values) of a DynamicCache (None for another cache layout)."""
    if cache is None or DynamicCache is None or not isinstance(cache, DynamicCache):
        return None
    return [(layer.keys.detach(), layer.values.detach()) for layer in cache.layers]


@torch.no_grad()
def continue_ids(model: nn.Module, input_ids: torch.Tensor, num_tokens: int,
                 pick: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """[B, num_tokens] continuation of `input_ids`, each next token `pick(logits [B, V]) -> [B]`, with a
    KV cache (no early stop at EOS)."""
    # Vocabulary logits only at the last prompt position: the others are never read (at |V| = 262k the
    # head over the whole prompt costs as much as the rest of the prefill).
    out = model(input_ids=input_ids, use_cache=True, logits_to_keep=1)
    tokens = [pick(out.logits[:, -1])]
    for _ in range(num_tokens - 1):
        out = model(input_ids=tokens[-1][:, None], past_key_values=out.past_key_values, use_cache=True)
        tokens.append(pick(out.logits[:, -1]))
    return torch.stack(tokens, 1)


def greedy_decode(model: nn.Module, input_ids: torch.Tensor, num_tokens: int) -> torch.Tensor:
    """[B, num_tokens] greedy continuation (no sampling, no early stop at EOS), with a KV cache."""
    return continue_ids(model, input_ids, num_tokens, lambda logits: logits.argmax(-1))


class PromptScorer:
    """Forwards of `before + prompt + after + target[:w-1]` that return logits at the w target positions."""

    def __init__(self, model: nn.Module, context: Context | Sequence[int], share_prefix: bool = True,
                 cache_context: bool = True):
        self.model = model
        self.context = context if isinstance(context, Context) else Context(tuple(int(i) for i in context))
        self.before, self.after = list(self.context.before), list(self.context.after)
        self.base, self.head = model.base_model, model.get_output_embeddings()
        self.E = model.get_input_embeddings().weight
        # The context's ids on the model's device, made once (every forward uses them).
        self.before_ids, self.after_ids = self._ids(self.before), self._ids(self.after)
        self.share_prefix = share_prefix and DynamicCache is not None
        self.cache_context = cache_context and DynamicCache is not None
        self._before_layers: dict[object, Layers | None] = {}  # by autocast dtype
        self.model_seconds = 0.0  # wall time inside the optimisation's model calls (forwards, backwards)

    @contextlib.contextmanager
    def timed(self) -> Iterator[None]:
        """Count the block's wall time in `model_seconds` (a step's model share, read by the benchmarks)."""
        start = time.perf_counter()
        try:
            yield
        finally:
            self.model_seconds += time.perf_counter() - start

    @property
    def device(self) -> torch.device:
        return self.E.device

    def _ids(self, ids: Sequence[int]) -> torch.Tensor:
        return torch.tensor(list(ids), dtype=torch.long, device=self.device)

    def input_ids(self, prompts: torch.Tensor) -> torch.Tensor:
        """[R, len(before) + N + len(after)]: what the model sees before the target, for prompts [R, N]."""
        R = prompts.shape[0]
        return torch.cat([self.before_ids.expand(R, -1), prompts, self.after_ids.expand(R, -1)], 1)

    # ----- forwards ---------------------------------------------------------------------------
    def _before_cache(self) -> Layers | None:
        """The `before` ids' keys and values, computed once per autocast dtype (None: not cached)."""
        if not self.cache_context or not self.before:
            return None
        device = self.device.type
        key = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else None
        if key not in self._before_layers:
            with torch.no_grad():
                out = self.base(input_ids=self.before_ids[None], use_cache=True)
            self._before_layers[key] = _layers(out.past_key_values)
        return self._before_layers[key]

    def _run(self, x: torch.Tensor, use_cache: bool = False, past: Layers | None = None,
             past_length: int | None = None):
        """The backbone over embeddings x [R, L, d] after `past_length` cached positions of `past` (default:
        after the `before` ids, cached or run in front of x). Returns (hidden [R, L, d], cache or None)."""
        R, L = x.shape[:2]
        with self.timed():
            if past is None:
                past = self._before_cache()
                past_length = len(self.before)
                if past is None and self.before:
                    x = torch.cat([self.E[self.before_ids].expand(R, -1, -1).to(x.dtype), x], 1)
            if past is not None and past_length:
                cache = DynamicCache([(k[:, :, :past_length].expand(R, -1, -1, -1),
                                       v[:, :, :past_length].expand(R, -1, -1, -1)) for k, v in past],
                                     config=self.model.config)
                out = self.base(inputs_embeds=x, past_key_values=cache, use_cache=True)
            else:
                out = self.base(inputs_embeds=x, use_cache=use_cache)
        return out.last_hidden_state[:, -L:], (out.past_key_values if use_cache else None)

    def _logits(self, hidden: torch.Tensor, w: int) -> torch.Tensor:
        # Only the w target positions need vocabulary logits; contiguous first: on CPU a strided input
        # makes the head's matmul ~9x slower (measured).
        return self.head(hidden[:, -w:].contiguous())

    def _tail(self, R: int, targets: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """Embeddings [R, len(after) + w - 1, d] of the after ids and the teacher-forced targets [R or 1, w]."""
        after = self.E[self.after_ids].expand(R, -1, -1)
        return torch.cat([after, self.E[targets[:, :-1]].expand(R, -1, -1)], 1).to(dtype)

    def logits(self, prompt_emb: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Teacher-forced logits [R, w, V] for prompt embeddings [R, N, d] and targets [R, w]."""
        R = prompt_emb.shape[0]
        hidden, _ = self._run(torch.cat([prompt_emb, self._tail(R, targets, prompt_emb.dtype)], 1))
        return self._logits(hidden, targets.shape[1])

    def with_gradient(self, prompt: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, Layers | None]:
        """(logits [1, w, V], prompt embeddings [1, N, d] with grad, detached cache) for one prompt [N]."""
        emb = self.E[prompt[None]].detach().requires_grad_(True)
        hidden, cache = self._run(torch.cat([emb, self._tail(1, target[None], emb.dtype)], 1), self.share_prefix)
        return self._logits(hidden, target.shape[0]), emb, _layers(cache) if self.share_prefix else None

    @torch.no_grad()
    def candidates(self, prompt: torch.Tensor, position: int, tokens: torch.Tensor, target: torch.Tensor,
                   cache) -> torch.Tensor:
        """Logits [K, w, V] of the prompts that put each of `tokens` [K] at `position` of `prompt` [N]."""
        prompts = prompt.repeat(tokens.shape[0], 1)
        prompts[:, position] = tokens
        return self.prompts(prompts, position, target, cache)

    @torch.no_grad()
    def prompts(self, prompts: torch.Tensor, first: int, target: torch.Tensor, cache) -> torch.Tensor:
        """Logits [K, w, V] of prompts [K, N] that all agree with the cached prompt before `first`."""
        K, w = prompts.shape[0], target.shape[0]
        tail = self._tail(K, target[None], self.E.dtype)
        if cache is not None and len(self.before) + first > 0:
            x = torch.cat([self.E[prompts[:, first:]], tail], 1)
            hidden, _ = self._run(x, past=cache, past_length=len(self.before) + first)
        else:
            hidden, _ = self._run(torch.cat([self.E[prompts], tail], 1))
        return self._logits(hidden, w)

    def free_running_logits(self, prompt_emb: torch.Tensor, num_tokens: int) -> torch.Tensor:
        """GBDA-style logits [R, num_tokens, V]: the model's own soft predictions fed back, one position at a time."""
        R = prompt_emb.shape[0]
        after = self.E[self.after_ids].expand(R, -1, -1).to(prompt_emb.dtype)
        hidden, cache = self._run(torch.cat([prompt_emb, after], 1), use_cache=True)
        logits = [self._logits(hidden, 1)]
        E = self.E.to(prompt_emb.dtype)
        for _ in range(num_tokens - 1):
            soft = torch.softmax(logits[-1].float(), -1).to(prompt_emb.dtype) @ E
            out = self.base(inputs_embeds=soft, past_key_values=cache, use_cache=True)
            cache = out.past_key_values
            logits.append(self._logits(out.last_hidden_state, 1))
        return torch.cat(logits, 1)

    @torch.no_grad()
    def next_token_logits(self, prompts: torch.Tensor) -> torch.Tensor:
        """[R, V] logits of the token after `before + prompts` for partial prompts [R, p], p >= 1."""
        hidden, _ = self._run(self.E[prompts])
        return self._logits(hidden, 1)[:, 0]

    @torch.no_grad()
    def log_prior(self, prompt: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """[P, V] the model's log-probabilities for the token at each of `positions` of prompt [N], given
        `before` and the prompt before it (uniform at position 0 without context): the LM prior of
        fluency-guided swaps. One uncached forward: the context's last state is not in its cache."""
        ids = self.input_ids(prompt[None])[:, : len(self.before) + prompt.shape[0]]
        with self.timed():
            hidden = self.base(input_ids=ids).last_hidden_state[0]  # [B + N, d]
        rows = positions + len(self.before) - 1  # the state each token is predicted from
        logp = torch.log_softmax(self.head(hidden[rows.clamp(min=0)].contiguous()).float(), -1)
        return torch.where((rows >= 0)[:, None], logp, torch.zeros_like(logp))

    # ----- the honest check -------------------------------------------------------------------
    @torch.no_grad()
    def greedy(self, prompts: torch.Tensor, num_tokens: int) -> torch.Tensor:
        """[R, num_tokens] greedy continuations of `input_ids` for prompts [R, N] (batched, KV cached)."""
        return greedy_decode(self.model, self.input_ids(prompts), num_tokens)

    @torch.no_grad()
    def verdict(self, prompt: torch.Tensor, num_tokens: int) -> list[int]:
        """The final check of one prompt [N]: greedy decoding of its `input_ids`, batch of one, no padding,
        no cache (every token from a full forward), as plain transformers would compute it."""
        ids = self.input_ids(prompt[None])
        out: list[int] = []
        for _ in range(num_tokens):
            token = self.model(input_ids=ids, use_cache=False, logits_to_keep=1).logits[0, -1].argmax()
            out.append(int(token))
            ids = torch.cat([ids, token.view(1, 1)], 1)
        return out
