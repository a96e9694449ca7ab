"""Captured batches of different lengths (left- or right-padded, as plain transformers makes them), one
BOS option for the model and the data, and a user's file never cut silently."""

from __future__ import annotations

import subprocess

import pytest
import torch
import yaml
from safetensors.torch import save_file

from lit_inversion import invert_hidden_states, load_model
from lit_inversion.errors import InversionError
from lit_inversion.results import read_results
from lit_inversion.sipit.data import HiddenStatesDataModule, read_states
from tests.conftest import ROOT, cli_command
from tests.test_cli import _env, _job_config

LAYER = 2
PROMPTS = [[5, 9, 13, 40, 77, 8], [60, 3, 21], [33, 34, 35, 36, 90, 91, 11, 12], [70]]


def _padded_capture(loaded, side: str, bos: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """States [B, T, d] and mask [B, T] of a padded batch, captured by a plain Hugging Face forward.

    The project's convention has no BOS row, so a BOS column is cut (right padding) or masked out (left)."""
    rows = [([loaded.bos_id] if bos else []) + ids for ids in PROMPTS]
    width = max(map(len, rows))
    pad = loaded.tokenizer.pad_token_id
    ids = torch.full((len(rows), width), pad)
    mask = torch.zeros(len(rows), width, dtype=torch.long)
    for i, row in enumerate(rows):
        span = slice(0, len(row)) if side == "right" else slice(width - len(row), width)
        ids[i, span], mask[i, span] = torch.tensor(row), 1
    with torch.no_grad():
        states = loaded.model(ids, attention_mask=mask, output_hidden_states=True).hidden_states[LAYER]
    if bos and side == "right":
        states, mask = states[:, 1:], mask[:, 1:]
    elif bos:
        mask = mask.clone()
        mask[torch.arange(len(rows)), width - torch.tensor(list(map(len, rows)))] = 0
    return states, mask


@pytest.mark.parametrize("side", ["left", "right"])
def test_padded_batches_are_cut_to_their_real_positions(side, tiny_llama, tmp_path):
    states, mask = _padded_capture(tiny_llama, side, bos=True)
    path = tmp_path / "captured.safetensors"
    save_file({"states": states.contiguous(), "attention_mask": mask.contiguous()}, str(path))
    targets = HiddenStatesDataModule(layer=LAYER, states_file=str(path)).build_targets(tiny_llama)
    assert [t.id for t in targets] == [f"captured-{i}" for i in range(len(PROMPTS))]
    assert [len(t.states) for t in targets] == list(map(len, PROMPTS))
    for target, ids in zip(targets, PROMPTS):
        assert target.true_ids is None
        assert invert_hidden_states(target.states, model=tiny_llama, layer=LAYER).recovered_ids == ids
    if side == "right":  # lengths alone mean right padding
        save_file({"states": states.contiguous(), "lengths": mask.sum(1)}, str(path))
        assert [len(s) for s in read_states(path, 32)] == list(map(len, PROMPTS))


@pytest.mark.slow
def test_no_bos_left_padded_capture_through_the_cli(tiny_llama_dir, tmp_path):
    """`--model.prepend_bos false` alone: the targets and the inversion both follow it."""
    loaded = load_model(str(tiny_llama_dir))
    states, mask = _padded_capture(loaded, "left", bos=False)
    path = tmp_path / "nobos.pt"
    torch.save({"states": states, "attention_mask": mask}, path)
    config = _job_config(tmp_path, f"""
model:
  class_path: lit_inversion.sipit.SipItModule
  init_args: {{model_name_or_path: {tiny_llama_dir}}}
data:
  class_path: lit_inversion.sipit.HiddenStatesDataModule
  init_args: {{layer: {LAYER}, states_file: {path}}}
""")
    run = subprocess.run(cli_command() + ["fit", "--config", str(config), "--model.prepend_bos", "false"],
                         capture_output=True, text=True, env=_env(), timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    records = read_results(tmp_path / "results.jsonl")
    assert [r["id"] for r in records] == [f"nobos-{i}" for i in range(len(PROMPTS))]
    assert [r["recovered_ids"] for r in records] == PROMPTS
    assert all(all(r["verified"]) for r in records)
    assert "using the first" not in run.stdout  # no limit set: nothing cut


@pytest.mark.parametrize("padding, problem", [
    ({"lengths": torch.tensor([3, 0])}, r"must be within 1\.\.4 .* row 1 has 0"),
    ({"lengths": torch.tensor([3, 9])}, r"row 1 has 9"),
    ({"lengths": torch.tensor([3])}, r"shape \[1\] but the states hold 2 row"),
    ({"lengths": torch.tensor([3.0, 2.0])}, "save the real lengths as integers"),
    ({"attention_mask": torch.ones(2, 3)}, r"shape \[2, 3\] but the states are \[2, 4, d\]"),
    ({"attention_mask": torch.tensor([[1, 1, 1, 1], [0, 2, 1, 1]])}, "only 0 and 1"),
    ({"attention_mask": torch.tensor([[1, 1, 1, 1], [0, 1, 1, 0]])}, "row 1 .* neither left- nor right-padded"),
    ({"attention_mask": torch.tensor([[1, 1, 1, 1], [0, 0, 0, 0]])}, "row 1 .* has no real token"),
    ({"attention_mask": torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0]]), "lengths": torch.tensor([4, 3])}, "disagree"),
])
def test_inconsistent_lengths_and_masks_fail_clearly(padding, problem, tmp_path):
    path = tmp_path / "bad.safetensors"
    save_file({"states": torch.randn(2, 4, 32), **padding}, str(path))
    with pytest.raises(InversionError, match=problem):
        read_states(path, 32)


def test_padding_positions_may_hold_anything(tmp_path):
    states = torch.randn(2, 4, 32)
    states[0, :2] = float("nan")  # left padding a capture tool filled with NaN
    path = tmp_path / "padded.safetensors"
    save_file({"states": states, "attention_mask": torch.tensor([[0, 0, 1, 1], [1, 1, 1, 0]])}, str(path))
    rows = read_states(path, 32)
    assert torch.equal(rows[0], states[0, 2:]) and torch.equal(rows[1], states[1, :3])
    save_file({"states": states, "attention_mask": torch.tensor([[0, 1, 1, 1], [1, 1, 1, 0]])}, str(path))
    with pytest.raises(InversionError, match=r"row 0, real positions\) contain NaN or inf"):
        read_states(path, 32)


def test_limit_cuts_loudly_and_only_when_set(tiny_llama, tmp_path, capsys):
    (tmp_path / "p.txt").write_text("w3 w4\nw5 w6\nw7 w8\n")
    every = HiddenStatesDataModule(layer=1, prompts_file=str(tmp_path / "p.txt")).build_targets(tiny_llama)
    assert len(every) == 3 and "using the first" not in capsys.readouterr().out
    cut = HiddenStatesDataModule(layer=1, prompts_file=str(tmp_path / "p.txt"), limit=2).build_targets(tiny_llama)
    assert [t.id for t in cut] == ["p-1", "p-2"]
    assert ("lit-inversion: using the first 2 of 3 targets (--data.limit 2; --data.limit null for all)"
            in capsys.readouterr().out)
    with pytest.raises(InversionError, match="--data.limit must be at least 1"):
        HiddenStatesDataModule(layer=1, prompts_file=str(tmp_path / "p.txt"), limit=0)
    shipped = yaml.safe_load((ROOT / "configs" / "sipit.yaml").read_text())
    assert "limit" not in shipped["data"]["init_args"]
