"""DLMI as a Lightning job: one training step optimises one batch of targets to the end.

(Still a custom loop inside the step: the continuous-batching rewrite, one Lightning step per
optimisation step over a pool of target slots, is not done yet. What it needs: per-target batches in
the slots (every method's state is per target now: `TargetBatch` rows, one `SwapSearch` each), an
iterable of step ticks that ends when the pool and queue are empty, and, with several ranks, no-op
steps so that ranks whose targets match early stay in step with the others for Lightning's
collectives, as `distributed.shard` pads with empty slots today.)

Per optimisation step it logs the loss and mean temperature; per honest check the honest LCS and
exact-match rate and the current prompt and output text. `last.ckpt` is written every
`checkpoint_every` steps with the batch's parameters and Adam state, so a killed run resumes the
interrupted batch where it was, and finished targets (already in the results file) are not redone.
"""

from __future__ import annotations

import copy
import inspect
import typing
from dataclasses import fields, replace

import torch

from lit_inversion.dlmi.algorithm import DlmiResult
from lit_inversion.dlmi.batch import TargetBatch
from lit_inversion.dlmi.baselines import LABELS, BaselineConfig, make_batch, method_config
from lit_inversion.console import inner_progress, say
from lit_inversion.dlmi.data import OutputTarget
from lit_inversion.errors import InversionError
from lit_inversion.job import InversionJob
from lit_inversion.metrics import ExactMatch, LCSRatio
from lit_inversion.models import DEFAULT_MODEL
from lit_inversion.tokens import decode
from lit_inversion.tracking import log_scalars, log_text, markdown_table


def dlmi_record(target_id: str, result: DlmiResult) -> dict:
    return {"id": target_id, "target_ids": result.target_ids, "prompt_ids": result.prompt_ids,
            "prompt_text": result.prompt_text, "output_ids": result.output_ids, "output_text": result.output_text,
            "exact_match": result.exact_match, "lcs_ratio": result.lcs_ratio, "soft_lcs_ratio": result.soft_lcs_ratio,
            "steps": result.steps, "seconds": round(result.seconds, 3), "prompt_target_lcs": result.prompt_target_lcs}


