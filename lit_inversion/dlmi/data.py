"""Targets for DLMI: target continuations (token ids) in their context, from a file or the paper's
difficulty-k protocol.

A target file is `.txt` (one target text per line), `.jsonl` or `.csv`. A JSONL record has the
target as "ids" or text ("text", or nanoGCG's "target"; "ids" win) and optionally its context:
"messages" (chat turns, `{optim_str}` in one of them) or "prefix" / "suffix" text around the span;
records without one take the data module's default context. A CSV has `goal,target` columns (the
AdvBench / HarmBench layout): the goal becomes the user turn with ` {optim_str}` after it. A record's
"prompt_ids" / "prompt_text" (a known span) are for reporting only: the optimiser never sees them.
"""

from __future__ import annotations

import csv
import io
import math
from dataclasses import dataclass
from pathlib import Path

import lightning as L
from torch.utils.data import DataLoader

from lit_inversion.dlmi.batch import validate_targets
from lit_inversion.dlmi.config import DlmiConfig, GcgConfig, OutputConfig
from lit_inversion.dlmi.context import OPTIM_STR, Context, bare_context, render_context
from lit_inversion.errors import InversionError
from lit_inversion.models import LoadedModel
from lit_inversion.distributed import shard
from lit_inversion.sequences import (ListDataset, UniqueIds, apply_limit, json_row, read_lines, read_sequences,
                                     row_id, row_ids)
from lit_inversion.tokens import check_ids, encode

OPTION = "--data.targets_file"


@dataclass
class OutputTarget:
    id: str
    ids: list[int]
    context: Context | None = None  # the ids around the optimised span (None: bare, [BOS] + span)
    group: str | None = None  # targets with one group share one prompt (a universal prompt)


@dataclass
class OutputGroup:
    """A universal target: one prompt span for every member, each member in its own context."""

    id: str
    members: list[OutputTarget]

    @property
    def ids(self) -> list[int]:
        """Every member's target ids, in member order (a restored state must match them)."""
        return [i for m in self.members for i in m.ids]

    @property
    def signature(self) -> dict:
        """Its members' ids and contexts (a restored state must match them)."""
        return {"members": [[m.id, m.context.to_dict() if m.context is not None else None] for m in self.members]}


def group_targets(targets: list[OutputTarget]) -> list[OutputTarget | OutputGroup]:
    """Targets sharing a `group` value become one `OutputGroup` (at its first member's place)."""
    units: list[OutputTarget | OutputGroup] = []
    groups: dict[str, OutputGroup] = {}
    plain = {t.id for t in targets if t.group is None}
    for t in targets:
        if t.group is None:
            units.append(t)
        elif t.group in groups:
            groups[t.group].members.append(t)
        else:
            if t.group in plain:
                raise InversionError(f"group {t.group!r} has the id of a target outside it: results are keyed by id, "
                                     "rename the group or the target")
            groups[t.group] = OutputGroup(t.group, [t])
            units.append(groups[t.group])
    return units


@dataclass
class ContextSpec:
    """Text around the optimised span, before rendering: chat `messages`, or `prefix` / `suffix`."""

    messages: list[dict] | None = None
    prefix: str | None = None
    suffix: str | None = None

    @property
    def empty(self) -> bool:
        return self.messages is None and self.prefix is None and self.suffix is None

    def render(self, loaded: LoadedModel, prepend_bos: bool, where: str) -> Context | None:
        if self.empty:
            return None
        return render_context(loaded.tokenizer, loaded.bos_id, self.messages, self.prefix, self.suffix,
                              prepend_bos, where)


