"""The DLMI job's continuous batching: one Lightning step is one optimisation step over a pool of slots."""

from __future__ import annotations

import json
import random
from pathlib import Path

import lightning as L
import pytest
import torch

from lit_inversion.checkpointing import LastCheckpoint
from lit_inversion.dlmi import DlmiConfig, DlmiModule, OutputTargetsDataModule
from lit_inversion.dlmi.batch import greedy_decode
from lit_inversion.dlmi.data import max_pool_steps
from lit_inversion.results import read_results

NUM_STEPS = 12


class Timeline(L.Callback):
    """Per training step, each in-flight target's step count (after the step and the refill)."""

    def __init__(self):
        self.steps: list[dict[str, int]] = []

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        self.steps.append({s.target.id: s.steps for s in module.pool.running})


def _targets(tmp_path: Path, loaded) -> Path:
    """hard0 and hard1: 8 random tokens (no 3-token prompt makes them: they use the whole budget);
    easy: one token some prompt does produce (found in a step or two: the tiny model mostly repeats
    the prompt's last token, so the copy limit is off)."""
    g = torch.Generator().manual_seed(5)
    easy = greedy_decode(loaded.model, torch.tensor([[1, 17, 40, 63]]), 1)[0].tolist()
    rows = [("hard0", torch.randint(3, 96, (8,), generator=g).tolist()), ("easy", easy),
            ("hard1", torch.randint(3, 96, (8,), generator=g).tolist())]
    path = tmp_path / "targets.jsonl"
    path.write_text("".join(json.dumps({"id": i, "ids": ids}) + "\n" for i, ids in rows))
    return path


def _fit(directory: Path, model_dir: Path, targets: Path, ckpt_path: str | None = None, max_steps: int = -1,
         logger=False, **options) -> tuple[L.Trainer, Timeline]:
    timeline = Timeline()
    method = DlmiConfig(check_every=2, compute_dtype="float32", max_prompt_target_lcs=1.0, **options)
    module = DlmiModule(str(model_dir), results_path=str(directory / "results.jsonl"), checkpoint_every=3,
                        prompt_length=3, num_steps=NUM_STEPS, method=method)
    data = OutputTargetsDataModule(targets_file=str(targets), batch_size=2)
    trainer = L.Trainer(accelerator="cpu", devices=1, max_epochs=1, max_steps=max_steps, logger=logger,
                        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                        use_distributed_sampler=False, default_root_dir=directory,
                        callbacks=[LastCheckpoint(dirpath=str(directory / "ckpt")), timeline])
    trainer.fit(module, datamodule=data, ckpt_path=ckpt_path)
    return trainer, timeline


def test_one_lightning_step_is_one_optimisation_step_and_freed_slots_are_refilled(tmp_path, tiny_llama_dir, tiny_llama):
    targets = _targets(tmp_path, tiny_llama)
    trainer, timeline = _fit(tmp_path, tiny_llama_dir, targets)
    records = read_results(tmp_path / "results.jsonl")
    steps = {r["id"]: r["steps"] for r in records}
    assert [r["id"] for r in records] == ["easy", "hard0", "hard1"]  # each once, in the order they finished
    assert steps["hard0"] == steps["hard1"] == NUM_STEPS and steps["easy"] < NUM_STEPS
    # easy's slot went to hard1 in the step easy left, while hard0 still ran: the slots' timelines are
    # [hard0] and [easy, hard1], so the run took easy + hard1 optimisation steps, one Lightning step each.
    assert trainer.global_step == len(timeline.steps) == steps["easy"] + NUM_STEPS
    assert timeline.steps[steps["easy"] - 1] == {"hard0": steps["easy"], "hard1": 0}
    assert timeline.steps[NUM_STEPS - 1] == {"hard1": NUM_STEPS - steps["easy"]}
    assert timeline.steps[-1] == {}


