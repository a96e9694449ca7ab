"""Targets for SIP-It: hidden states at one layer, with the true ids when they are known.

Sources: a prompts file (`.txt`, one prompt per line, or `.jsonl` with {"text": ...} or {"ids": [...]}),
seeded random-token prompts, or captured states (`.safetensors` / `.pt`, shape [T, d] or [B, T, d])
with no true ids, which is the real attack scenario. A padded batch of captures carries `lengths` ([B],
right padding) or `attention_mask` ([B, T], 1 = real token, left or right padding) beside `states`;
each row is cut to its real positions.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import lightning as L
import torch
from torch.utils.data import DataLoader

from lit_inversion.errors import InversionError
from lit_inversion.models import LoadedModel
from lit_inversion.states import LayerProbe
from lit_inversion.distributed import shard
from lit_inversion.sequences import ListDataset, apply_limit, read_sequences
from lit_inversion.sipit.algorithm import capture_probe
from lit_inversion.sipit.config import check_capture_dtype
from lit_inversion.tokens import context_prefix


@dataclass
class StateTarget:
    id: str
    states: torch.Tensor  # [T, d] float32
    true_ids: list[int] | None
    layer: int
    capture_dtype: str = "float32"  # the dtype the model ran in when the states were computed


def read_prompts(path: str | Path, tokenizer, vocab_size: int) -> list[tuple[str, list[int]]]:
    """(id, token ids) for each prompt in a .txt or .jsonl file."""
    return read_sequences(path, tokenizer, vocab_size, option="--data.prompts_file")


def random_prompts(count: int, length: int, vocab_size: int, seed: int) -> list[tuple[str, list[int]]]:
    generator = torch.Generator(device="cpu").manual_seed(seed)
    return [(f"random-{seed}-{i}", torch.randint(0, vocab_size, (length,), generator=generator, device="cpu").tolist())
            for i in range(count)]


def read_states(path: str | Path, hidden_size: int) -> list[torch.Tensor]:
    """Captured states from .safetensors or .pt (the tensor named 'states', or the only one); each [T, d]
    float32, cut to its real positions when the file carries `lengths` or `attention_mask`."""
    path = Path(path)
    if not path.is_file():
        raise InversionError(f"states file {path} does not exist: check --data.states_file")
    if path.stat().st_size == 0:
        raise InversionError(f"states file {path} is empty: save a [T, d] or [B, T, d] tensor in it")
    reader = "safetensors" if path.suffix == ".safetensors" else "torch.load"
    try:
        if reader == "safetensors":
            from safetensors.torch import load_file

            loaded = load_file(str(path))
        else:
            loaded = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # corrupt or truncated files fail inside the loaders in many ways
        raise InversionError(f"cannot read states file {path} with {reader} ({type(err).__name__}; the extension "
                             "picks the reader): save it with safetensors.torch.save_file({'states': tensor}) as "
                             ".safetensors or torch.save(tensor) as .pt") from None
    padding = {}
    if isinstance(loaded, dict):
        padding = {name: loaded[name] for name in _PADDING if name in loaded}
        loaded = {name: value for name, value in loaded.items() if name not in _PADDING}
    states = _pick_states(loaded, path)
    if not isinstance(states, torch.Tensor):
        raise InversionError(f"states file {path} does not hold a tensor: save a [T, d] or [B, T, d] tensor")
    if states.is_nested or states.is_meta or states.layout != torch.strided:  # no dense values to index
        kind = "nested" if states.is_nested else "meta" if states.is_meta else str(states.layout).removeprefix("torch.")
        raise InversionError(f"states in {path} are a {kind} tensor: save a plain dense tensor with values "
                             "(tensor.to_dense() for a sparse one)")
    if states.dim() == 2:
        states = states[None]
    if states.dim() != 3 or states.shape[0] == 0 or states.shape[1] == 0:
        raise InversionError(f"states in {path} have shape {list(states.shape)}: "
                             "expected [T, d] or [B, T, d] with B, T >= 1")
    if states.shape[-1] != hidden_size:
        raise InversionError(f"states in {path} have hidden size {states.shape[-1]} but the model's is {hidden_size}: "
                             "capture them from the same model, or pick the matching --model.model_name_or_path")
    if not states.is_floating_point():
        raise InversionError(f"states in {path} have dtype {states.dtype}: expected floating point")
    spans = real_positions(states.shape[0], states.shape[1], padding, path)
    rows = []
    for i, (begin, end) in enumerate(spans):
        raw = states[i, begin:end].detach()
        row = raw.float()
        if not bool(torch.isfinite(row).all()):
            where = f"states in {path}" + (f" (row {i}, real positions)" if padding else "")
            if bool(torch.isfinite(raw.double()).all()):  # finite in the file, too large for float32
                raise InversionError(f"{where} ({states.dtype}) have values beyond float32's range (3.4e38): "
                                     "rescale or recapture them")
            raise InversionError(f"{where} contain NaN or inf: remove or recapture those rows")
        rows.append(row)
    return rows


_PADDING = ("lengths", "attention_mask")


def real_positions(batch: int, length: int, padding: dict, path: Path) -> list[tuple[int, int]]:
    """[begin, end) of each row's real positions: all of them, or as `lengths` / `attention_mask` say."""
    for name, value in padding.items():
        if not isinstance(value, torch.Tensor) or value.is_nested or value.layout != torch.strided or value.is_meta:
            raise InversionError(f"'{name}' in states file {path} is not a dense tensor: save it as a tensor")
    spans = [(0, length)] * batch
    lengths = padding.get("lengths")
    if lengths is not None:
        if lengths.is_floating_point() or lengths.is_complex() or lengths.dtype == torch.bool:
            raise InversionError(f"'lengths' in states file {path} has dtype {lengths.dtype}: "
                                 "save the real lengths as integers")
        if lengths.dim() > 1 or lengths.numel() != batch:
            raise InversionError(f"'lengths' in states file {path} has shape {list(lengths.shape)} but the states hold "
                                 f"{batch} row(s): save one length per row, shape [{batch}]")
        values = [int(n) for n in lengths.reshape(-1)]
        bad = [(i, n) for i, n in enumerate(values) if not 1 <= n <= length]
        if bad:
            raise InversionError(f"'lengths' in states file {path} must be within 1..{length} (the states' T); "
                                 f"row {bad[0][0]} has {bad[0][1]}")
        spans = [(0, n) for n in values]  # lengths alone: right padding, real positions first
    mask = padding.get("attention_mask")
    if mask is not None:
        mask = mask[None] if mask.dim() == 1 else mask
        if list(mask.shape) != [batch, length]:
            raise InversionError(f"'attention_mask' in states file {path} has shape {list(mask.shape)} but the states "
                                 f"are [{batch}, {length}, d]: save the [B, T] mask of the capture (1 = real token)")
        if mask.is_complex() or not bool(((mask == 0) | (mask == 1)).all()):
            raise InversionError(f"'attention_mask' in states file {path} must hold only 0 and 1 (1 = real token)")
        real = mask.bool()
        masked = []
        for i, row in enumerate(real):
            n = int(row.sum())
            if n == 0:
                raise InversionError(f"row {i} of 'attention_mask' in states file {path} has no real token: "
                                     "drop that row")
            if bool(row[:n].all()):
                masked.append((0, n))  # right padding
            elif bool(row[length - n:].all()):
                masked.append((length - n, length))  # left padding
            else:
                raise InversionError(f"row {i} of 'attention_mask' in states file {path} is neither left- nor "
                                     "right-padded: its 1s must form one block at the start or at the end")
        if lengths is not None and [end - begin for begin, end in masked] != [end - begin for begin, end in spans]:
            raise InversionError(f"'lengths' and 'attention_mask' in states file {path} disagree on the real "
                                 "lengths: save only one of them")
        spans = masked
    return spans