class DlmiModule(InversionJob):
    """Finds prompts whose greedy continuation is the target.

    Every `BaselineConfig` field (DLMI's and the baselines' options, `method` included) is a keyword
    option here and a flat `--model.<field>` CLI option: the signature is generated from the
    dataclass (`_config_signature`), so no option list is copied by hand. Options left unset (None)
    take the method's preset (`method_config`).
    """

    progress_unit = "target batches"

    def __init__(self, model_name_or_path: str = DEFAULT_MODEL, checkpoint_every: int = 32,
                 results_path: str = "results/dlmi.jsonl", **options):
        super().__init__(model_name_or_path, results_path)
        unknown = set(options) - set(CONFIG_FIELDS)
        if unknown:
            raise InversionError(f"unknown DLMI option(s) {sorted(unknown)}: see lit_inversion.dlmi.BaselineConfig")
        # Not save_hyperparameters(): it reads the (generated) signature's names from this frame's locals,
        # where the config fields are not; this is what it stores.
        self._set_hparams({"model_name_or_path": model_name_or_path, "checkpoint_every": checkpoint_every,
                           "results_path": results_path, **options})
        self._hparams_initial = copy.deepcopy(self._hparams)
        given = {name: value for name, value in options.items() if value is not None and name != "method"}
        self.config = method_config(options.get("method") or "dlmi", **given)  # unset: the method's defaults
        self.given = given
        self.exact_match = ExactMatch()
        self.lcs = LCSRatio()
        self.optimisation_steps = 0
        self._finished_rows: list[list[str]] = []
        self._pending: dict | None = None  # an interrupted batch restored from a checkpoint
        self.__dict__["_batch"] = None  # not a submodule: its state travels in on_save_checkpoint

    def setup(self, stage: str) -> None:
        super().setup(stage)
        # DLMI's optimisation forwards follow the trainer's precision; the baselines stay float32 as published.
        if "compute_dtype" not in self.given and self.config.method == "dlmi" and self.precision_dtype() != "float32":
            self.config = replace(self.config, compute_dtype=self.precision_dtype())

    def training_step(self, targets: list[OutputTarget], batch_idx: int) -> None:
        ids = [t.id for t in targets]
        batch = self._restore(ids)
        if batch is None:
            done = self.finished_ids()
            todo = [t for t in targets if t.id not in done]
            if not todo:
                return
            batch = make_batch(self.load(), [t.ids for t in todo], self.config, keys=[t.id for t in todo])
            batch.target_names = [t.id for t in todo]
            batch.batch_ids = ids
        self.__dict__["_batch"] = batch
        c = self.config
        # One Lightning step runs a batch to the end, so the steps inside it get an inner bar.
        bar = inner_progress(self, c.num_steps, f"{', '.join(batch.target_names)} steps")
        bar.update(int(batch.steps.max()))
        try:
            while not batch.finished:
                stats = batch.step()
                bar.update(1)
                self.optimisation_steps += 1
                running = ~batch.done
                scalars = {"dlmi/loss": float(stats.loss[stats.loss == stats.loss].mean()),
                           "dlmi/soft_lcs": float(stats.soft_lcs.mean())}
                taus = stats.tau[running]
                if running.any() and bool(torch.isfinite(taus).all()):  # methods without a temperature: nan
                    scalars["dlmi/mean_tau"] = float(taus.mean())
                log_scalars(self, scalars, self.optimisation_steps)
                steps = int(batch.steps.max())
                if steps % c.check_every == 0 or steps >= c.num_steps:
                    results = batch.check()
                    honest = [r.lcs_ratio for r in results]
                    bar.set_postfix(honest_lcs=f"{max(honest):.2f}", exact=sum(r.exact_match for r in results))
                    log_scalars(self, {"dlmi/honest_lcs": sum(honest) / len(results),
                                       "dlmi/exact_match_rate": sum(r.exact_match for r in results) / len(results)},
                                self.optimisation_steps)
                    self._write_finished(batch)
                if steps % self.hparams.checkpoint_every == 0:
                    self.save_last_checkpoint()
        finally:
            bar.close()
        self._write_finished(batch)
        self.__dict__["_batch"] = None

    def _write_finished(self, batch: TargetBatch) -> None:
        """Append each target's record as soon as it stops (matched, or out of steps)."""
        for b, name in enumerate(batch.target_names):
            stopped = bool(batch.done[b]) or int(batch.steps[b]) >= self.config.num_steps
            if stopped and name not in self.writer.done_ids:
                result = batch.result(b)
                self.writer.write(dlmi_record(name, result))
                self.exact_match.update([result.output_ids], [result.target_ids])
                self.lcs.update([result.output_ids], [result.target_ids])
                self.targets_done += 1
                self._finished_rows.append([name, decode(self.load().tokenizer, result.target_ids), result.prompt_text,
                                            result.output_text, f"{result.lcs_ratio:.2f}",
                                            "yes" if result.exact_match else "no"])
                log_scalars(self, {"dlmi/finished_honest_lcs": self.lcs.local_mean(),
                                   "dlmi/finished_exact_match_rate": self.exact_match.local_mean()}, self.targets_done)
                # One table of every target finished so far.
                log_text(self, "dlmi/finished_targets", markdown_table(
                    ["target id", "target", "prompt", "output", "honest LCS", "exact"], self._finished_rows),
                    self.optimisation_steps)
                say(f"[{name}] {'EXACT' if result.exact_match else 'partial'} lcs={result.lcs_ratio:.2f} "
                      f"soft_lcs={result.soft_lcs_ratio:.2f} steps={result.steps} {result.seconds:.1f}s "
                      f"prompt={result.prompt_text!r} -> {result.output_text!r}")

    def _restore(self, ids: list[str]) -> TargetBatch | None:
        pending, self._pending = self._pending, None
        if pending is None or pending["batch_ids"] != ids:
            return None
        targets = [t for t in pending["target_ids"]]
        batch = make_batch(self.load(), targets, self.config, keys=pending["target_names"])
        batch.load_state_dict(pending["state"])
        batch.target_names, batch.batch_ids = pending["target_names"], ids
        return batch

    def summarize(self, records: list[dict]) -> str:
        label = LABELS[self.config.method]
        if not records:
            return f"{label}: no targets"
        exact = sum(bool(r["exact_match"]) for r in records)
        lcs = sum(r["lcs_ratio"] for r in records) / len(records)
        soft = sum(r["soft_lcs_ratio"] for r in records) / len(records)
        return (f"{label}: {len(records)} targets, exact match {exact}/{len(records)}, honest LCS {lcs:.2f} "
                f"(paper-style soft LCS {soft:.2f})")

    def run_settings(self) -> dict:
        c = self.config
        return {"model": self.hparams.model_name_or_path, "method": c.method, "prompt_length": c.prompt_length,
                "num_steps": c.num_steps, "init": c.init}

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        super().on_save_checkpoint(checkpoint)
        checkpoint["optimisation_steps"] = self.optimisation_steps
        batch = self.__dict__["_batch"]
        if batch is not None and not batch.finished:
            checkpoint["dlmi_batch"] = {"batch_ids": batch.batch_ids, "target_names": batch.target_names,
                                        "target_ids": [batch.target_ids[b, :n].tolist() for b, n in enumerate(batch.lengths)],
                                        "state": batch.state_dict()}

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        super().on_load_checkpoint(checkpoint)
        self.optimisation_steps = int(checkpoint.get("optimisation_steps", 0))
        self._pending = checkpoint.get("dlmi_batch")


CONFIG_FIELDS = {f.name: f for f in fields(BaselineConfig)}


def _config_signature() -> inspect.Signature:
    """DlmiModule's signature: its own arguments, then every BaselineConfig field as `X | None = None`
    (the CLI parser reads this, so each field is a `--model.X` option)."""
    hints = typing.get_type_hints(BaselineConfig)
    own = list(inspect.signature(DlmiModule.__init__).parameters.values())[:-1]  # drop **options
    extra = [inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=None,
                               annotation=hints[name] | None)
             for name in CONFIG_FIELDS]
    return inspect.Signature(own + extra)


DlmiModule.__init__.__signature__ = _config_signature()