def read_output_targets(path: str | Path, loaded: LoadedModel, default: ContextSpec = ContextSpec(),
                        prepend_bos: bool = True) -> list[OutputTarget]:
    """The targets of a `.txt`, `.jsonl` or `.csv` file, each with its rendered context."""
    path = Path(path)
    if path.suffix == ".csv":
        return _read_csv(path, loaded, prepend_bos)
    if path.suffix != ".jsonl":
        context = default.render(loaded, prepend_bos, f"{OPTION} {path}")
        return [OutputTarget(i, ids, context)
                for i, ids in read_sequences(path, loaded.tokenizer, loaded.vocab_size, option=OPTION)]
    targets, unique, members = [], UniqueIds(path), {}
    for number, line in read_lines(path, OPTION):
        where = f"{path}:{number}"
        row = json_row(line, where)
        ids = row_ids(row, where, loaded.tokenizer, text_keys=("text", "target"))
        check_ids(ids, loaded.vocab_size, f"the target of {where}")
        target_id = row_id(row, where, f"{path.stem}-{number}")
        group = row.get("group")
        if group is not None:
            group = str(group)
            if target_id in members.setdefault(group, set()):
                raise InversionError(f"{where}: group {group!r} repeats the member id {target_id!r}: "
                                     "give each member a unique \"id\"")
            members[group].add(target_id)
        unique.add(target_id, number)
        spec = ContextSpec(row.get("messages"), row.get("prefix"), row.get("suffix"))
        context = (default if spec.empty else spec).render(loaded, prepend_bos, where)
        targets.append(OutputTarget(target_id, ids, context, group))
    return targets


def _read_csv(path: Path, loaded: LoadedModel, prepend_bos: bool) -> list[OutputTarget]:
    text = "\n".join(line for _, line in read_lines(path, OPTION))
    reader = csv.DictReader(io.StringIO(text))
    if not {"goal", "target"} <= set(reader.fieldnames or ()):
        raise InversionError(f"{path}: a CSV of targets needs a header with goal and target columns "
                             f"(got {reader.fieldnames}): write `goal,target` on its first line")
    targets = []
    for number, row in enumerate(reader, start=2):
        where = f"{path}:{number}"
        ids = encode(loaded.tokenizer, row["target"] or "")
        check_ids(ids, loaded.vocab_size, f"the target of {where}")
        messages = [{"role": "user", "content": f"{row['goal'] or ''} {OPTIM_STR}"}]
        context = render_context(loaded.tokenizer, loaded.bos_id, messages, prepend_bos=prepend_bos, where=where)
        targets.append(OutputTarget(f"{path.stem}-{number}", ids, context))
    return targets


def check_group_config(config: OutputConfig) -> None:
    if not (isinstance(config, GcgConfig) or (isinstance(config, DlmiConfig) and config.relaxed_steps == 0)):
        raise InversionError(f"groups (universal prompts) need a swap-search method: dlmi with refine_fraction 1 "
                             f"(its default) or gcg (got {config.name}): set --model.method DlmiConfig")
    if config.init == "repeat":
        raise InversionError("groups start from random tokens: the copy seed (init repeat) repeats one target; "
                             "set --model.init random")


