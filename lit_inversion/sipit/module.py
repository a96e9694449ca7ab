"""SIP-It as a Lightning job: one training step inverts one target and appends its record.

`method: PezConfig` runs the HardPrompts (PEZ) baseline instead, on the same targets and record
fields; brute force is SipItConfig's `policy: random`.
"""

from __future__ import annotations

import time

from dataclasses import replace

import torch
from lightning.pytorch.utilities.exceptions import SIGTERMException

from lit_inversion.console import inner_progress, say
from lit_inversion.errors import InversionError
from lit_inversion.metrics import ExactMatch, TokenAccuracy
from lit_inversion.job import InversionJob
from lit_inversion.models import DEFAULT_MODEL
from lit_inversion.sipit.algorithm import SipItResult, capture_probe, invert
from lit_inversion.sipit.config import SipItConfig, StatesConfig
from lit_inversion.sipit.data import StateTarget
from lit_inversion.sipit.pez import PezConfig, invert_pez
from lit_inversion.sipit.index import TokenIndex, build_index
from lit_inversion.states import LayerProbe
from lit_inversion.tokens import context_prefix, decode
from lit_inversion.tracking import log_scalars, log_text, markdown_table


def sipit_record(target_id: str, result: SipItResult, tokenizer, layer: int) -> dict:
    return {
        "id": target_id,
        "true_ids": result.true_ids,
        "recovered_ids": result.recovered_ids,
        "recovered_text": decode(tokenizer, result.recovered_ids),
        "exact_match": result.exact_match,
        "token_accuracy": result.token_accuracy,
        "seconds": round(result.seconds, 4),
        "candidates_tested": result.candidates_tested,
        "max_distance": result.max_distance,
        "verified": result.verified,
        "certified": result.certified,
        "confidence": result.confidence,
        "layer": layer,
    }


