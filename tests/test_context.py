"""Output inversion in context: chat templates and fixed text around the span, one scorer, records that
plain transformers can re-check."""

from __future__ import annotations

import csv
import json
from dataclasses import fields

import lightning as L
import pytest
import torch

from tests.conftest import add_chat_template, make_tiny_model
from lit_inversion.dlmi import DlmiConfig, DlmiModule, OutputTargetsDataModule, invert_output
from lit_inversion.dlmi.context import Context, render_context
from lit_inversion.dlmi.data import read_output_targets
from lit_inversion.dlmi.pool import TargetPool
from lit_inversion.dlmi.scorer import PromptScorer
from lit_inversion.errors import InversionError
from lit_inversion.models import load_model
from lit_inversion.results import read_results

BOS, EOS = 1, 2  # with conftest's CHAT_TEMPLATE
MESSAGES = [{"role": "system", "content": "w10 w11"}, {"role": "user", "content": "w20 {optim_str} w21"}]
# <s> w4 w10 w11 </s> <s> w3 w20 | span | w21 </s> <s> w5
BEFORE, AFTER = (BOS, 4, 10, 11, EOS, BOS, 3, 20), (21, EOS, BOS, 5)


@pytest.fixture(scope="module")
def chat_dir(tmp_path_factory):
    return add_chat_template(make_tiny_model(tmp_path_factory.mktemp("tiny-chat"), "llama", seed=3))


@pytest.fixture(scope="module")
def chat(chat_dir):
    return load_model(str(chat_dir))


def _render(loaded, **kw) -> Context:
    return render_context(loaded.tokenizer, loaded.bos_id, **kw)


def test_the_chat_template_is_split_at_the_span_with_no_second_bos(chat):
    assert chat.tokenizer.bos_token == "<s>"
    context = _render(chat, messages=MESSAGES)
    assert context == Context(BEFORE, AFTER)  # the text starts with <s>: no BOS added, none removed
    assert context.input_ids([7, 8]) == [*BEFORE, 7, 8, *AFTER]


def test_messages_without_the_span_marker_get_it_at_the_end_of_the_last_message(chat):
    context = _render(chat, messages=[{"role": "user", "content": "w20 w21"}])
    assert context == Context((BOS, 3, 20, 21), (EOS, BOS, 5))


def test_prefix_and_suffix_text_follow_bos(chat):
    assert _render(chat, prefix="w30 w31", suffix="w32") == Context((BOS, 30, 31), (32,))
    assert _render(chat, prefix="w30", prepend_bos=False) == Context((30,), ())


@pytest.mark.parametrize("kw, message", [
    ({"messages": [{"role": "user", "content": "{optim_str} w3 {optim_str}"}]}, "appears 2 times"),
    ({"messages": [{"role": "user"}]}, "must be a non-empty list"),
    ({"messages": MESSAGES, "prefix": "w3"}, 'give "messages" or "prefix"/"suffix", not both'),
    ({"prefix": "w3 {optim_str}"}, "the span goes between prefix and suffix"),
])
def test_bad_contexts_get_one_clear_error(chat, kw, message):
    with pytest.raises(InversionError, match=message):
        _render(chat, **kw)


def test_messages_for_a_model_without_a_chat_template_are_refused(tiny_llama):
    with pytest.raises(InversionError, match="has no chat template: give \"prefix\"/\"suffix\" text instead"):
        _render(tiny_llama, messages=MESSAGES)


def test_the_cached_context_scores_as_a_full_forward(chat):
    """Logits, gradient forwards and shared-prefix candidates agree with the context recomputed each time."""
    context = _render(chat, messages=MESSAGES)
    cached, full = PromptScorer(chat.model, context), PromptScorer(chat.model, context, cache_context=False)
    prompt, target = torch.tensor([40, 41, 42, 43]), torch.tensor([50, 51, 52])
    E = chat.model.get_input_embeddings().weight
    torch.testing.assert_close(cached.logits(E[prompt[None]], target[None]), full.logits(E[prompt[None]], target[None]))
    a, _, cache = cached.with_gradient(prompt, target)
    b, _, _ = full.with_gradient(prompt, target)
    torch.testing.assert_close(a, b)
    tokens = torch.tensor([60, 61, 62])
    torch.testing.assert_close(cached.candidates(prompt, 2, tokens, target, cache),
                               full.candidates(prompt, 2, tokens, target, None))
    # The plain model on the same ids.
    ids = torch.tensor([context.input_ids(prompt.tolist()) + target.tolist()[:-1]])
    plain = chat.model(input_ids=ids).logits[0, -3:]
    torch.testing.assert_close(a[0], plain, atol=1e-4, rtol=1e-4)


