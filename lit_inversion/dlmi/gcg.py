"""GCG baseline: greedy coordinate gradient over a discrete prompt (Zou et al., 2023), as nanoGCG runs it.

GCG is the package's one swap search (`search.SwapSearch`) with nanoGCG's options: per step and
target, the gradient of the teacher-forced mean cross-entropy with respect to the prompt's one-hot
rows ranks every token swap at every position; `search_width` candidates each swap `n_replace`
positions to random tokens of their position's top-`topk` (with `n_replace = 1` the candidates are
spread evenly over the positions, so those at one position share its cached prefix); the best one
becomes the prompt, even if worse (nanoGCG without a buffer). A candidate whose teacher-forced argmax
is the whole target wins outright, and the batch confirms it by greedy decoding at once (nanoGCG's
early stop). The result is the best prompt any check saw.

nanoGCG's extras: special and non-printable / non-ASCII tokens are never swapped in
(`allow_non_ascii=False`), candidates that do not survive a decode -> encode round trip are dropped
(`filter_ids`), and the scoring batch halves and retries on out-of-memory (`batch_size`).
"""

from __future__ import annotations

import torch
from torch import nn

from lit_inversion.dlmi import search
from lit_inversion.dlmi.batch import StepStats, TargetBatch
from lit_inversion.dlmi.vocab import retokenization_mask
from lit_inversion.errors import InversionError
from lit_inversion.metrics import lcs_ratio
from lit_inversion.tokens import encode


class GcgBatch(TargetBatch):
    phase = "gcg"

    def __init__(self, loaded, targets, config, keys=None, context=None):
        super().__init__(loaded, targets, config, keys, context)
        options = config.swap_options()
        start = self._start_prompts()
        self.best_prompt.copy_(start)
        self.searches = nn.ModuleList([self._swap_search(b, start[b], options) for b in range(self.batch_size)])

    @property
    def scoring_batch_size(self) -> int | None:
        """Candidates per scoring forward now (after any out-of-memory halving); None: a whole group."""
        return self.searches[0].chunk if len(self.searches) else None

    @property
    def current(self) -> torch.Tensor:
        return torch.stack([s.prompt for s in self.searches])

    def discrete_prompts(self) -> torch.Tensor:
        return self.current

    def _start_prompts(self) -> torch.Tensor:
        """[B, N]: the fill token repeated, or random allowed tokens that round-trip."""
        c, tok = self.config, self.loaded.tokenizer
        B, N = self.batch_size, c.prompt_length
        if c.fill_token is not None:
            ids = encode(tok, c.fill_token)
            if len(ids) != 1:
                raise InversionError(f"fill_token {c.fill_token!r} is {len(ids)} tokens for this tokenizer: "
                                     "give a one-token string (nanoGCG uses 'x', GCG '!'), or null for a random start")
            return torch.full((B, N), ids[0], dtype=torch.long, device=self.device)
        return torch.stack([self._round_trip_prompt(b) for b in range(B)])

    def _round_trip_prompt(self, b: int, tries: int = 16) -> torch.Tensor:
        """Random allowed tokens, each re-drawn (a few times) until the prompt so far round-trips."""
        choices = torch.nonzero(self.allowed[b]).flatten()
        generator = self.generators[b]
        prompt: list[int] = []
        for _ in range(self.config.prompt_length):
            for _ in range(tries):
                token = int(choices[torch.randint(len(choices), (1,), generator=generator, device=generator.device)])
                if not self.config.filter_ids or bool(retokenization_mask(
                        self.loaded.tokenizer, torch.tensor([prompt + [token]], device="cpu"))[0]):
                    break
            prompt.append(token)
        return torch.tensor(prompt, device=self.device)

    def step(self) -> StepStats:
        """One GCG step for every running target, one target after another (see DlmiBatch._refine_step)."""
        idx = self.active()
        stats = self._stats(self.phase)
        with self._autocast():
            for b in idx.tolist():
                out = self.searches[b].step(self.checked[b])
                stats.loss[b] = out.key
                self.soft_lcs[b] = lcs_ratio(out.pred.tolist(), self.target(b).tolist())
                self.exact_due[b] = out.exact_due
        self._finish_step(idx)
        stats.soft_lcs = self.soft_lcs.clone()
        return stats
