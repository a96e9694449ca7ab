"""Bad input gets one clear line that names the problem and the fix."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

from lit_inversion import InversionError, invert_hidden_states, load_model
from lit_inversion.sipit.data import HiddenStatesDataModule, read_prompts, read_states
from lit_inversion.states import LayerProbe


def test_hidden_size_mismatch_names_expected_size(tmp_path, tiny_llama):
    path = tmp_path / "s.safetensors"
    save_file({"states": torch.randn(5, 48)}, str(path))
    with pytest.raises(InversionError, match=r"hidden size 48 but the model's is 32"):
        read_states(path, tiny_llama.hidden_size)
    with pytest.raises(InversionError, match="hidden size 48"):
        invert_hidden_states(torch.randn(5, 48), model=tiny_llama, layer=1)


@pytest.mark.parametrize("layer", [5, -6, 100])
def test_layer_out_of_range(tiny_llama, layer):
    with pytest.raises(InversionError, match=r"layer .* out of range for a model with 4 layers: use 0 .* to 4"):
        LayerProbe(tiny_llama, layer)


def test_missing_and_empty_files(tmp_path, tiny_llama):
    with pytest.raises(InversionError, match="does not exist: check --data.prompts_file"):
        read_prompts(tmp_path / "nope.txt", tiny_llama.tokenizer, tiny_llama.vocab_size)
    (tmp_path / "empty.txt").write_text("\n\n")
    with pytest.raises(InversionError, match="is empty"):
        read_prompts(tmp_path / "empty.txt", tiny_llama.tokenizer, tiny_llama.vocab_size)
    (tmp_path / "empty.pt").write_bytes(b"")
    with pytest.raises(InversionError, match="is empty"):
        read_states(tmp_path / "empty.pt", 32)
    with pytest.raises(InversionError, match="does not exist: check --data.states_file"):
        read_states(tmp_path / "nope.pt", 32)


def test_truncated_and_wrong_content_files(tmp_path):
    good = tmp_path / "good.pt"
    torch.save(torch.randn(4, 32), good)
    cut = tmp_path / "cut.pt"
    cut.write_bytes(good.read_bytes()[:50])
    with pytest.raises(InversionError, match="cannot read states file"):
        read_states(cut, 32)
    text = tmp_path / "text.safetensors"
    text.write_text("not a tensor file")
    with pytest.raises(InversionError, match="cannot read states file"):
        read_states(text, 32)
    torch.save({"other": "x"}, tmp_path / "obj.pt")
    with pytest.raises(InversionError):
        read_states(tmp_path / "obj.pt", 32)
    torch.save(torch.randn(2, 3, 4, 32), tmp_path / "4d.pt")
    with pytest.raises(InversionError, match=r"expected \[T, d\] or \[B, T, d\]"):
        read_states(tmp_path / "4d.pt", 32)


def test_nan_and_inf_states(tmp_path, tiny_llama):
    states = torch.randn(3, 32)
    states[1, 4] = float("nan")
    torch.save(states, tmp_path / "nan.pt")
    with pytest.raises(InversionError, match="NaN or inf"):
        read_states(tmp_path / "nan.pt", 32)
    states[1, 4] = float("inf")
    with pytest.raises(InversionError, match="NaN or inf"):
        invert_hidden_states(states, model=tiny_llama, layer=1)


def test_prompt_longer_than_context(tmp_path, tiny_llama):
    (tmp_path / "long.txt").write_text(" ".join(["w5"] * 80) + "\n")
    dm = HiddenStatesDataModule(layer=1, prompts_file=str(tmp_path / "long.txt"))
    with pytest.raises(InversionError, match="needs 81 positions but the model's context is 64"):
        dm.build_targets(tiny_llama)


def test_bad_jsonl_and_ids_outside_vocab(tmp_path, tiny_llama):
    (tmp_path / "bad.jsonl").write_text('{"text": "w4 w5"}\n{oops\n')
    with pytest.raises(InversionError, match=r"bad.jsonl:2 is not valid JSON"):
        read_prompts(tmp_path / "bad.jsonl", tiny_llama.tokenizer, tiny_llama.vocab_size)
    (tmp_path / "ids.jsonl").write_text('{"ids": [4, 500]}\n')
    with pytest.raises(InversionError, match=r"outside the vocabulary \[0, 96\)"):
        read_prompts(tmp_path / "ids.jsonl", tiny_llama.tokenizer, tiny_llama.vocab_size)
    (tmp_path / "latin1.txt").write_bytes("caf\xe9\n".encode("latin-1"))
    with pytest.raises(InversionError, match="not UTF-8"):
        read_prompts(tmp_path / "latin1.txt", tiny_llama.tokenizer, tiny_llama.vocab_size)


def test_unreachable_model_says_what_was_tried(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(InversionError, match="could not load model 'no-such-org/no-such-model'"):
        load_model("no-such-org/no-such-model")
    with pytest.raises(InversionError, match="does not exist"):
        load_model(str(tmp_path / "missing-dir"))
    with pytest.raises(InversionError, match="GGUF file .* does not exist"):
        load_model(str(tmp_path / "m.gguf"))


def test_no_targets_configured():
    with pytest.raises(InversionError, match="no targets"):
        HiddenStatesDataModule(layer=1)


def test_bad_sipit_options():
    from lit_inversion.sipit.algorithm import SipItConfig

    with pytest.raises(InversionError, match="policy 'greedy' is unknown: use 'gradient' or 'random'"):
        SipItConfig(policy="greedy")
    with pytest.raises(InversionError, match="batch_size must be at least 1"):
        SipItConfig(batch_size=0)
    with pytest.raises(InversionError, match="screen_dtype 'int8' is unknown: use auto, float32, bfloat16 or float16"):
        SipItConfig(screen_dtype="int8")
    with pytest.raises(InversionError, match="surrogate_rank must be 0 \\(off\\) or positive"):
        SipItConfig(surrogate_rank=-1)
