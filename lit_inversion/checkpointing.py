"""Kill-safe `last.ckpt`, written every few training steps and at the end of the epoch.

Lightning's ModelCheckpoint keys on `global_step`, which never moves for SIP-It (it steps no
optimiser), so this subclass saves on batch end instead, every `every_n_batches` training steps
(unset: the job's own `checkpoint_interval`, e.g. DLMI's `checkpoint_every`; else every step). It writes to a temporary file and renames
it, so a kill never leaves a truncated checkpoint. `--ckpt_path last` finds it as usual.
"""

from __future__ import annotations

import os

import lightning as L
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.utilities.exceptions import SIGTERMException

from lit_inversion.console import steps_this_epoch


class LastCheckpoint(ModelCheckpoint):
    def __init__(self, dirpath: str = "runs/checkpoints", every_n_batches: int | None = None):
        super().__init__(dirpath=dirpath, save_last=True, save_top_k=0, enable_version_counter=False)
        self.every_n_batches = every_n_batches

    def save_now(self, trainer: L.Trainer) -> None:
        path = os.path.join(self.dirpath, self.CHECKPOINT_NAME_LAST + self.FILE_EXTENSION)
        tmp = path + ".tmp"
        # Rank 0 writes the file (IndependentRanks skips the save's barrier: SIP-It's ranks save at
        # different times); a job whose state lives on every rank gathers it in on_save_checkpoint
        # (DLMI, whose ranks run in step); other ranks' finished targets are in their results files.
        trainer.save_checkpoint(tmp)
        if trainer.is_global_zero:
            os.replace(tmp, path)
        self.last_model_path = path

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        every = self.every_n_batches or getattr(pl_module, "checkpoint_interval", 1)
        if steps_this_epoch(trainer) % every == 0:
            self.save_now(trainer)

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        self.save_now(trainer)

    def on_exception(self, trainer, pl_module, exception: BaseException) -> None:
        # SIGTERM (a scheduler's preemption, `kill`): the step in progress was finished or abandoned, so the
        # state is whole; save it for `--ckpt_path last`. Other errors keep the last periodic save.
        if isinstance(exception, SIGTERMException):
            self.save_now(trainer)

    def on_validation_end(self, trainer, pl_module) -> None:
        pass
