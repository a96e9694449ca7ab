"""Continuous batching: a pool of target slots, stepped one optimisation step at a time.

Each slot holds one target in its own size-1 `TargetBatch` (from `make_batch`), so every method
(DLMI, the paper's relaxed phase, GCG, GBDA, REINFORCE) runs unchanged, a target's Adam state,
generator and search never share a tensor with another target's, and a freed slot is refilled by
building one new batch. (Replacing rows of one shared batch would mean per-row optimizer state and
targets in different phases in one batch; the swap search, the default, already steps targets one
after another, so one batch per slot costs it nothing.)

`step()` steps every occupied slot once, runs each target's honest check every `check_every` of its
own steps and at its last step (the slots due at one step in one batched greedy decode), takes out
the targets that matched or ran out of steps, and hands their slots to the next queued targets.
`state_dict()` holds every in-flight target's batch state, keyed by target id, so a restored pool
continues each one where it was.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

import torch

from lit_inversion.dlmi.algorithm import DlmiBatch
from lit_inversion.dlmi.batch import DlmiResult, TargetBatch, check_batches, validate_targets
from lit_inversion.dlmi.config import DlmiConfig, GcgConfig, OutputConfig, ReinforceConfig
from lit_inversion.dlmi.context import Context
from lit_inversion.dlmi.data import OutputGroup, OutputTarget
from lit_inversion.dlmi.gcg import GcgBatch
from lit_inversion.dlmi.reinforce import ReinforceBatch
from lit_inversion.dlmi.universal import GroupBatch, GroupResult
from lit_inversion.errors import InversionError

BATCHES: dict[type[OutputConfig], type[TargetBatch]] = {
    DlmiConfig: DlmiBatch, GcgConfig: GcgBatch, ReinforceConfig: ReinforceBatch}  # GbdaConfig is a DlmiConfig


def make_batch(loaded, targets: Sequence[Sequence[int]], config: OutputConfig,
               keys: Sequence[object] | None = None, context: Context | None = None) -> TargetBatch:
    """The batch of `config`'s method for `targets`, in `context` (default: bare)."""
    for kind, batch in BATCHES.items():
        if isinstance(config, kind):
            return batch(loaded, targets, config, keys, context)
    raise TypeError(f"no batch for {type(config).__name__}: use one of {', '.join(k.__name__ for k in BATCHES)}")


@dataclass
class Slot:
    target: OutputTarget | OutputGroup
    batch: TargetBatch | GroupBatch

    @property
    def steps(self) -> int:
        return int(self.batch.steps[0])


@dataclass
class PoolStep:
    """What one pool step did: per stepped target its loss, temperature (nan where a method has none)
    and soft LCS, the honest results of the targets checked, and the targets that left their slots."""

    ids: list[str] = field(default_factory=list)  # the targets stepped, in slot order
    phase: list[str] = field(default_factory=list)  # "relaxed", "refine", "gcg", "reinforce"
    loss: list[float] = field(default_factory=list)
    tau: list[float] = field(default_factory=list)
    soft_lcs: list[float] = field(default_factory=list)
    checked: list[tuple[str, DlmiResult | GroupResult]] = field(default_factory=list)
    finished: list[tuple[str, DlmiResult | GroupResult]] = field(default_factory=list)
    forwards: int = 0  # prompts scored by a forward this step, over every slot
    gradients: int = 0  # gradient passes this step, over every slot


