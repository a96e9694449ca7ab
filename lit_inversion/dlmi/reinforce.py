"""REINFORCE baseline: the score-function gradient over discrete prompts sampled from softmax(Z).

Per step and target, S = `samples` prompts are drawn from the per-position distributions
softmax(Z) (from the target's own generator); their reward is minus the teacher-forced mean
cross-entropy of the target, all S x targets prompts scored in one forward. The gradient of
-(r - b) * log p(prompt) moves Z, with Adam, where b is an EMA of the mean reward
(b <- 0.9 b + 0.1 r, started at the first step's mean reward so the first advantages are centred).
The answer is argmax Z, the mode of the distribution. No temperature: samples follow softmax(Z).
"""

from __future__ import annotations

import torch
from torch import nn

from lit_inversion.dlmi.batch import StepStats, TargetBatch


def ema_update(baseline: torch.Tensor, reward: torch.Tensor, decay: float) -> torch.Tensor:
    """The EMA reward baseline's update: decay * baseline + (1 - decay) * reward."""
    return decay * baseline + (1.0 - decay) * reward


class ReinforceBatch(TargetBatch):
    phase = "reinforce"

    def __init__(self, loaded, targets, config, keys=None, context=None):
        super().__init__(loaded, targets, config, keys, context)
        N, V, device = config.prompt_length, loaded.vocab_size, self.device
        self.logits = nn.Parameter(torch.stack([torch.randn(N, V, generator=g, device=device) for g in self.generators]))
        self.optimizer = torch.optim.Adam([self.logits], lr=config.learning_rate)
        self.register_buffer("reward_baseline", torch.full((self.batch_size,), float("nan"), device=device))
        self.best_prompt.copy_(self.discrete_prompts())

    def discrete_prompts(self) -> torch.Tensor:
        return self.logits.detach().argmax(-1)

    def step(self) -> StepStats:
        idx = self.active()
        stats = self._stats(self.phase)
        if len(idx):
            stats.loss[idx] = self._reinforce_step(idx).float()
        self._finish_step(idx)
        stats.soft_lcs = self.soft_lcs.clone()
        return stats

    def _reinforce_step(self, idx: torch.Tensor) -> torch.Tensor:
        c = self.config
        A, S, N = len(idx), c.samples, c.prompt_length
        logits = self.logits[idx]  # [A, N, V]
        probs = torch.softmax(logits.detach().float(), -1)
        samples = torch.stack([torch.multinomial(probs[a], S, replacement=True, generator=self.generators[b]).T
                               for a, b in enumerate(idx.tolist())])  # [A, S, N]
        rows = idx.repeat_interleave(S)
        with torch.no_grad(), self._autocast():
            tf_logits = self._target_logits(self._embeddings[samples.flatten(0, 1)], rows)
            ce = self._token_losses(tf_logits, rows).view(A, S)
        self.forwards[idx] += S  # forwards only: the score function needs no backward through the model
        reward = -ce
        mean_reward = reward.mean(1)
        baseline = self.reward_baseline[idx]
        baseline = torch.where(torch.isnan(baseline), mean_reward, baseline)  # NaN: not set yet
        advantage = reward - baseline[:, None]  # [A, S]
        self.reward_baseline[idx] = ema_update(baseline, mean_reward, c.baseline_decay)

        log_probs = torch.log_softmax(logits.float(), -1)
        rows_a, cols = torch.arange(A, device=idx.device)[:, None, None], torch.arange(N, device=idx.device)[None, None, :]
        picked = log_probs[rows_a, cols, samples]  # [A, S, N]
        surrogate = -(advantage * picked.sum(-1)).mean(1)  # [A]; its gradient is the REINFORCE estimate
        self.optimizer.zero_grad(set_to_none=True)
        surrogate.sum().backward()  # a sum keeps each target's gradient independent of the batch
        # Stopped targets keep their Z (their Adam moments may decay).
        frozen = torch.ones(self.batch_size, dtype=torch.bool, device=idx.device)
        frozen[idx] = False
        saved = self.logits.data[frozen].clone()
        self.optimizer.step()
        self.logits.data[frozen] = saved
        self.soft_lcs[idx] = torch.tensor(self._lcs_rows(tf_logits.argmax(-1), rows), device=idx.device).view(A, S).mean(1)
        return ce.mean(1)
