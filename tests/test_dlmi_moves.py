"""The swap search's move-set options (issue 23) on a tiny random-weight Llama: Faster-GCG's dedupe,
I-GCG's merge, ACG's buffer, MAC's momentum, ADC's relaxed warm start and a BEAST start beam."""

from __future__ import annotations

import pytest
import torch

from lit_inversion.dlmi import DlmiBatch, DlmiConfig, greedy_decode, search
from lit_inversion.dlmi.pool import invert_outputs
from lit_inversion.dlmi.relax import adc_project
from lit_inversion.errors import InversionError
from tests.conftest import make_tiny_model, swap_options
from tests.conftest import step_to_end as run_batch
from lit_inversion.models import load_model

VOCAB = 96
BOS = 1
SEARCH = dict(prompt_length=4, num_steps=30, check_every=4, compute_dtype="float32", refine_candidates=16,
              refine_topk=16)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield load_model(str(make_tiny_model(tmp_path_factory.mktemp("moves"), "llama", layers=2, vocab_size=VOCAB,
                                         context=32)))
    torch.set_num_threads(threads)


def _reachable_target(loaded, prompt_length: int = 4, length: int = 5, seed: int = 3) -> list[int]:
    prompt = torch.randint(3, VOCAB, (1, prompt_length), generator=torch.Generator().manual_seed(seed))
    return greedy_decode(loaded.model, torch.cat([torch.tensor([[BOS]]), prompt], 1), length)[0].tolist()


def _record_scored(monkeypatch) -> list[list[int]]:
    """Every prompt a search scores with a forward, in order."""
    scored: list[list[int]] = []
    original = search.PromptScorer.prompts

    def prompts(self, candidates, *args, **kwargs):
        scored.extend(candidates.tolist())
        return original(self, candidates, *args, **kwargs)

    monkeypatch.setattr(search.PromptScorer, "prompts", prompts)
    return scored


def test_dedupe_never_scores_a_prompt_twice_and_counts_every_evaluation(tiny, monkeypatch):
    scored = _record_scored(monkeypatch)
    gradients = []
    original = search.PromptScorer.with_gradient
    monkeypatch.setattr(search.PromptScorer, "with_gradient",
                        lambda self, *a: gradients.append(1) or original(self, *a))
    target = [9, 10, 11, 12, 13, 14]
    batch = DlmiBatch(tiny, [target], DlmiConfig(**SEARCH, refine_dedupe=True, refine_patience=3))
    for _ in range(20):
        batch.step()
    assert len(scored) > 100 and len({tuple(p) for p in scored}) == len(scored)
    forwards, passes = batch.work()
    assert int(forwards[0]) == len(scored) + int(batch.forwards[0]) and int(passes[0]) == len(gradients)
    assert int(batch.evaluations(gradient_cost=3)[0]) == int(forwards[0]) + 3 * len(gradients)


def test_without_dedupe_a_move_rescores_the_swaps_at_its_position(tiny, monkeypatch):
    # The baseline dedupe improves on: after a move at p, the swaps at p from the old prompt come back.
    scored = _record_scored(monkeypatch)
    batch = DlmiBatch(tiny, [[9, 10, 11, 12, 13, 14]], DlmiConfig(**SEARCH, refine_positions=1, refine_patience=0))
    for _ in range(20):
        batch.step()
    assert len({tuple(p) for p in scored}) < len(scored)


def test_dedupe_state_survives_a_checkpoint(tiny):
    config = DlmiConfig(**SEARCH, refine_dedupe=True)
    first = DlmiBatch(tiny, [[9, 10, 11, 12, 13]], config)
    for _ in range(4):
        first.step()
    state = first.state_dict()
    second = DlmiBatch(tiny, [[9, 10, 11, 12, 13]], config)
    second.load_state_dict(state)
    assert second.searches[0].lines == first.searches[0].lines and first.searches[0].lines
    for _ in range(4):
        first.step()
        second.step()
    assert torch.equal(first.current, second.current)
    assert torch.equal(first.evaluations(), second.evaluations())