def test_the_run_metrics_are_computed_over_the_finished_targets(tmp_path, tiny_llama_dir, tiny_llama):
    """At the end of the epoch the torchmetrics metrics are computed (synced across ranks) and logged."""
    import csv

    from lightning.pytorch.loggers import CSVLogger

    targets = _targets(tmp_path, tiny_llama)
    _fit(tmp_path, tiny_llama_dir, targets, logger=CSVLogger(tmp_path / "logs", name="run"))
    records = read_results(tmp_path / "results.jsonl")
    rows = list(csv.DictReader(open(next((tmp_path / "logs").rglob("metrics.csv")))))
    final = [r for r in rows if r.get("dlmi/run_exact_match_rate")]
    assert len(final) == 1
    assert float(final[0]["dlmi/run_exact_match_rate"]) == pytest.approx(sum(r["exact_match"] for r in records) / 3)
    assert float(final[0]["dlmi/run_honest_lcs"]) == pytest.approx(sum(r["lcs_ratio"] for r in records) / 3)


def test_resume_mid_target_continues_from_the_saved_state(tmp_path, tiny_llama_dir, tiny_llama):
    targets = _targets(tmp_path, tiny_llama)
    # Half relaxed (Adam moments, noise), half swap search: the stop at step 5 lands in the relaxed phase.
    options = dict(refine_fraction=0.5)
    reference, resumed = tmp_path / "reference", tmp_path / "resumed"
    ref_trainer, _ = _fit(reference, tiny_llama_dir, targets, **options)
    _fit(resumed, tiny_llama_dir, targets, max_steps=5, **options)  # stops with hard0 (and maybe more) in flight
    saved = torch.load(resumed / "ckpt" / "last.ckpt", weights_only=False)
    assert saved["optimisation_steps"] == 5
    in_flight = saved["dlmi_slots"]
    assert "hard0" in in_flight and in_flight["hard0"]["steps"] == 5
    adam = in_flight["hard0"]["state"]["_extra_state"]["optimizer"]["state"]
    assert adam and all(int(m["step"]) == 5 for m in adam.values())  # Adam's moments travel with the slot
    before = {r["id"] for r in read_results(resumed / "results.jsonl")}
    assert before.isdisjoint(in_flight)

    trainer, timeline = _fit(resumed, tiny_llama_dir, targets, ckpt_path=str(resumed / "ckpt" / "last.ckpt"),
                             **options)
    assert timeline.steps[0]["hard0"] == 6  # continued, not restarted
    assert trainer.global_step == ref_trainer.global_step  # the step count continues too
    lines = (resumed / "results.jsonl").read_text().splitlines()
    volatile = {"seconds"}
    got = {r["id"]: {k: v for k, v in r.items() if k not in volatile} for r in map(json.loads, lines)}
    want = {r["id"]: {k: v for k, v in r.items() if k not in volatile} for r in read_results(reference / "results.jsonl")}
    assert len(lines) == len(got) == 3  # no target redone
    assert got == want  # as if never stopped: parameters, Adam state, noise and search all restored


def test_step_bound_covers_every_schedule():
    """`max_pool_steps` (the progress bar's total) bounds the pool's steps for any target lengths."""
    rng = random.Random(0)
    for _ in range(300):
        slots, budget, count = rng.randint(1, 4), rng.randint(1, 6), rng.randint(0, 12)
        lengths = [rng.randint(1, budget) for _ in range(count)]
        free = [0] * slots  # the step at which each slot is free; FIFO onto the first free slot
        for length in lengths:
            i = min(range(slots), key=lambda s: free[s])
            free[i] += length
        assert max(free, default=0) <= max_pool_steps(count, slots, budget)


@pytest.mark.parametrize("slots", [0])
def test_zero_slots_is_one_line_error(tmp_path, slots):
    from lit_inversion.errors import InversionError

    with pytest.raises(InversionError, match="number of target slots"):
        OutputTargetsDataModule(targets_file=str(tmp_path / "t.txt"), batch_size=slots)
