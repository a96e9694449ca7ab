"""Targets for DLMI: target continuations (token ids), from a file or the paper's difficulty-k protocol."""

from __future__ import annotations

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


def _one_batch(items: list[list[OutputTarget] | None]) -> list[OutputTarget]:
    return items[0] or []  # None: a padding slot of a shard


class OutputTargetsDataModule(L.LightningDataModule):
    """Yields batches of `OutputTarget`s; a batch is optimised together in one forward per step.

    The order and batching are fixed, so an interrupted batch comes back whole on resume; targets
    already in the results file are skipped by the module, not here.
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
            raise InversionError(f"batch_size must be at least 1 (got {batch_size})")
        if limit is not None and limit < 1:
            raise InversionError(f"--data.limit must be at least 1, or null for all targets (got {limit})")
        self.batches: list[list[OutputTarget] | None] = []

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
        module.announce_targets(len(targets), sum(t.id not in done for t in targets))
        batch = self.hparams.batch_size
        # Whole batches go to each process, so a batch never straddles two ranks.
        batches = [targets[i:i + batch] for i in range(0, len(targets), batch)]
        self.batches = shard(batches, self.trainer.global_rank, self.trainer.world_size)

    def train_dataloader(self) -> DataLoader:
        return DataLoader(ListDataset(self.batches), batch_size=1, shuffle=False, collate_fn=_one_batch)