def validate_group(loaded, group: OutputGroup, config: OutputConfig) -> None:
    """One-line errors naming the group: one member, repeated member ids, a member too long."""
    if len(group.members) < 2:
        raise InversionError(f"group {group.id!r} has {len(group.members)} member: a group needs at least 2 targets "
                             "(drop its \"group\" field to invert it alone)")
    ids = [m.id for m in group.members]
    repeated = sorted({i for i in ids if ids.count(i) > 1})
    if repeated:
        raise InversionError(f"group {group.id!r} repeats the member id(s) {repeated}: give each member a unique \"id\"")
    bare = bare_context(loaded.bos_id, config.prepend_bos)
    for m in group.members:
        check_ids(m.ids, loaded.vocab_size, f"the target of member {m.id!r} of group {group.id!r}")
        total = len(m.context or bare) + config.prompt_length + len(m.ids)
        if loaded.max_positions is not None and total > loaded.max_positions:
            raise InversionError(f"group {group.id!r}, member {m.id!r}: context + prompt + target is {total} tokens, "
                                 f"more than the model context of {loaded.max_positions}: use a shorter context, "
                                 "prompt_length or target")


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
        targets_file: target continuations: `.txt` (one per line), `.jsonl` (`text`/`target` or `ids`,
            optional `id`, `messages` or `prefix`/`suffix`, and `group`: records sharing it get one
            universal prompt) or `.csv` (`goal,target` columns).
        difficulty_k: the paper's difficulty-k protocol instead (or as well), e.g. [1, 6, 11].
        per_k: targets per k.
        target_length: tokens per difficulty-k target.
        difficulty_seed: seed of the difficulty-k targets.
        batch_size: target slots optimised at once.
        limit: invert only the first N targets (null: all).
        messages: the default context of file targets without one: chat turns, `{optim_str}` in one
            (else appended to the last), rendered with the model's chat template.
        prefix: the default context's text before the span (instead of messages).
        suffix: the default context's text after the span.
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
        messages: list[dict] | None = None,
        prefix: str | None = None,
        suffix: str | None = None,
    ):
        super().__init__()
        self.save_hyperparameters()
        if targets_file is None and not difficulty_k:
            raise InversionError("no targets: set --data.targets_file or --data.difficulty_k (e.g. [1, 6, 11])")
        if batch_size < 1:
            raise InversionError(f"batch_size (the number of target slots) must be at least 1 (got {batch_size})")
        if limit is not None and limit < 1:
            raise InversionError(f"--data.limit must be at least 1, or null for all targets (got {limit})")
        self.targets: list[OutputTarget | OutputGroup] = []  # this rank's shard, still to do
        self.split_groups: list[OutputGroup] = []  # every rank's (split_groups): each scores its members
        self.step_bound = 0  # pool steps the largest shard needs at most (the progress bar's total)

    def build_targets(self, loaded: LoadedModel, prepend_bos: bool = True) -> list[OutputTarget | OutputGroup]:
        h = self.hparams
        targets: list[OutputTarget] = []
        if h.targets_file is not None:
            default = ContextSpec(h.messages, h.prefix, h.suffix)
            targets += read_output_targets(h.targets_file, loaded, default, prepend_bos)
        if h.difficulty_k:
            from lit_inversion.dlmi.targets import make_difficulty_targets

            made = make_difficulty_targets(loaded, ks=h.difficulty_k, per_k=h.per_k, length=h.target_length, seed=h.difficulty_seed)
            targets += [OutputTarget(str(t["id"]), list(t["ids"])) for t in made]
        # A group (records sharing "group") is one unit: it counts once towards the limit.
        return apply_limit(group_targets(targets), h.limit, loud=self.trainer is None or self.trainer.is_global_zero)

    def setup(self, stage: str) -> None:
        module = self.trainer.lightning_module
        loaded = module.load()
        targets = self.build_targets(loaded, module.config.prepend_bos)
        singles = [t for t in targets if isinstance(t, OutputTarget)]
        if singles:
            validate_targets(loaded, [t.ids for t in singles], module.config, [t.context for t in singles],
                             [t.id for t in singles])
        for group in (t for t in targets if isinstance(t, OutputGroup)):
            check_group_config(module.config)
            validate_group(loaded, group, module.config)
        done = module.finished_ids()
        todo = [t for t in targets if t.id not in done]
        module.announce_targets(len(targets), len(todo))
        rank, world = self.trainer.global_rank, self.trainer.world_size
        self.split_groups = []
        if getattr(module.hparams, "split_groups", False) and world > 1:  # every rank runs every group
            self.split_groups = [t for t in todo if isinstance(t, OutputGroup)]
            todo = [t for t in todo if not isinstance(t, OutputGroup)]
        self.targets = [t for t in shard(todo, rank, world, size=lambda t: len(t.ids)) if t is not None]
        largest = math.ceil(len(todo) / world)
        slots, steps = self.hparams.batch_size, module.config.num_steps
        self.step_bound = max_pool_steps(largest, slots, steps) + max_pool_steps(len(self.split_groups), slots, steps)

    def train_dataloader(self) -> DataLoader:
        return DataLoader(TargetStream(self.targets), batch_size=None)