def _reachable(loaded, context: Context, prompt: list[int], length: int) -> list[int]:
    ids = torch.tensor([context.input_ids(prompt)])
    out = loaded.model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=length, do_sample=False,
                                pad_token_id=EOS)
    return out[0, ids.shape[1]:].tolist()


def _plain_decode(loaded, input_ids: list[int], length: int) -> list[int]:
    """Plain transformers: generate() from the record's input_ids."""
    ids = torch.tensor([input_ids])
    out = loaded.model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=length, do_sample=False,
                                pad_token_id=EOS)
    return out[0, ids.shape[1]:].tolist()


def test_invert_output_in_a_chat_finds_the_span_and_plain_transformers_agrees(chat):
    context = _render(chat, messages=MESSAGES)
    target = _reachable(chat, context, [30, 44, 57], 3)
    result = invert_output(target, model=chat, messages=MESSAGES, prompt_length=3, num_steps=64,
                           compute_dtype="float32", max_prompt_target_lcs=1.0, check_every=2)
    assert result.exact_match
    assert result.input_ids == [*BEFORE, *result.prompt_ids, *AFTER]
    assert _plain_decode(chat, result.input_ids, len(target)) == result.output_ids == target


def test_every_record_carries_input_ids_that_plain_transformers_rechecks(tmp_path, chat_dir, chat):
    """A CLI-shaped run over a chat JSONL (plus prefix/suffix and bare records): each record's input_ids is
    the context rendered around its prompt_ids, and greedy decoding of them agrees with exact_match."""
    chat_context = _render(chat, messages=MESSAGES)
    easy = _reachable(chat, chat_context, [30, 44], 2)
    rows = [{"id": "chat", "messages": MESSAGES, "ids": easy},
            {"id": "qa", "prefix": "w30 w31", "suffix": "w32", "text": "w70 w71 w72 w73 w74 w75"},
            {"id": "bare", "target": "w80 w81 w82 w83 w84 w85"}]
    path = tmp_path / "chat.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    module = DlmiModule(str(chat_dir), results_path=str(tmp_path / "results.jsonl"), prompt_length=2, num_steps=24,
                        method=DlmiConfig(check_every=2, compute_dtype="float32", max_prompt_target_lcs=1.0))
    data = OutputTargetsDataModule(targets_file=str(path), batch_size=2)
    trainer = L.Trainer(accelerator="cpu", devices=1, max_epochs=1, logger=False, enable_progress_bar=False,
                        enable_model_summary=False, use_distributed_sampler=False, default_root_dir=tmp_path,
                        enable_checkpointing=False)
    trainer.fit(module, datamodule=data)
    records = {r["id"]: r for r in read_results(tmp_path / "results.jsonl")}
    contexts = {"chat": chat_context, "qa": Context((BOS, 30, 31), (32,)), "bare": Context((BOS,))}
    for name, record in records.items():
        assert record["input_ids"] == contexts[name].input_ids(record["prompt_ids"])
        decoded = _plain_decode(chat, record["input_ids"], len(record["target_ids"]))
        assert decoded == record["output_ids"]
        assert record["exact_match"] == (decoded == record["target_ids"])
    assert records["chat"]["exact_match"]


def test_target_files_carry_contexts_and_csv_goals_become_user_turns(tmp_path, chat):
    rows = [{"id": "a", "messages": MESSAGES, "target": "w60 w61"},
            {"id": "b", "ids": [62, 63], "text": "w70"},  # ids win over text
            {"id": "c", "text": "w64", "prompt_ids": [5, 6], "prompt_text": "w5 w6"}]  # the known span is not used
    jsonl = tmp_path / "t.jsonl"
    jsonl.write_text("".join(json.dumps(r) + "\n" for r in rows))
    default = read_output_targets(jsonl, chat)
    assert [(t.id, t.ids, t.context) for t in default] == [
        ("a", [60, 61], Context(BEFORE, AFTER)), ("b", [62, 63], None), ("c", [64], None)]
    from lit_inversion.dlmi.data import ContextSpec

    with_default = read_output_targets(jsonl, chat, ContextSpec(prefix="w33"))
    assert [t.context for t in with_default] == [Context(BEFORE, AFTER), Context((BOS, 33)), Context((BOS, 33))]
    path = tmp_path / "bench.csv"
    with open(path, "w", newline="") as f:
        csv.writer(f).writerows([["goal", "target"], ["w20 w22", "w60 w61"]])
    (target,) = read_output_targets(path, chat)
    assert target.ids == [60, 61] and target.context == Context((BOS, 3, 20, 22), (EOS, BOS, 5))


