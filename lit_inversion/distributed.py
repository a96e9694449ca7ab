"""Several processes, one job: disjoint target shards, independent ranks, one results file.

Inversion is embarrassingly parallel: each rank owns its targets and their prompt parameters, so
nothing is synchronised during the run. Two of Lightning's data-parallel defaults are wrong here:
DDP would average one rank's prompt gradients with another's (and refuses a module whose only
parameters are created per target), and the distributed sampler pads shards by repeating targets.
So ranks run unwrapped (`IndependentRanks`: DDP's launcher, process group and barriers, no
DistributedDataParallel wrapper), the datasets are iterable (no sampler is injected), and shards are
padded with empty slots instead. Each rank appends to `<results>.rank<r>`; rank 0 merges them at the end.

Ranks meet only at checkpoint barriers and the end of the run, so one rank on a hard target holds the
others there: the process-group timeout is a day (`INVERSION_TIMEOUT`), not torch's 30 minutes, and
shards are balanced by target length.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any, TypeVar

import lightning as L
import torch
from lightning.fabric.utilities.apply_func import apply_to_collection
from lightning.pytorch.strategies import DDPStrategy, StrategyRegistry

from lit_inversion.errors import InversionError
from lit_inversion.results import ResultsWriter, read_results

T = TypeVar("T")


# A rank may spend hours on one hard target while the others wait at a barrier.
INVERSION_TIMEOUT = timedelta(hours=24)


def shard(items: list[T], rank: int, world: int, size: Callable[[T], int] | None = None) -> list[T | None]:
    """This rank's items, padded with None so every rank gets the same count.

    With `size` (an item's cost, e.g. its length), items are dealt longest first, round robin, so
    every rank gets a similar load; the rank keeps them in their original order. Equal counts keep
    ranks in step for the collectives Lightning runs per batch (checkpoint barriers); a None slot is a
    no-op step, never a repeated target.
    """
    order = list(range(len(items)))
    if size is not None:
        order.sort(key=lambda i: -size(items[i]))  # stable: equal sizes keep their order
    mine: list[T | None] = [items[i] for i in sorted(order[rank::world])]
    return mine + [None] * (math.ceil(len(items) / world) - len(mine))


class IndependentRanks(DDPStrategy):
    """DDP's launcher, process group and barriers without its gradient-averaging wrapper: every rank
    inverts its own targets, and their prompt parameters must never be averaged across ranks.

    `--trainer.strategy ddp` (and `auto` on several devices or nodes) selects it in the CLI
    (`use_for_ddp`); in Python pass `strategy="inversion_ddp"` or an instance.
    """

    strategy_name = "inversion_ddp"

    def __init__(self, *args: Any, timeout: timedelta | None = INVERSION_TIMEOUT, **kwargs: Any):
        super().__init__(*args, timeout=timeout, **kwargs)

    def configure_ddp(self) -> None:
        # No DistributedDataParallel: nothing is trained jointly (and DDP rejects a module whose
        # parameters are made per target). Only the device move, done by setup(), is needed.
        pass

    def barrier(self, name: str | None = None) -> None:
        # Ranks save `last.ckpt` whenever their own targets allow (SIP-It's ranks finish targets at
        # different times; rank 0 writes the file): waiting for the others there would stall them all.
        if name == "Trainer.save_checkpoint":
            return
        super().barrier(name)


StrategyRegistry.register(IndependentRanks.strategy_name, IndependentRanks, override=True,
                          description="DDP processes without gradient averaging (lit-inversion)")


def use_for_ddp() -> None:
    """Make Lightning's `ddp*` strategy names (and `auto` on several devices) build IndependentRanks,
    with each name's own launcher settings. For the `lit-inversion` program, not a library import."""
    for name in StrategyRegistry.available_strategies():
        entry = StrategyRegistry[name]
        if name.startswith("ddp") and entry["strategy"] is DDPStrategy:
            StrategyRegistry.register(name, IndependentRanks, description=entry["description"], override=True,
                                      **entry["init_params"])


def check_strategy(trainer: L.Trainer) -> None:
    """Reject Lightning's DDP wrapper before it wraps: it would average prompts across ranks."""
    strategy = trainer.strategy
    if isinstance(strategy, DDPStrategy) and not isinstance(strategy, IndependentRanks):
        raise InversionError(
            f"strategy {type(strategy).__name__} would average prompt gradients across ranks: pass "
            "strategy='inversion_ddp' (or lit_inversion.distributed.IndependentRanks()) to the Trainer")


def merge_across_ranks(states: dict, trainer: L.Trainer) -> dict:
    """Every rank's `states` dict merged into one (tensors on the CPU), on every rank.

    A collective: every rank must call it at the same step (the DLMI job keeps ranks in step).
    """
    states = apply_to_collection(states, torch.Tensor, lambda t: t.detach().cpu())
    if trainer.world_size == 1 or not torch.distributed.is_initialized():
        return states
    parts: list[dict | None] = [None] * trainer.world_size
    torch.distributed.all_gather_object(parts, states)
    return {key: value for part in parts for key, value in (part or {}).items()}


def rank_results_path(path: str | Path, rank: int) -> Path:
    return Path(f"{path}.rank{rank}")


def _rank_files(path: str | Path) -> list[Path]:
    path = Path(path)
    return sorted(path.parent.glob(path.name + ".rank*"))


def finished_ids(path: str | Path) -> set[str]:
    """Ids in the results file or in any rank's part file (a killed multi-process run leaves those)."""
    return {str(r["id"]) for p in [Path(path), *_rank_files(path)] for r in read_results(p)}


def merge_rank_results(path: str | Path) -> int:
    """Append the rank files' records to `path` (each id once), then delete them. Safe to rerun."""
    parts = _rank_files(path)
    if not parts:
        return 0
    writer = ResultsWriter(path)
    added = 0
    for part in parts:
        for record in read_results(part):
            if str(record["id"]) not in writer.done_ids:
                writer.write(record)
                added += 1
    for part in parts:  # only once every record is safely in the main file
        part.unlink()
    return added
