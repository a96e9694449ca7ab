"""What every inversion LightningModule shares: the frozen LM, the results writer, resume bookkeeping.

The frozen LM is not a registered submodule, so checkpoints hold only the inversion state, and
Lightning's precision plugins never cast its weights.
"""

from __future__ import annotations

import os

import lightning as L
import torch
from lightning.pytorch.callbacks import RichProgressBar, TQDMProgressBar
from torchmetrics import Metric

from lit_inversion.console import InversionProgressBar
from lit_inversion.distributed import check_strategy, finished_ids, merge_rank_results, rank_results_path
from lit_inversion.errors import InversionError
from lit_inversion.models import LoadedModel, load_model
from lit_inversion.precision import check_trainer_precision
from lit_inversion.results import ResultsWriter, check_settings
from lit_inversion.tracking import log_scalars


class InversionJob(L.LightningModule):
    progress_unit = "steps"  # what one training step is, for the progress bar

    def __init__(self, model_name_or_path: str, results_path: str, dtype: str = "auto"):
        super().__init__()
        self.automatic_optimization = False
        self._model_name_or_path = model_name_or_path
        if os.path.isdir(results_path):
            raise InversionError(f"--results_path {results_path} is a directory: name a file in it, "
                                 f"e.g. --results_path {os.path.join(results_path, 'results.jsonl')}")
        self._results_path = results_path
        self._dtype = dtype
        self._loaded: LoadedModel | None = None
        self._writer: ResultsWriter | None = None
        self._finished_at_start: set[str] | None = None
        self.targets_done = 0

    def load(self) -> LoadedModel:
        if self._loaded is None:
            device = self.trainer.strategy.root_device if self._trainer is not None else self.device
            self._loaded = load_model(self._model_name_or_path, device=device, dtype=self.model_dtype())
        return self._loaded

    def model_dtype(self) -> str:
        """The dtype the frozen LM is loaded in (`--model.dtype`; "auto": `precision.weights_dtype`'s rule)."""
        return self._dtype

    @property
    def writer(self) -> ResultsWriter:
        if self._writer is None:
            path = self._results_path
            if self._trainer is not None and self.trainer.world_size > 1:
                path = rank_results_path(path, self.trainer.global_rank)
            self._writer = ResultsWriter(path)
        return self._writer

    def finished_ids(self) -> set[str]:
        """Targets already done: on disk when the run started (every rank's file), plus this rank's since."""
        if self._finished_at_start is None:  # read once; during the run only this rank's writer adds ours
            check_settings(self._results_path, self.run_settings(), write=self._trainer is None or self.trainer.is_global_zero)
            self._finished_at_start = finished_ids(self._results_path)
        return self._finished_at_start | self.writer.done_ids

    def run_settings(self) -> dict:
        """The settings that shape this run's records; a results file only ever holds one set."""
        return {"model": self._model_name_or_path}

    def announce_targets(self, total: int, todo: int) -> None:
        """One line when earlier records cover some or all targets (Lightning would only say 'No training batches')."""
        if self._trainer is not None and not self.trainer.is_global_zero:
            return
        if total and todo == 0:
            print(f"lit-inversion: nothing to do: all {total} targets are already in {self._results_path} "
                  "(pass a new --results_path to run them again)", flush=True)
        elif todo < total:
            print(f"lit-inversion: resuming: {total - todo} of {total} targets are already in {self._results_path}",
                  flush=True)

    def configure_callbacks(self):
        # Lightning's own tqdm bar, labelled with what a step is here. It replaces Lightning's default
        # bar (Rich, where installed, is not a parent class, so Lightning would keep both); a bar the
        # user configured, or none, stays as it is.
        trainer = self._trainer
        if trainer is None or type(trainer.progress_bar_callback) not in (TQDMProgressBar, RichProgressBar):
            return []
        trainer.callbacks = [c for c in trainer.callbacks if c is not trainer.progress_bar_callback]
        return [InversionProgressBar(unit=self.progress_unit)]

    def setup(self, stage: str) -> None:
        # Both run before Lightning moves, casts or wraps anything (strategy.setup comes after this hook).
        check_strategy(self.trainer)
        check_trainer_precision(self.trainer.precision)

    def precision_dtype(self) -> str:
        """The trainer's precision as a compute dtype name: what unset dtype options follow."""
        precision = str(self.trainer.precision)
        return "bfloat16" if precision.startswith("bf16") else "float16" if precision.startswith("16") else "float32"

    def run_metrics(self) -> dict[str, Metric]:
        """This run's torchmetrics, by the name their value over every rank's targets is logged under."""
        return {}

    def on_train_epoch_end(self) -> None:
        metrics = self.run_metrics()
        if not metrics:
            return
        # compute() syncs across ranks, so every rank must call it, or none: decide on the summed counts.
        counts = self.trainer.strategy.reduce(torch.stack([m.count for m in metrics.values()]), reduce_op="sum")
        values = {name: float(m.compute()) for (name, m), n in zip(metrics.items(), counts.tolist()) if n > 0}
        if values:
            log_scalars(self, values, self.targets_done)

    def summarize(self, records: list[dict]) -> str:
        """One closing line for the run (all records in the results file, resumed ones included)."""
        raise NotImplementedError

    def on_train_end(self) -> None:
        from lit_inversion.results import read_results

        self.trainer.strategy.barrier("lit_inversion.merge_results")
        if self.trainer.is_global_zero:
            merge_rank_results(self._results_path)
        self.trainer.strategy.barrier("lit_inversion.merged_results")
        if self.trainer.is_global_zero:
            path = self._results_path
            print(self.summarize(read_results(path)) + f" | results: {path}", flush=True)

    def configure_optimizers(self):
        return None  # jobs own their per-target optimisers

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["targets_done"] = self.targets_done

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        self.targets_done = int(checkpoint.get("targets_done", 0))
        # The results file, not Lightning's loop counters, says what is left: the DataModules drop
        # finished targets, so restored batch counters would end the resumed epoch early.
        checkpoint.pop("loops", None)