def test_merge_scores_the_best_single_swaps_applied_together(tiny, monkeypatch):
    batch = DlmiBatch(tiny, [[9, 10, 11, 12, 13, 14]], DlmiConfig(**SEARCH, refine_merge=3))
    batch.step()  # starts the search
    swap = batch.searches[0]
    prompt = swap.prompt.clone()
    calls = []
    original = swap._score

    def score(candidates, *args, **kwargs):
        out = original(candidates, *args, **kwargs)
        calls.append((candidates.clone(), out[0].clone()))
        return out

    monkeypatch.setattr(swap, "_score", score)
    batch.step()
    (singles, keys), (merged, _) = calls
    assert ((singles != prompt).sum(1) == 1).all()
    assert (merged != prompt).sum(1).tolist() == [2, 3]
    # The merges apply the best single swaps at distinct positions, best first.
    best = []
    for i in keys.argsort().tolist():
        p = int((singles[i] != prompt).nonzero())
        if p not in [q for q, _ in best]:
            best.append((p, int(singles[i, p])))
    for row, n in zip(merged, (2, 3)):
        assert sorted((p, int(row[p])) for p in (row != prompt).nonzero().flatten().tolist()) == sorted(best[:n])


def test_buffer_keeps_the_best_distinct_prompts_and_restarts_from_them(tiny):
    batch = DlmiBatch(tiny, [[9, 10, 11, 12, 13, 14]], DlmiConfig(**SEARCH, refine_buffer=4, refine_patience=0))
    for _ in range(4):
        batch.step()
    swap = batch.searches[0]
    keys = swap.kept_keys
    assert torch.isfinite(keys).all() and torch.equal(keys, keys.sort().values)
    assert len({tuple(p) for p in swap.kept.tolist()}) == 4
    expected = next(i for i in range(4) if not torch.equal(swap.kept[i], swap.prompt))
    chosen = swap.kept[expected].clone()
    swap.restart()
    assert torch.equal(swap.prompt, chosen) and not torch.isfinite(swap.kept_keys[expected])


def test_momentum_accumulates_normalised_gradients():
    swap = search.SwapSearch.__new__(search.SwapSearch)
    torch.nn.Module.__init__(swap)
    swap.options = swap_options(momentum=0.5)
    swap.register_buffer("velocity", torch.zeros(2, 3))
    g1, g2 = torch.tensor([[3.0, 0, 0], [0, 4, 0]]), torch.tensor([[0, 0, 1.0], [0, 0, 0]])
    swap._with_momentum(g1)
    v = swap._with_momentum(g2)
    assert torch.allclose(v, 0.5 * g1 / 5 + g2)


def test_adc_projection_keeps_the_top_entries_as_a_distribution():
    z = torch.tensor([[[0.5, -1.0, 2.0, 0.1]], [[-1.0, -2.0, -0.5, -3.0]]])
    out = adc_project(z, torch.tensor([2, 4]))
    assert torch.allclose(out[0, 0], torch.tensor([0.2, 0.0, 0.8, 0.0]))
    assert torch.equal(out[1, 0], torch.tensor([0.0, 0.0, 1.0, 0.0]))  # nothing positive: one-hot at the largest


def test_adc_warm_start_hands_its_best_rounded_prompt_to_the_search(tiny):
    target = _reachable_target(tiny)
    config = DlmiConfig(**{**SEARCH, "num_steps": 40}, relaxed_method="adc", refine_fraction=0.5)
    batch = DlmiBatch(tiny, [target], config)
    for _ in range(config.relaxed_steps):
        batch.step()
        z = batch.logits.detach()[0]
        assert torch.allclose(z.sum(-1), torch.ones(4)) and (z >= 0).all()
    assert int(batch.forwards[0]) == int(batch.gradients[0]) == config.relaxed_steps
    rounded = batch.rounded[0].clone()
    assert not bool(batch.done[0])  # relaxed steps set no exact flag: only the job's checks could stop it
    batch.step()  # the search starts from the best rounded prompt, and takes at most one swap
    assert int((batch.searches[0].prompt != rounded).sum()) <= 1
    run_batch(batch)
    assert bool(batch.done[0])


def test_beam_start_changes_only_the_last_positions(tiny):
    # 4 positions asked of a 4-token prompt: the beam re-draws the last half only.
    config = DlmiConfig(**SEARCH, beam_positions=4, beam_width=3, beam_samples=4)
    batch = DlmiBatch(tiny, [[9, 10, 11, 12, 13]], config)
    start = batch._random_prompt(0)
    prompt = batch._beam_start(0, start.clone())
    assert torch.equal(prompt[:2], start[:2]) and bool(batch.allowed[0, prompt].all())
    assert 0 < int(batch.forwards[0]) <= 1 * 4 + 1 + 3 * 4 + 3  # forwards for the draws plus the prompts ranked


