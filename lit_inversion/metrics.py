"""torchmetrics metrics shared by the inversion jobs (sum states reduce correctly under DDP)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torchmetrics import Metric


def lcs_length(a: Sequence[int], b: Sequence[int]) -> int:
    """Length of the longest common subsequence of two id sequences (one row, updated in place)."""
    row = [0] * (len(b) + 1)
    for x in a:
        prev = 0
        for j, y in enumerate(b):
            cur = row[j + 1]
            row[j + 1] = prev + 1 if x == y else max(row[j + 1], row[j])
            prev = cur
    return row[-1]


def lcs_ratio(prediction: Sequence[int], target: Sequence[int]) -> float:
    """LCS over token ids divided by the target length."""
    return lcs_length(list(prediction), list(target)) / max(1, len(target))


class _MeanOverSequences(Metric):
    full_state_update = False

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        # Made on the CPU; torchmetrics moves states with the module (`.to(device)`).
        self.add_state("total", default=torch.tensor(0.0, dtype=torch.float64, device="cpu"), dist_reduce_fx="sum")
        self.add_state("count", default=torch.tensor(0, dtype=torch.long, device="cpu"), dist_reduce_fx="sum")

    def _score(self, prediction: Sequence[int], target: Sequence[int]) -> float:
        raise NotImplementedError

    def update(self, predictions: Sequence[Sequence[int]], targets: Sequence[Sequence[int]]) -> None:
        for p, t in zip(predictions, targets, strict=True):
            self.total += self._score(list(p), list(t))
            self.count += 1

    def compute(self) -> torch.Tensor:
        return (self.total / self.count.clamp(min=1)).float()

    def local_mean(self) -> float:
        """This process's mean so far, without the cross-process sync of `compute()` (safe per step)."""
        return float(self.total / self.count.clamp(min=1))


class ExactMatch(_MeanOverSequences):
    """Fraction of sequences reproduced exactly."""

    def _score(self, prediction, target):
        return float(list(prediction) == list(target))


class TokenAccuracy(_MeanOverSequences):
    """Mean fraction of positions where the prediction equals the target (same length expected)."""

    def _score(self, prediction, target):
        hits = sum(int(p == t) for p, t in zip(prediction, target))
        return hits / max(1, len(target))


class LCSRatio(_MeanOverSequences):
    """Mean LCS ratio (longest common subsequence over token ids / target length)."""

    def _score(self, prediction, target):
        return lcs_ratio(prediction, target)
