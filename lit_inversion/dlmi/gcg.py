"""GCG baseline: greedy coordinate gradient over a discrete prompt (Zou et al., 2023), as nanoGCG runs it.

Per step and target: the gradient of the teacher-forced mean cross-entropy with respect to the
prompt's one-hot rows ranks every token swap at every position; `search_width` candidates each swap
`n_replace` random positions to random tokens of their position's top-`topk`; the candidates are
scored in batched forwards and the best one becomes the prompt (even if worse, as in nanoGCG
without a buffer). A candidate whose teacher-forced argmax is the whole target wins outright, so
the honest check (every step) stops the target at once. The result is the best prompt any check saw.

nanoGCG's extras: special and non-printable / non-ASCII tokens are never swapped in
(`allow_non_ascii=False`), candidates that do not survive a decode -> encode round trip are dropped
(`filter_ids`), and the scoring batch halves and retries on out-of-memory.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from lit_inversion.dlmi.baselines import BaselineBatch
from lit_inversion.dlmi.vocab import allowed_tokens, retokenization_mask  # noqa: F401 (re-exported)
from lit_inversion.errors import InversionError
from lit_inversion.tokens import encode

def is_out_of_memory(error: BaseException) -> bool:
    if isinstance(error, torch.OutOfMemoryError):
        return True
    message = str(error).lower()  # older or other allocators raise a plain RuntimeError
    return isinstance(error, RuntimeError) and ("out of memory" in message or "can't allocate memory" in message)


def map_with_backoff(fn: Callable[[int, int], object], total: int, batch_size: int) -> tuple[list, int]:
    """[fn(start, end) for consecutive slices of range(total)], halving the slice on out-of-memory
    and retrying the failed slice. Returns the results and the slice size that worked."""
    results, start = [], 0
    while start < total:
        end = min(total, start + batch_size)
        try:
            results.append(fn(start, end))
        except Exception as error:
            if not is_out_of_memory(error):
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


class GcgBatch(BaselineBatch):
    phase = "gcg"

    def __init__(self, loaded, targets, config, keys=None):
        super().__init__(loaded, targets, config, keys)
        allowed = allowed_tokens(loaded.tokenizer, loaded.vocab_size, config.allow_non_ascii)
        if int(allowed.sum()) < 2:
            raise InversionError("fewer than 2 tokens are allowed in GCG swaps: set allow_non_ascii to true")
        self.register_buffer("allowed", allowed.to(self.device), persistent=False)
        self.scoring_batch_size = config.gcg_batch_size  # None: every candidate in one forward
        with self.on_device():
            start = self._start_prompts()
        self.current.copy_(start)
        self.best_prompt.copy_(start)

    def tau(self) -> torch.Tensor:
        return torch.zeros(self.batch_size, self.config.prompt_length)  # discrete: no temperature

    def discrete_prompts(self) -> torch.Tensor:
        return self.current

    def _start_prompts(self) -> torch.Tensor:
        """[B, N]: the fill token repeated, the best repeat prompt (init="repeat"), or random allowed tokens."""
        c, tok = self.config, self.loaded.tokenizer
        B, N = self.batch_size, c.prompt_length
        if c.fill_token is not None:
            ids = encode(tok, c.fill_token)
            if len(ids) != 1:
                raise InversionError(f"fill_token {c.fill_token!r} is {len(ids)} tokens for this tokenizer: "
                                     "give a one-token string (nanoGCG uses 'x', GCG '!'), or null for a random start")
            return torch.full((B, N), ids[0], dtype=torch.long)
        if c.init == "repeat":
            return self.seeds[:, 0].clone()
        return torch.stack([self._random_prompt(g) for g in self.generators])

    def _random_prompt(self, generator: torch.Generator, tries: int = 16) -> torch.Tensor:
        """Random allowed tokens, each re-drawn (a few times) until the prompt so far round-trips."""
        choices = torch.nonzero(self.allowed).flatten()
        prompt: list[int] = []
        for _ in range(self.config.prompt_length):
            for _ in range(tries):
                token = int(choices[torch.randint(len(choices), (1,), generator=generator)])
                if not self.config.filter_ids or bool(retokenization_mask(self.loaded.tokenizer,
                                                                          torch.tensor([prompt + [token]]))[0]):
                    break
            prompt.append(token)
        return torch.tensor(prompt)

    # ----- one step --------------------------------------------------------------------------------
    def _baseline_step(self, idx: torch.Tensor) -> torch.Tensor:
        c = self.config
        A, W = len(idx), c.search_width
        E = self._embeddings
        prompts = self.current[idx]  # [A, N]
        emb = E[prompts].detach().requires_grad_(True)
        with self._autocast():
            logits = self._target_logits(emb, idx)
        loss = self._token_losses(logits, idx)  # [A]
        # d loss / d one-hot = (d loss / d embedding) E^T: the first-order change of every swap.
        (grad,) = torch.autograd.grad(loss.sum(), emb)
        candidates = self._sample_candidates(prompts, -(grad.float() @ E.detach().float().T).cpu(), idx)  # [A, W, N]
        keep = torch.ones(A, W, dtype=torch.bool)
        if c.filter_ids:
            keep = retokenization_mask(self.loaded.tokenizer, candidates.flatten(0, 1)).view(A, W)
        rows = idx[:, None].expand(A, W)[keep]
        cand_loss, cand_pred = self._score(candidates[keep], rows)
        ranked = torch.where(self._matches(cand_pred, rows), cand_loss - 1e6, cand_loss)  # a full match wins
        key = torch.full((A, W), float("inf"))
        key[keep] = ranked
        best = key.argmin(1)
        # A prompt that already matches stays until the next check stops its target (nanoGCG's early
        # stop); one whose candidates were all filtered out stays this step.
        pred = logits.detach().argmax(-1).cpu()
        moved = keep.any(1) & ~self._matches(pred, idx)
        flat = torch.full((A, W), -1, dtype=torch.long)
        flat[keep] = torch.arange(int(keep.sum()))  # where each kept candidate sits in the scored rows
        chosen = flat[torch.arange(A), best][moved]
        self.current[idx] = torch.where(moved[:, None], candidates[torch.arange(A), best], prompts)
        pred[moved] = cand_pred[chosen]
        new_loss = loss.detach().float().cpu()
        new_loss[moved] = cand_loss[chosen]
        self.soft_lcs[idx] = torch.tensor(self._lcs_rows(pred, idx))
        self.current_key[idx] = new_loss
        return new_loss

    def _matches(self, predictions: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        """[R] whether each row's teacher-forced argmax [R, M] is its whole target."""
        return ((predictions == self.target_ids[rows]) | ~self.target_mask[rows]).all(1)

    def _sample_candidates(self, prompts: torch.Tensor, score: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        """[A, W, N]: each candidate swaps `n_replace` random positions to random top-k tokens there."""
        c = self.config
        W, N = c.search_width, c.prompt_length
        score = score.masked_fill(~self.allowed, -torch.inf)
        score.scatter_(-1, prompts[..., None], -torch.inf)  # a swap must change the token
        k = min(c.topk, int(self.allowed.sum()) - 1)  # only allowed, changed tokens among the top k
        top = score.topk(k, -1).indices  # [A, N, k]
        out = []
        for a, b in enumerate(idx.tolist()):
            g = self.generators[b]
            positions = torch.rand(W, N, generator=g).argsort(1)[:, : c.n_replace]  # distinct per candidate
            picks = torch.randint(k, (W, c.n_replace), generator=g)
            candidates = prompts[a].repeat(W, 1)
            candidates.scatter_(1, positions, top[a][positions, picks])
            out.append(candidates)
        return torch.stack(out)

    def _score(self, prompts: torch.Tensor, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(mean cross-entropy [R], teacher-forced argmax [R, M]) of candidate prompts, in back-off batches."""
        if len(prompts) == 0:
            return torch.zeros(0), torch.zeros(0, self.target_ids.shape[1], dtype=torch.long)
        size = self.scoring_batch_size or len(prompts)
        parts, used = map_with_backoff(lambda s, e: self._score_rows(prompts[s:e], rows[s:e]), len(prompts), size)
        if used < size:
            self.scoring_batch_size = used  # later steps start at the size that fitted
        return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])

    def _score_rows(self, prompts: torch.Tensor, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        with torch.no_grad(), self._autocast():
            logits = self._target_logits(self._embeddings[prompts], rows)
            return self._token_losses(logits, rows).float().cpu(), logits.argmax(-1).cpu()