def test_topic_prompts_are_the_models_own_text_after_the_target(tiny):
    target = [9, 10, 11, 12, 13]
    batch = DlmiBatch(tiny, [target], DlmiConfig(**SEARCH, topic_samples=6, filter_ids=False))
    prompts = batch._topic_prompts(0)
    assert len(prompts) == 6 and int(batch.forwards[0]) == 6
    head = [BOS] + target + tiny.tokenizer.encode("\n\n", add_special_tokens=False)
    logits = tiny.model(input_ids=torch.tensor([head])).logits[0, -1]
    for prompt in prompts:
        assert bool(batch.allowed[0, prompt].all()) and not batch._copies(0, prompt.tolist())
        assert torch.isfinite(logits[prompt[0]])
    # Each token is one the model gives real probability after the text before it (not a uniform draw).
    ids = torch.tensor([head + prompts[0].tolist()])
    logp = torch.log_softmax(tiny.model(input_ids=ids).logits[0].float(), -1)
    drawn = logp[len(head) - 1: -1].gather(1, prompts[0][:, None])
    assert float(drawn.mean()) > float(logp[len(head) - 1: -1].mean())
    assert DlmiBatch(tiny, [target], DlmiConfig(**SEARCH, topic_samples=0))._topic_prompts(0) == []


def test_log_prior_is_the_models_next_token_distribution(tiny):
    from lit_inversion.dlmi.scorer import PromptScorer

    prompt = torch.tensor([5, 17, 40, 8])
    logits = tiny.model(input_ids=torch.tensor([[BOS, 5, 17, 40, 8]])).logits[0].float()
    positions = torch.tensor([0, 2, 3])
    with_bos = PromptScorer(tiny.model, [BOS]).log_prior(prompt, positions)
    assert torch.allclose(with_bos, torch.log_softmax(logits[positions], -1), atol=1e-5)
    bare = PromptScorer(tiny.model, []).log_prior(prompt, positions)  # nothing before position 0: uniform
    assert torch.equal(bare[0], torch.zeros(VOCAB))
    plain = torch.log_softmax(tiny.model(input_ids=prompt[None]).logits[0].float(), -1)
    assert torch.allclose(bare[1:], plain[positions[1:] - 1], atol=1e-5)


def test_a_strong_prior_proposes_the_models_own_next_tokens(tiny):
    batch = DlmiBatch(tiny, [[9, 10, 11, 12, 13]], DlmiConfig(**SEARCH, refine_prior=1e6))
    swap = batch.searches[0]
    positions = torch.tensor([1, 3])
    gain = swap._gain(torch.randn(4, tiny.model.config.hidden_size), positions)
    prior = swap.scorer.log_prior(swap.prompt, positions)
    assert torch.equal(gain.topk(5, -1).indices, prior.topk(5, -1).indices)


@pytest.mark.parametrize("options", [dict(refine_dedupe=True), dict(refine_merge=4), dict(refine_buffer=8),
                                     dict(refine_momentum=0.5), dict(beam_positions=2), dict(refine_prior=1.0),
                                     dict(topic_samples=0),
                                     dict(relaxed_method="adc", refine_fraction=0.5)])
def test_each_option_reaches_exact_match_without_copying(tiny, options):
    target = _reachable_target(tiny)
    (result,) = invert_outputs(tiny, [target], DlmiConfig(**{**SEARCH, "num_steps": 60, "refine_candidates": 32,
                                                              "refine_topk": 32}, **options))
    assert result.exact_match and result.prompt_target_lcs <= 0.25
    assert greedy_decode(tiny.model, torch.tensor([[BOS] + result.prompt_ids]), len(target))[0].tolist() == target


@pytest.mark.parametrize("options, message", [
    (dict(relaxed_method="sgd"), "relaxed_method must be one of gumbel, adc"),
    (dict(refine_momentum=1.0), "refine_momentum must be in \\[0, 1\\)"),
    (dict(refine_prior=-0.5), "refine_prior must be 0 \\(off\\) or positive"),
    (dict(refine_merge=-1), "refine_merge, refine_buffer, beam_positions and topic_samples must be 0 \\(off\\) or positive"),
])
def test_bad_move_options_name_the_problem(options, message):
    with pytest.raises(InversionError, match=message):
        DlmiConfig(**SEARCH, **options).validate()
