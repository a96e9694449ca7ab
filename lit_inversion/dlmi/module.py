"""DLMI as a Lightning job: one training step is one optimisation step over a pool of target slots.

Continuous batching (`TargetPool`): `--data.batch_size` slots each hold one target; every training
step steps each occupied slot once and runs a target's honest check every `check_every` of its own
steps and at its last. A target leaves its slot as soon as it matches or runs out of `num_steps`: its
record is appended to the results file at once and the next queued target takes the slot in the same
step. The module pulls this rank's targets from the dataloader at the first step
(`training_step(dataloader_iter)`, Lightning's way to fetch in the step); the epoch ends when the
pool and queue are empty on every rank (`on_train_batch_start` returns -1 after an all-reduce of that flag: ranks
that finish early run no-op steps, so every rank runs the same steps and Lightning's collectives
stay in step). Lightning's progress bar and `global_step` count optimisation steps.

Per step it logs the loss, soft LCS and mean temperature (methods that have one); per honest check the
honest LCS and exact-match rate; per finished target a table of every target so far. `last.ckpt`
(`LastCheckpoint`, every `checkpoint_every` steps) holds every in-flight target's batch state from
every rank (parameters, Adam state, generators, search) keyed by target id, so `--ckpt_path last`
continues each one where it was; targets already in the results file are never redone.
"""

from __future__ import annotations

import math
from dataclasses import replace

import torch


from lit_inversion.dlmi.batch import DlmiResult
from lit_inversion.dlmi.config import CONFIGS, DlmiConfig, OutputConfig, method_config
from lit_inversion.console import say
from lit_inversion.dlmi.pool import PoolStep, TargetPool
from lit_inversion.dlmi.universal import GroupResult, group_record
from lit_inversion.distributed import merge_across_ranks
from lit_inversion.errors import InversionError
from lit_inversion.job import InversionJob
from lit_inversion.metrics import ExactMatch, LCSRatio
from lit_inversion.models import DEFAULT_MODEL
from lit_inversion.precision import DTYPES
from lit_inversion.tokens import decode
from lit_inversion.tracking import log_scalars, log_text, markdown_table


def dlmi_record(target_id: str, result: DlmiResult) -> dict:
    return {"id": target_id, "target_ids": result.target_ids, "input_ids": result.input_ids, "prompt_ids": result.prompt_ids,
            "prompt_text": result.prompt_text, "output_ids": result.output_ids, "output_text": result.output_text,
            "exact_match": result.exact_match, "lcs_ratio": result.lcs_ratio, "soft_lcs_ratio": result.soft_lcs_ratio,
            "steps": result.steps, "seconds": round(result.seconds, 3), "prompt_target_lcs": result.prompt_target_lcs}