class TargetPool:
    """`slots` target slots fed from a FIFO queue; one `step()` is one optimisation step of each. A slot
    holds a target, or a group (one universal prompt for its members; `process_group`: the ranks that
    split each group's members)."""

    def __init__(self, loaded, config: OutputConfig, slots: int, process_group=None):
        self.loaded, self.config, self.process_group = loaded, config, process_group
        self.slots: list[Slot | None] = [None] * slots
        self.queue: deque[OutputTarget] = deque()
        self.saved: dict[str, dict] = {}  # in-flight states from a checkpoint, by target id
        self._known: set[str] = set()

    # ----- contents -----------------------------------------------------------------------------
    @property
    def running(self) -> list[Slot]:
        return [s for s in self.slots if s is not None]

    @property
    def empty(self) -> bool:
        return not self.queue and not self.running

    def enqueue(self, targets: Iterable[OutputTarget | OutputGroup], skip: set[str] = frozenset()) -> None:
        """Queue targets not in `skip` and not queued before; those with a restored state go first."""
        new = [t for t in targets if t.id not in skip and t.id not in self._known]
        self._known.update(t.id for t in new)
        restored = [t for t in new if t.id in self.saved]
        order = {name: i for i, name in enumerate(self.saved)}  # the saved slot order
        restored.sort(key=lambda t: order[t.id])
        self.queue.extendleft(reversed(restored))
        self.queue.extend(t for t in new if t.id not in self.saved)

    def fill(self) -> None:
        """Give each free slot the next queued target (from its saved state if it has one)."""
        for i, slot in enumerate(self.slots):
            if slot is None and self.queue:
                target = self.queue.popleft()
                if isinstance(target, OutputGroup):
                    batch = GroupBatch(self.loaded, target, self.config, self.process_group)
                else:
                    batch = make_batch(self.loaded, [target.ids], self.config, keys=[target.id], context=target.context)
                saved = self.saved.pop(target.id, None)
                # A changed target or context restarts.
                if saved is not None and saved["ids"] == list(target.ids) and saved.get("input") == _input(target):
                    batch.load_state_dict(saved["state"])
                self.slots[i] = Slot(target, batch)

    # ----- one step -----------------------------------------------------------------------------
    def step(self, interrupted: Callable[[], bool] | None = None) -> PoolStep:
        """One optimisation step of every occupied slot; stopped targets leave, queued ones take their slots.
        Once `interrupted()` is true the remaining slots skip this step (each target's state stays its own,
        so a slot one step behind resumes exactly where it was)."""
        self.fill()
        out, due = PoolStep(), []
        for slot in self.running:
            if interrupted is not None and interrupted():
                break
            before = slot.batch.work()
            stats = slot.batch.step()
            after = slot.batch.work()
            forwards, gradients = (after[0] - before[0]).sum().item(), (after[1] - before[1]).sum().item()
            out.forwards += int(forwards)
            out.gradients += int(gradients)
            # One host sync for the slot's three figures.
            loss, tau, soft_lcs = torch.stack([stats.loss[0], stats.tau[0], stats.soft_lcs[0].to(stats.loss.dtype)]).tolist()
            out.ids.append(slot.target.id)
            out.phase.append(stats.phase)
            out.loss.append(loss)
            out.tau.append(tau)
            out.soft_lcs.append(soft_lcs)
            if slot.batch.check_due:
                due.append(slot)
        check_batches([s.batch for s in due if isinstance(s.batch, TargetBatch)])
        for slot in due:
            if isinstance(slot.batch, GroupBatch):
                slot.batch.check()
        out.checked = [(s.target.id, s.batch.result(0)) for s in due]
        for i, slot in enumerate(self.slots):
            if slot is not None and slot.batch.finished:  # matched, or out of steps (or seconds)
                out.finished.append((slot.target.id, slot.batch.final_result(0)))
                self.slots[i] = None
        self.fill()
        return out

    # ----- checkpointing ------------------------------------------------------------------------
    def state_dict(self) -> dict[str, dict]:
        """Every in-flight target's batch state (parameters, optimizer, generators, search), by id, in slot order."""
        return {s.target.id: {"ids": list(s.target.ids), "input": _input(s.target), "steps": s.steps,
                              "state": s.batch.state_dict()} for s in self.running}

    def load_state_dict(self, states: dict[str, dict]) -> None:
        """Keep saved states for targets that are queued later (`enqueue`) or already queued."""
        self.saved.update(states)
        if self.queue:  # already queued: move the restored ones to the front
            queued = list(self.queue)
            self.queue.clear()
            self._known.difference_update(t.id for t in queued)
            self.enqueue(queued)


def _input(target: OutputTarget | OutputGroup) -> dict | None:
    """The context a saved state was made in (None: bare; a group: its members' ids and contexts)."""
    if isinstance(target, OutputGroup):
        return target.signature
    return target.context.to_dict() if target.context is not None else None


def run_pool(loaded, targets: Iterable[OutputTarget | OutputGroup], config: OutputConfig, slots: int,
             on_step: Callable[[PoolStep], None] | None = None,
             process_group=None) -> list[tuple[str, DlmiResult | GroupResult]]:
    """The DLMI job's step loop without Lightning: step a pool until every target (or group) has left it;
    (id, result) in the order they finished. `on_step` sees each step's `PoolStep`; `process_group`: the
    ranks that split each group's members (every rank runs the same groups)."""
    pool = TargetPool(loaded, config, slots, process_group)
    pool.enqueue(targets)
    finished: list[tuple[str, DlmiResult]] = []
    while not pool.empty:
        step = pool.step()
        if on_step is not None:
            on_step(step)
        finished += step.finished
    return finished


def invert_outputs(loaded, targets: Sequence[Sequence[int]], config: OutputConfig | None = None, batch_size: int | None = None,
                   keys: Sequence[object] | None = None,
                   on_step: Callable[[PoolStep], None] | None = None,
                   contexts: Sequence[Context | None] | None = None) -> list[DlmiResult]:
    """Find, for each target, a prompt whose greedy continuation reproduces it, with `config`'s method
    (DLMI by default), through the same pool of slots as the Lightning job: `batch_size` slots
    (default: one per target); `contexts[i]` is the text around target i's prompt (default: bare).
    Results come in the order of `targets`.

    A target's noise is seeded from the run seed and its key (default: its ids), so it follows the
    same path whatever else is run beside it."""
    config = config or DlmiConfig()
    contexts = list(contexts) if contexts is not None else [None] * len(targets)
    if len(contexts) != len(targets):
        raise InversionError(f"{len(contexts)} contexts for {len(targets)} targets: give one per target")
    validate_targets(loaded, targets, config, contexts)
    names: list[str] = []
    for i, ids in enumerate(targets):
        name = str(keys[i]) if keys is not None else str(tuple(int(t) for t in ids))
        names.append(name if name not in names else f"{name}#{i}")  # a repeated target still gets its result
    queue = [OutputTarget(n, [int(t) for t in ids], c) for n, ids, c in zip(names, targets, contexts)]
    finished = dict(run_pool(loaded, queue, config, batch_size or len(targets), on_step))
    return [finished[n] for n in names]