def _pick_states(loaded: object, path: Path) -> object:
    """The entry named 'states', or the only one; several others are ambiguous."""
    if not isinstance(loaded, dict):
        return loaded
    if "states" in loaded:
        return loaded["states"]
    if not loaded:
        raise InversionError(f"states file {path} holds no tensor: save one named 'states'")
    if len(loaded) > 1:
        names = sorted(str(name) for name in loaded)[:5]
        raise InversionError(f"states file {path} holds {len(loaded)} entries {names} and none is named 'states': "
                             "name the one to invert 'states'")
    return next(iter(loaded.values()))


def _single(batch: list[StateTarget | None]) -> StateTarget | None:
    return batch[0]  # None: a padding slot of a shard


class HiddenStatesDataModule(L.LightningDataModule):
    """Yields one `StateTarget` per step. Targets already in the results file are skipped.

    Args:
        layer: the layer the states come from (Hugging Face indexing: 0 = embeddings; the last layer is
            taken before the final norm).
        prompts_file: prompts whose states are computed: `.txt` (one per line) or `.jsonl` (`text` or `ids`).
        states_file: captured states, `.safetensors` or `.pt`, `[T, d]` or `[B, T, d]` (with
            `attention_mask` or `lengths` beside a padded batch); no true ids: the real attack.
        num_random: this many random-token prompts.
        random_length: the random prompts' length in tokens.
        num_tokens: cut every target to its first N positions.
        limit: invert only the first N targets (null: all).
        random_seed: seed of the random prompts.
        capture_dtype: the dtype the model ran in when the states were captured: float32, bfloat16 or float16.
    """

    def __init__(
        self,
        layer: int = 15,
        prompts_file: str | None = None,
        states_file: str | None = None,
        num_random: int = 0,
        random_length: int = 20,
        num_tokens: int | None = None,
        limit: int | None = None,
        random_seed: int = 0,
        capture_dtype: str = "float32",
    ):
        super().__init__()
        self.save_hyperparameters()
        check_capture_dtype(capture_dtype)
        if prompts_file is None and states_file is None and num_random <= 0:
            raise InversionError("no targets: set --data.prompts_file, --data.states_file or --data.num_random")
        if limit is not None and limit < 1:
            raise InversionError(f"--data.limit must be at least 1, or null for all targets (got {limit})")
        self.targets: list[StateTarget] = []

    def build_targets(self, loaded: LoadedModel, prepend_bos: bool = True) -> list[StateTarget]:
        """The targets, cut to `limit`. `prepend_bos` is the model's option (--model.prepend_bos), read in setup."""
        h = self.hparams
        probe = LayerProbe(loaded, h.layer)  # validates the layer first
        try:
            prefix = context_prefix(loaded.bos_id, prepend_bos)
            pending: list[tuple[str, torch.Tensor | None, list[int] | None]] = []  # (id, states, true ids)
            if h.states_file is not None:
                for i, states in enumerate(read_states(h.states_file, loaded.hidden_size)):
                    states = states[: h.num_tokens] if h.num_tokens else states
                    pending.append((f"{Path(h.states_file).stem}-{i}", states, None))
            prompts = []
            if h.prompts_file is not None:
                prompts += read_prompts(h.prompts_file, loaded.tokenizer, loaded.vocab_size)
            if h.num_random > 0:
                prompts += random_prompts(h.num_random, h.random_length, loaded.vocab_size, h.random_seed)
            for prompt_id, ids in prompts:
                ids = ids[: h.num_tokens] if h.num_tokens else ids
                check_context(len(prefix) + len(ids), loaded, f"prompt {prompt_id}")
                pending.append((prompt_id, None, ids))
            pending = apply_limit(pending, h.limit, loud=self.trainer is None or self.trainer.is_global_zero)
            # Prompts' states are computed as a stack serving in capture_dtype would (the model cast to it).
            computes = any(states is None for _, states, _ in pending) and h.capture_dtype != "float32"
            capture = capture_probe(probe, h.capture_dtype) if computes else probe
            try:
                return [StateTarget(target_id, capture.states(ids, prefix).cpu() if states is None else states, ids,
                                    probe.layer, h.capture_dtype) for target_id, states, ids in pending]
            finally:
                if capture is not probe:
                    capture.close()
        finally:
            probe.close()

    def setup(self, stage: str) -> None:
        module = self.trainer.lightning_module
        loaded = module.load()
        # One BOS option, the model's: the targets' states must be made with the prefix the inversion uses.
        targets = self.build_targets(loaded, prepend_bos=bool(module.hparams.get("prepend_bos", True)))
        done = module.finished_ids()
        todo = [t for t in targets if t.id not in done]
        module.announce_targets(len(targets), len(todo))
        # Balanced by length: a position costs about the same everywhere, so ranks finish together.
        self.targets = shard(todo, self.trainer.global_rank, self.trainer.world_size, size=lambda t: len(t.states))

    def train_dataloader(self) -> DataLoader:
        return DataLoader(ListDataset(self.targets), batch_size=1, shuffle=False, collate_fn=_single)


def check_context(length: int, loaded: LoadedModel, what: str) -> None:
    if loaded.max_positions is not None and length > loaded.max_positions:
        raise InversionError(f"{what} needs {length} positions but the model's context is {loaded.max_positions}: "
                             "shorten it, or set --data.num_tokens")