class DlmiModule(InversionJob):
    """Finds prompts whose greedy continuation is the target.

    Args:
        model_name_or_path: a Hugging Face model id or local directory, or smollm2-135m (the default model).
        method: the method and its options: DlmiConfig (null: its defaults), GbdaConfig, GcgConfig or
            ReinforceConfig (`--model.method.help GcgConfig` lists a method's options).
        prompt_length: the prompt's length in tokens; sets `method.prompt_length` (null: the method's).
        num_steps: optimisation steps per target; sets `method.num_steps` (null: the method's).
        init: the start prompt (random, or repeat for DLMI's copy seed); sets `method.init` (null: the method's).
        checkpoint_every: steps between `last.ckpt` saves.
        results_path: the JSONL file each finished target's record is appended to.
        dtype: the frozen model's dtype: auto (bfloat16 on a GPU, else float32), float32, bfloat16 or float16.
        split_groups: with several processes, every rank runs every group (one universal prompt for
            records sharing "group") on its share of the group's members, instead of whole groups per rank.
    """

    progress_unit = "steps"  # one training step is one optimisation step of every slot

    def __init__(self, model_name_or_path: str = DEFAULT_MODEL, method: OutputConfig | None = None,
                 prompt_length: int | None = None, num_steps: int | None = None, init: str | None = None,
                 checkpoint_every: int = 32, results_path: str = "results/dlmi.jsonl", dtype: str = "auto",
                 split_groups: bool = False):
        super().__init__(model_name_or_path, results_path, dtype)
        self.save_hyperparameters()
        if dtype not in ("auto", *DTYPES):
            raise InversionError(f"dtype must be auto, {', '.join(DTYPES)} (got {dtype!r})")
        if checkpoint_every < 1:
            raise InversionError(f"checkpoint_every must be at least 1 step (got {checkpoint_every})")
        if method is not None and not isinstance(method, OutputConfig):
            raise InversionError(f"method must be a method's config ({', '.join(c.__name__ for c in CONFIGS.values())}), "
                                 f"got {method!r}: e.g. --model.method GcgConfig")
        given = {"prompt_length": prompt_length, "num_steps": num_steps, "init": init}
        self.config = method_config(method or DlmiConfig(), **{k: v for k, v in given.items() if v is not None})
        self.exact_match = ExactMatch()
        self.lcs = LCSRatio()
        self.optimisation_steps = 0
        self.pool: TargetPool | None = None  # not a submodule: its state travels in on_save_checkpoint
        # split_groups: the groups every rank steps together (each scoring its members), in step on every rank.
        self.group_pool: TargetPool | None = None
        self._finished_rows: list[list[str]] = []
        self._saved_slots: dict[str, dict] = {}  # in-flight targets restored from a checkpoint

    @property
    def checkpoint_interval(self) -> int:
        """Steps between `last.ckpt` saves (`LastCheckpoint` asks)."""
        return self.hparams.checkpoint_every

    def setup(self, stage: str) -> None:
        super().setup(stage)
        # An "auto" compute dtype follows a mixed-precision trainer (the baselines default to float32, as published).
        if self.config.compute_dtype == "auto" and self.precision_dtype() != "float32":
            self.config = replace(self.config, compute_dtype=self.precision_dtype())

    def on_train_start(self) -> None:
        slots = self.trainer.datamodule.hparams.batch_size  # the data module's batch_size is the slot count
        self.pool = TargetPool(self.load(), self.config, slots)
        self.pool.load_state_dict(self._saved_slots)
        groups = self.trainer.datamodule.split_groups
        if groups:
            self.group_pool = TargetPool(self.load(), self.config, slots, process_group=torch.distributed.group.WORLD)
            self.group_pool.load_state_dict(self._saved_slots)
            self.group_pool.enqueue(groups, skip=self.finished_ids())
        self._saved_slots = {}
        self._to_fetch = len(self.trainer.datamodule.targets)  # this rank's targets, pulled at the first step
        # Lightning counts global_step in steps of optimisers it was given; the slots' optimisers are made
        # and dropped per target (the swap search has none), so the pool's steps are counted here, and
        # continue across a resume (Lightning's loop state is not restored: job.on_load_checkpoint).
        self._step_progress().total.ready = self._step_progress().total.completed = self.optimisation_steps

    def _step_progress(self):
        return self.trainer.fit_loop.epoch_loop.manual_optimization.optim_step_progress

    def progress_total(self) -> int | None:
        """The progress bar's total: the pool steps the largest rank's targets need at most."""
        return self.trainer.datamodule.step_bound

    def on_train_batch_start(self, batch, batch_idx: int) -> int | None:
        # Every rank must leave the loop at the same step (Lightning's collectives, checkpoint gathers):
        # stop only when no rank has a target left.
        empty = self.pool.empty and self._to_fetch == 0 and (self.group_pool is None or self.group_pool.empty)
        if self.trainer.strategy.reduce_boolean_decision(empty, all=True):
            return -1
        return None

    def training_step(self, dataloader_iter) -> None:
        """One optimisation step of every occupied slot; this rank's targets join the queue at the first."""
        while self._to_fetch:
            target, _, _ = next(dataloader_iter)
            self._to_fetch -= 1
            self.pool.enqueue([target], skip=self.finished_ids())
        self.optimisation_steps += 1
        self._step_progress().increment_ready()
        if self.group_pool is not None and not self.group_pool.empty:
            # Every rank steps the same groups together (their collectives), so no SIGTERM skip here.
            self._log_step(self.group_pool.step(), write=self.trainer.is_global_zero)
        if not self.pool.empty:  # else a no-op step: other ranks still have targets
            # On SIGTERM the slots not yet stepped skip this step; Lightning then stops at its end.
            self._log_step(self.pool.step(interrupted=lambda: self.trainer.received_sigterm))
        self._step_progress().increment_completed()

    def _log_step(self, step: PoolStep, write: bool = True) -> None:
        finite = [x for x in step.loss if math.isfinite(x)]
        scalars = {"dlmi/forwards": step.forwards, "dlmi/gradient_passes": step.gradients}
        if step.soft_lcs:  # else every slot skipped the step (SIGTERM)
            scalars["dlmi/soft_lcs"] = sum(step.soft_lcs) / len(step.soft_lcs)
        if finite:
            scalars["dlmi/loss"] = sum(finite) / len(finite)
        taus = [x for x in step.tau if math.isfinite(x)]  # methods without a temperature: nan
        if taus:
            scalars["dlmi/mean_tau"] = sum(taus) / len(taus)
        if step.checked:
            results = [r for _, r in step.checked]
            scalars["dlmi/honest_lcs"] = sum(r.lcs_ratio for r in results) / len(results)
            scalars["dlmi/exact_match_rate"] = sum(r.exact_match for r in results) / len(results)
        for name, result in step.checked:  # a curve per group
            if isinstance(result, GroupResult):
                scalars[f"groups/{name}/pair_lcs"] = result.lcs_ratio
                scalars[f"groups/{name}/exact_pairs"] = sum(p.exact_match for p in result.pairs)
        log_scalars(self, scalars, self.optimisation_steps)
        for name, result in step.finished:
            if write:  # a split group's record: rank 0 writes it
                self._write_finished(name, result)
        # On the bar: the best honest LCS of the targets in the slots (as of their last checks), and
        # the targets finished and matched so far on this rank.
        checked = [float(s.batch.best_lcs[0]) for s in self.pool.running if float(s.batch.best_lcs[0]) >= 0]
        shown = {"targets": self.targets_done, "exact": int(self.exact_match.total)}
        if checked:
            shown["lcs"] = sum(checked) / len(checked)
        self.log_dict(shown, prog_bar=True, logger=False, on_step=True, on_epoch=False, batch_size=1)

    def _write_finished(self, name: str, result: DlmiResult | GroupResult) -> None:
        """Append a target's (or group's) record as soon as it stops (matched, or out of steps)."""
        if name in self.writer.done_ids:
            return
        grouped = isinstance(result, GroupResult)
        self.writer.write(group_record(name, result) if grouped else dlmi_record(name, result))
        pairs = [(f"{name}/{p.id}", p) for p in result.pairs] if grouped else [(name, result)]
        for row_name, r in pairs:  # the metrics and the table count a group's pairs
            self.exact_match.update([r.output_ids], [r.target_ids])
            self.lcs.update([r.output_ids], [r.target_ids])
            self._finished_rows.append([row_name, decode(self.load().tokenizer, r.target_ids), result.prompt_text,
                                        r.output_text, f"{r.lcs_ratio:.2f}", "yes" if r.exact_match else "no"])
        self.targets_done += 1
        log_scalars(self, {"dlmi/finished_honest_lcs": self.lcs.local_mean(),
                           "dlmi/finished_exact_match_rate": self.exact_match.local_mean()}, self.targets_done)
        # One table of every target finished so far.
        log_text(self, "dlmi/finished_targets", markdown_table(
            ["target id", "target", "prompt", "output", "honest LCS", "exact"], self._finished_rows),
            self.optimisation_steps)
        if grouped:
            solved = sum(p.exact_match for p in result.pairs)
            outputs = " | ".join(repr(p.output_text) for p in result.pairs)
            say(f"[{name}] {'SOLVED' if result.exact_match else 'partial'} pairs={solved}/{len(result.pairs)} "
                f"lcs={result.lcs_ratio:.2f} steps={result.steps} {result.seconds:.1f}s "
                f"prompt={result.prompt_text!r} -> {outputs}")
            return
        say(f"[{name}] {'EXACT' if result.exact_match else 'partial'} lcs={result.lcs_ratio:.2f} "
            f"soft_lcs={result.soft_lcs_ratio:.2f} steps={result.steps} {result.seconds:.1f}s "
            f"prompt={result.prompt_text!r} -> {result.output_text!r}")

    def run_metrics(self) -> dict:
        return {"dlmi/run_exact_match_rate": self.exact_match, "dlmi/run_honest_lcs": self.lcs}

    def summarize(self, records: list[dict]) -> str:
        label = self.config.label
        if not records:
            return f"{label}: no targets"
        groups = [r for r in records if r.get("pairs")]
        singles = [r for r in records if not r.get("pairs")]
        parts = []
        if singles:
            exact = sum(bool(r["exact_match"]) for r in singles)
            lcs = sum(r["lcs_ratio"] for r in singles) / len(singles)
            soft = sum(r["soft_lcs_ratio"] for r in singles) / len(singles)
            parts.append(f"{len(singles)} targets, exact match {exact}/{len(singles)}, honest LCS {lcs:.2f} "
                         f"(paper-style soft LCS {soft:.2f})")
        if groups:
            pairs = [p for r in groups for p in r["pairs"]]
            solved = sum(bool(r["exact_match"]) for r in groups)
            parts.append(f"{len(groups)} groups, solved {solved}/{len(groups)}, pairs exact "
                         f"{sum(bool(p['exact_match']) for p in pairs)}/{len(pairs)}, mean per-pair honest LCS "
                         f"{sum(p['lcs_ratio'] for p in pairs) / len(pairs):.2f}")
        return f"{label}: " + "; ".join(parts)

    def run_settings(self) -> dict:
        c = self.config
        return {"model": self.hparams.model_name_or_path, "method": c.name, "prompt_length": c.prompt_length,
                "num_steps": c.num_steps, "init": c.init}

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        super().on_save_checkpoint(checkpoint)
        checkpoint["optimisation_steps"] = self.optimisation_steps
        local = self.pool.state_dict() if self.pool is not None else self._saved_slots
        if self.group_pool is not None:
            local = {**local, **self.group_pool.state_dict()}
        # Every rank's in-flight targets, by id (rank 0 writes the file): a resume with any number of
        # processes continues each one on whichever rank its shard puts it.
        checkpoint["dlmi_slots"] = merge_across_ranks(local, self.trainer)

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        super().on_load_checkpoint(checkpoint)
        self.optimisation_steps = int(checkpoint.get("optimisation_steps", 0))
        self._saved_slots = checkpoint.get("dlmi_slots", {})
