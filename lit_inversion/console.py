"""What a run prints: results, progress and a summary; library chatter only with `--verbose`.

`quiet()` silences, at their source, the messages a normal run triggers but that say nothing about
inversion (each one is listed with why it is harmless here). `InversionProgressBar` is Lightning's
own tqdm bar, told what one step is (a target, or an optimisation step) and given an inner bar for
work inside one step (SIP-It's positions).
"""

from __future__ import annotations

import logging
import sys
import warnings

from lightning.pytorch.callbacks import TQDMProgressBar

# Messages a normal run triggers that need no action from the user.
_HARMLESS_WARNINGS = (
    # SIP-It steps no optimiser (it searches tokens); DLMI owns per-target optimisers.
    r".*configure_optimizers. returned .None.",
    # Our datasets are iterable so that Lightning injects no distributed sampler (see distributed.py);
    # their length is exact because they are never split across workers.
    r"Your .IterableDataset. has .__len__. defined",
    # DLMI's step pulls its targets (training_step(dataloader_iter)): Lightning marks that API experimental,
    # and says hooks' batch_idx then counts fetched items (no hook of ours reads it).
    r"Found .dataloader_iter. argument in the .training_step.",
    r"You are using the .dataloader_iter. step flavor",
    # Emitted inside Lightning on this torch version; nothing in our code uses LeafSpec.
    r".*isinstance\(treespec, LeafSpec\). is deprecated",
    # A rerun with every target already done: we print our own line saying so.
    r"Total length of .* across ranks is zero",
    # Our iterable datasets already hold the targets in memory: workers would only add start-up time.
    r"The '.*dataloader' does not have many workers",
)


def quiet(verbose: bool = False) -> None:
    """Keep a run's console to results, progress and the summary (`verbose` shows everything)."""
    if verbose:
        return
    for pattern in _HARMLESS_WARNINGS:
        warnings.filterwarnings("ignore", message=pattern)
    # Lightning's info lines ("GPU available", tips, "Seed set") and transformers' load bars.
    for name in ("lightning.pytorch", "lightning.fabric", "lightning_fabric", "pytorch_lightning"):
        logging.getLogger(name).setLevel(logging.WARNING)
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
    except ImportError:  # pragma: no cover - transformers is a dependency
        pass


def steps_this_epoch(trainer) -> int:
    """Training steps run so far this epoch, the current one included (hooks' batch_idx counts fetched
    items instead, which differ for a step that pulls its own data)."""
    return trainer.fit_loop.epoch_loop.batch_progress.current.processed


class _NoBar:
    """Stands in for the inner bar when progress bars are off."""

    def update(self, n: int = 1) -> None:
        pass

    def set_postfix(self, **kwargs) -> None:
        pass

    def close(self) -> None:
        pass


class InversionProgressBar(TQDMProgressBar):
    """Lightning's tqdm bar, labelled with what a step is, plus an inner bar for long steps."""

    def __init__(self, unit: str = "steps", refresh_rate: int = 1):
        super().__init__(refresh_rate=refresh_rate)
        self.unit = unit

    def on_train_epoch_start(self, trainer, *args) -> None:
        super().on_train_epoch_start(trainer, *args)
        self.train_progress_bar.set_description(self.unit)
        self.train_progress_bar.unit = self.unit.split()[-1]

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        # Count steps, not fetched items: DLMI's step pulls all its targets at the first step.
        super().on_train_batch_end(trainer, pl_module, outputs, batch, steps_this_epoch(trainer) - 1)

    @property
    def total_train_batches(self) -> int | float:
        # A job that pulls its own targets (DLMI's pool) knows its step bound; Lightning sees an unsized loader.
        total = getattr(self.trainer.lightning_module, "progress_total", lambda: None)()
        return super().total_train_batches if total is None else total

    def get_metrics(self, trainer, pl_module) -> dict:
        metrics = super().get_metrics(trainer, pl_module)
        metrics.pop("v_num", None)  # the logger's version folder says nothing about progress
        # Counts are logged as floats: show them as the whole numbers they are.
        return {k: int(v) if isinstance(v, float) and v.is_integer() and k in ("targets", "exact") else v
                for k, v in metrics.items()}

    def inner(self, total: int, description: str):
        """A bar under the main one for work inside one step; closed by the caller."""
        if self.is_disabled:
            return _NoBar()
        from tqdm.auto import tqdm

        return tqdm(total=total, desc=description, position=1, leave=False, dynamic_ncols=True,
                    file=sys.stdout, smoothing=0)


def inner_progress(module, total: int, description: str):
    """The trainer's inner bar if it has our progress bar, else a silent stand-in."""
    trainer = getattr(module, "_trainer", None)
    bar = getattr(trainer, "progress_bar_callback", None) if trainer is not None else None
    return bar.inner(total, description) if isinstance(bar, InversionProgressBar) else _NoBar()


def say(line: str) -> None:
    """Print a result line above any open progress bars (a plain print would land inside a bar's line)."""
    from tqdm.auto import tqdm

    tqdm.write(line, file=sys.stdout)
    sys.stdout.flush()