@pytest.mark.parametrize("row, message", [
    ({"messages": [{"role": "user", "content": "{optim_str}{optim_str}"}], "ids": [5]}, "t.jsonl:1: \\{optim_str\\} appears 2 times"),
    ({"text": ""}, "the target of .*t.jsonl:1 is empty"),
    ({"prefix": 3, "ids": [5]}, '"prefix" must be a string'),
])
def test_bad_target_records_name_the_record(tmp_path, chat, row, message):
    path = tmp_path / "t.jsonl"
    path.write_text(json.dumps(row) + "\n")
    with pytest.raises(InversionError, match=message):
        read_output_targets(path, chat)


def test_a_context_too_long_for_the_model_names_the_target(tmp_path, chat_dir):
    path = tmp_path / "t.jsonl"
    path.write_text(json.dumps({"id": "long", "prefix": " ".join(["w9"] * 60), "ids": [5, 6]}) + "\n")
    module = DlmiModule(str(chat_dir), results_path=str(tmp_path / "r.jsonl"), prompt_length=2, num_steps=2)
    trainer = L.Trainer(accelerator="cpu", devices=1, max_epochs=1, logger=False, enable_progress_bar=False,
                        enable_model_summary=False, use_distributed_sampler=False, enable_checkpointing=False)
    with pytest.raises(InversionError, match="target 'long': context \\+ prompt \\+ target is 65 tokens"):
        trainer.fit(module, datamodule=OutputTargetsDataModule(targets_file=str(path)))


def test_results_path_naming_a_directory_is_a_clear_error(tmp_path):
    with pytest.raises(InversionError, match="is a directory: name a file in it"):
        DlmiModule("smollm2-135m", results_path=str(tmp_path))


def test_a_passed_config_is_run_as_given(chat, monkeypatch):
    """invert_output lays no defaults of its own over a passed config: every field reaches the run."""
    import lit_inversion.dlmi.api as api

    seen = []
    monkeypatch.setattr(api, "invert_outputs", lambda loaded, ids, config, **kw: seen.append(config) or [None])
    config = DlmiConfig(prompt_length=7, num_steps=3, check_every=5, seed=11, refine_candidates=9, beam_positions=2)
    invert_output([5, 6], model=chat, method=config)
    assert seen[0] == config
    assert all(getattr(seen[0], f.name) == getattr(config, f.name) for f in fields(config))
    invert_output([5, 6], model=chat, method=config, num_steps=4)  # an explicit keyword still sets its field
    assert seen[1].num_steps == 4 and seen[1].prompt_length == 7


def test_a_passed_prompt_length_gives_that_many_prompt_ids(chat):
    result = invert_output([5, 6], model=chat, method=DlmiConfig(prompt_length=7, num_steps=2, compute_dtype="float32"))
    assert len(result.prompt_ids) == 7


def test_a_saved_slot_resumes_only_in_the_same_context(chat):
    """The ids around the span belong to the target: a checkpointed slot resumes with them, and a target
    whose context changed starts again."""
    from lit_inversion.dlmi.data import OutputTarget

    config = DlmiConfig(prompt_length=2, num_steps=20, check_every=50, compute_dtype="float32")
    context = _render(chat, messages=MESSAGES)
    pool = TargetPool(chat, config, 1)
    pool.enqueue([OutputTarget("t", [70, 71, 72, 73], context)])
    for _ in range(3):
        pool.step()
    saved = pool.state_dict()
    assert saved["t"]["input"] == context.to_dict()
    for other, steps in ((context, 3), (Context((BOS,)), 0)):
        again = TargetPool(chat, config, 1)
        again.load_state_dict(saved)
        again.enqueue([OutputTarget("t", [70, 71, 72, 73], other)])
        again.fill()
        assert again.running[0].steps == steps
        assert again.running[0].batch.context == other
