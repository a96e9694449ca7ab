"""Several processes, one job: disjoint target shards, independent ranks, one results file.

Inversion is embarrassingly parallel: each rank owns its targets and their prompt parameters, so
nothing is synchronised during the run. Two of Lightning's data-parallel defaults are wrong here:
DDP would average one rank's prompt gradients with another's (and refuses a module whose only
parameters are created per target), and the distributed sampler pads shards by repeating targets.
So ranks run unwrapped, the datasets are iterable (no sampler is injected), and shards are padded
with empty slots instead. Each rank appends to `<results>.rank<r>`; rank 0 merges them at the end.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import TypeVar

import lightning as L
import torch
from lightning.fabric.utilities.apply_func import apply_to_collection
from lightning.pytorch.strategies import DDPStrategy

from lit_inversion.results import ResultsWriter, read_results

T = TypeVar("T")


def shard(items: list[T], rank: int, world: int) -> list[T | None]:
    """This rank's items (round robin), padded with None so every rank gets the same count.

    Equal counts keep ranks in step for the collectives Lightning runs per batch (checkpoint
    barriers); a None slot is a no-op step, never a repeated target.
    """
    mine: list[T | None] = list(items[rank::world])
    return mine + [None] * (math.ceil(len(items) / world) - len(mine))


def run_ranks_independently(trainer: L.Trainer) -> None:
    """Keep DDP's process group and launcher but not its gradient-averaging wrapper."""
    strategy = trainer.strategy
    if isinstance(strategy, DDPStrategy):
        strategy._setup_model = lambda model: model  # called by strategy.setup(), after the setup hooks


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