class SipItModule(InversionJob):
    """Inverts hidden states to prompts. The frozen LM is not a submodule: checkpoints stay small.

    Args:
        model_name_or_path: a Hugging Face model id or local directory, or smollm2-135m (the default model).
        method: the method and its options: SipItConfig (null: its defaults; `policy: random` is brute
            force) or PezConfig (`--model.method.help SipItConfig` lists a method's options).
        prepend_bos: the states were captured after [BOS]; false for states captured without it (the
            targets this job captures follow it too).
        results_path: the JSONL file each finished target's record is appended to.
        dtype: the frozen model's dtype: auto or float32 (exact verification needs float32).
    """

    progress_unit = "targets"

    def __init__(self, model_name_or_path: str = DEFAULT_MODEL, method: StatesConfig | None = None,
                 prepend_bos: bool = True, results_path: str = "results/sipit.jsonl", dtype: str = "auto"):
        super().__init__(model_name_or_path, results_path, dtype)
        self.save_hyperparameters()
        if dtype not in ("auto", "float32"):
            raise InversionError(f"--model.dtype {dtype}: SIP-It loads the model in float32, which exact "
                                 "verification needs; bf16/fp16 captures are verified on a copy cast for them "
                                 "(set --data.capture_dtype), so use auto or float32")
        if method is not None and not isinstance(method, (SipItConfig, PezConfig)):
            raise InversionError(f"method must be SipItConfig (SIP-It; policy: random for brute force) or "
                                 f"PezConfig (HardPrompts), got {method!r}: e.g. --model.method PezConfig")
        self.config = method or SipItConfig()
        self.exact_match = ExactMatch()
        self.token_accuracy = TokenAccuracy()
        self._probes: dict[int, LayerProbe] = {}
        self._capture_probes: dict[tuple[int, str], LayerProbe] = {}  # verifiers for low-precision captures
        self._indexes: dict[int, TokenIndex] = {}
        self._target_rows: list[list[str]] = []  # TensorBoard's table of every target so far
        self.positions_done = 0

    def model_dtype(self) -> str:
        return "float32"  # exact verification needs float32 weights (low-precision captures get a cast copy)

    def probe(self, layer: int) -> LayerProbe:
        if layer not in self._probes:
            self._probes[layer] = LayerProbe(self.load(), layer)
        return self._probes[layer]

    def prefix(self) -> list[int]:
        return context_prefix(self.load().bos_id, self.hparams.prepend_bos)

    # Lightning hooks -------------------------------------------------------------------------
    def training_step(self, target: StateTarget | None, batch_idx: int) -> None:
        if target is None:  # a padding slot: this rank's shard is one shorter
            return
        probe = self.probe(target.layer)
        if isinstance(self.config, PezConfig):
            result = invert_pez(probe, target.states.to(probe.device), self.prefix(), self.config,
                                true_ids=target.true_ids)
        else:
            if target.layer not in self._indexes:  # the policies' index of the layer's table, built once
                started = time.perf_counter()
                self._indexes[target.layer] = build_index(probe, self.prefix(), self.config)
                if time.perf_counter() - started > 5:  # built, not read from the cache
                    say(f"layer {target.layer}: built the first-position table and token map in "
                        f"{time.perf_counter() - started:.0f}s (cached for later runs)")
            dtype = target.capture_dtype
            if dtype != "float32" and self.config.verify_in == "capture" and (target.layer, dtype) not in self._capture_probes:
                self._capture_probes[(target.layer, dtype)] = capture_probe(probe, dtype)
            bar = inner_progress(self, len(target.states), f"{target.id} positions")

            def on_position(t: int, token: int, tested: int) -> None:
                if self.trainer.received_sigterm:  # abandon this target (it is redone on resume): exit now
                    raise SIGTERMException
                bar.update(1)
                bar.set_postfix(candidates=tested)
                self.positions_done += 1
                log_scalars(self, {"sipit/candidates_at_position": tested}, self.positions_done)

            try:
                result = invert(probe, target.states.to(probe.device), self.prefix(), self.config,
                                true_ids=target.true_ids, table=self._indexes[target.layer], capture_dtype=dtype,
                                verifier_probe=self._capture_probes.get((target.layer, dtype)), on_position=on_position)
            finally:
                bar.close()
        record = sipit_record(target.id, result, self.load().tokenizer, target.layer)
        self.writer.write(record)
        self.targets_done += 1
        tested = torch.tensor(result.candidates_tested, dtype=torch.float, device="cpu")
        metrics = {
            "sipit/candidates_per_position": float(tested.mean()),
            "sipit/seconds_per_token": result.seconds / max(1, len(result.recovered_ids)),
            "sipit/verified_fraction": sum(result.verified) / max(1, len(result.verified)),
        }
        if result.true_ids is not None:
            self.exact_match.update([result.recovered_ids], [result.true_ids])
            self.token_accuracy.update([result.recovered_ids], [result.true_ids])
            metrics["sipit/exact_match"] = float(result.exact_match)
            metrics["sipit/exact_match_rate"] = self.exact_match.local_mean()
        log_scalars(self, metrics, self.targets_done)
        self._log_tables(target, result, record)
        status = "exact" if result.exact_match else ("verified" if all(result.verified) else "UNVERIFIED")
        if result.true_ids is not None and not result.exact_match:
            status = "MISMATCH"
        say(f"[{target.id}] {status} {len(result.recovered_ids)} tokens in {result.seconds:.1f}s "
              f"({float(tested.mean()):.0f} candidates/token): {record['recovered_text']!r}")

    def run_metrics(self) -> dict:
        return {"sipit/run_exact_match_rate": self.exact_match, "sipit/run_token_accuracy": self.token_accuracy}

    def summarize(self, records: list[dict]) -> str:
        scored = [r for r in records if r["true_ids"] is not None]
        tokens = sum(len(r["recovered_ids"]) for r in records)
        seconds = sum(r["seconds"] for r in records)
        line = f"{self.config.label}: {len(records)} targets, {seconds / max(1, tokens):.2f} s/token"
        if scored:
            exact = sum(bool(r["exact_match"]) for r in scored)
            accuracy = sum(r["token_accuracy"] for r in scored) / len(scored)
            line += f", exact match {exact}/{len(scored)} ({exact / len(scored):.0%}), token accuracy {accuracy:.1%}"
        unverified = sum(not all(r["verified"]) for r in records)
        return line + (f", {unverified} with unverified positions" if unverified else "")

    def _log_tables(self, target: StateTarget, result: SipItResult, record: dict) -> None:
        """TensorBoard text: one row per target so far, and this target's positions."""
        tokenizer = self.load().tokenizer
        true_text = decode(tokenizer, result.true_ids) if result.true_ids is not None else "(unknown)"
        exact = "unknown" if result.exact_match is None else ("yes" if result.exact_match else "no")
        self._target_rows.append([target.id, true_text, record["recovered_text"], exact,
                                  f"{result.seconds:.1f}", f"{sum(result.candidates_tested) / max(1, len(result.candidates_tested)):.0f}"])
        log_text(self, "sipit/all_targets", markdown_table(
            ["target", "true text", "recovered text", "exact", "seconds", "candidates/token"], self._target_rows),
            self.targets_done)
        truth = result.true_ids or [None] * len(result.recovered_ids)
        rows = [[str(t), repr(decode(tokenizer, [token])), "" if true is None else repr(decode(tokenizer, [true])),
                 str(tested), f"{confidence:.2f}", "yes" if verified else "no"]
                for t, (token, true, tested, confidence, verified) in enumerate(
                    zip(result.recovered_ids, truth, result.candidates_tested, result.confidence, result.verified))]
        log_text(self, f"sipit/positions/{target.id}", markdown_table(
            ["position", "recovered", "true", "candidates", "confidence", "verified"], rows), self.targets_done)

    def run_settings(self) -> dict:
        h = self.hparams
        data = self.trainer.datamodule.hparams
        settings = {"model": h.model_name_or_path, "method": self.config.name, "layer": data.layer,
                    "prepend_bos": h.prepend_bos, "capture_dtype": data.get("capture_dtype", "float32")}
        if isinstance(self.config, PezConfig):
            settings["num_steps"] = self.config.num_steps
        else:
            settings.update(policy=self.config.policy, max_candidates=self.config.max_candidates)
        return settings

    def setup(self, stage: str) -> None:
        super().setup(stage)
        # "auto" ranking chains follow a mixed-precision trainer.
        if isinstance(self.config, SipItConfig) and self.config.chain_dtype == "auto" and self.precision_dtype() != "float32":
            self.config = replace(self.config, chain_dtype=self.precision_dtype())

    def teardown(self, stage: str) -> None:
        for probe in [*self._probes.values(), *self._capture_probes.values()]:
            probe.close()
        self._probes.clear()
        self._capture_probes.clear()
