"""Targets for DLMI: target continuations (token ids), from a file or the paper's difficulty-k protocol."""

from __future__ import annotations

import math
from dataclasses import dataclass

import lightning as L
from torch.utils.data import DataLoader

from lit_inversion.errors import InversionError
from lit_inversion.models import LoadedModel
from lit_inversion.distributed import shard
from lit_inversion.sequences import ListDataset, apply_limit, read_sequences


@dataclass
class OutputTarget:
    id: str
    ids: list[int]


def max_pool_steps(targets: int, slots: int, num_steps: int) -> int:
    """An upper bound on the pool steps `targets` targets need in `slots` slots: the k-th target
    starts by pool step floor((k - 1) / slots) * num_steps (the slots' earlier targets, at most
    num_steps each, have ended by then) and runs at most num_steps steps."""
    return math.ceil(targets / slots) * num_steps


class TargetStream(ListDataset):
    """This rank's targets, one at a time, for the module to pull (`training_step(dataloader_iter)`)."""

    def __len__(self) -> int:
        # Unsized on purpose: Lightning ends a sized loader's epoch when its last item is fetched, but the
        # targets then in the pool's slots need more steps; the module ends the epoch when the pool drains.
        raise TypeError("a target stream has no length")


class OutputTargetsDataModule(L.LightningDataModule):
    """Feeds the DLMI job's pool of target slots (continuous batching).

    `batch_size` is the number of slots: targets optimised at once, one optimisation step each per
    training step; a target that matches or runs out of steps leaves its slot to the next one. With
    several processes each rank gets its own shard of the targets still to do (those in the results
    file are skipped).

    Args:
        targets_file: target continuations: `.txt` (one per line) or `.jsonl` (`text` or `ids`, optional `id`).
        difficulty_k: the paper's difficulty-k protocol instead (or as well), e.g. [1, 6, 11].
        per_k: targets per k.
        target_length: tokens per difficulty-k target.
        difficulty_seed: seed of the difficulty-k targets.
        batch_size: target slots optimised at once.
        limit: invert only the first N targets (null: all).
    """

    def __init__(
        self,
        targets_file: str | None = None,
        difficulty_k: list[float] | None = None,
        per_k: int = 5,
        target_length: int = 20,
        difficulty_seed: int = 42,
        batch_size: int = 5,
        limit: int | None = None,
    ):
        super().__init__()
        self.save_hyperparameters()
        if targets_file is None and not difficulty_k:
            raise InversionError("no targets: set --data.targets_file or --data.difficulty_k (e.g. [1, 6, 11])")
        if batch_size < 1:
            raise InversionError(f"batch_size (the number of target slots) must be at least 1 (got {batch_size})")
        if limit is not None and limit < 1:
            raise InversionError(f"--data.limit must be at least 1, or null for all targets (got {limit})")
        self.targets: list[OutputTarget] = []  # this rank's shard, still to do
        self.step_bound = 0  # pool steps the largest shard needs at most (the progress bar's total)

    def build_targets(self, loaded: LoadedModel) -> list[OutputTarget]:
        h = self.hparams
        targets: list[OutputTarget] = []
        if h.targets_file is not None:
            targets += [OutputTarget(i, ids) for i, ids in
                        read_sequences(h.targets_file, loaded.tokenizer, loaded.vocab_size, option="--data.targets_file")]
        if h.difficulty_k:
            from lit_inversion.dlmi.targets import make_difficulty_targets

            made = make_difficulty_targets(loaded, ks=h.difficulty_k, per_k=h.per_k, length=h.target_length, seed=h.difficulty_seed)
            targets += [OutputTarget(str(t["id"]), list(t["ids"])) for t in made]
        return apply_limit(targets, h.limit, loud=self.trainer is None or self.trainer.is_global_zero)

    def setup(self, stage: str) -> None:
        module = self.trainer.lightning_module
        targets = self.build_targets(module.load())
        done = module.finished_ids()
        todo = [t for t in targets if t.id not in done]
        module.announce_targets(len(targets), len(todo))
        rank, world = self.trainer.global_rank, self.trainer.world_size
        self.targets = [t for t in shard(todo, rank, world, size=lambda t: len(t.ids)) if t is not None]
        largest = math.ceil(len(todo) / world)
        self.step_bound = max_pool_steps(largest, self.hparams.batch_size, module.config.num_steps)

    def train_dataloader(self) -> DataLoader:
        return DataLoader(TargetStream(self.targets), batch_size=None)
