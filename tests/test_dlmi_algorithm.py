"""DLMI core on a tiny random-weight Llama (CPU, no network)."""

from __future__ import annotations

import json

import pytest
import time

import torch

from lit_inversion.dlmi import DlmiBatch, DlmiConfig, greedy_decode
from lit_inversion.dlmi.batch import repeat_prompt
from lit_inversion.dlmi.pool import invert_outputs
from tests.conftest import make_tiny_model, swap_options
from tests.conftest import step_to_end as run_batch
from lit_inversion.dlmi.targets import make_difficulty_targets, perplexity, read_jsonl, write_jsonl
from lit_inversion.errors import InversionError
from lit_inversion.metrics import lcs_ratio
from lit_inversion.models import load_model

VOCAB = 96
BOS = 1


def _tiny_llama(directory, seed: int = 0):
    return load_model(str(make_tiny_model(directory, "llama", layers=2, vocab_size=VOCAB, context=32, seed=seed)))


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny ops: extra threads only add overhead
    yield _tiny_llama(tmp_path_factory.mktemp("dlmi-tiny"))
    torch.set_num_threads(threads)


def _reachable_target(loaded, prompt_length: int, length: int, seed: int = 3) -> list[int]:
    """A target that some prompt is known to produce: greedy decode from a random prompt."""
    g = torch.Generator().manual_seed(seed)
    prompt = torch.randint(3, VOCAB, (1, prompt_length), generator=g)
    return greedy_decode(loaded.model, torch.cat([torch.tensor([[BOS]]), prompt], 1), length)[0].tolist()


# The relaxed (paper) core with short settings; refinement tests opt in.
FAST = dict(prompt_length=4, num_steps=12, gumbel_samples=2, check_every=4, compute_dtype="float32",
            refine_fraction=0.0, init="random")


def test_gradient_reaches_logits_and_temperature(tiny):
    batch = DlmiBatch(tiny, [[5, 6, 7]], DlmiConfig(**FAST))
    before = batch.logits.detach().clone(), batch.phi.detach().clone()
    stats = batch.step()
    assert batch.logits.grad is not None and batch.logits.grad.abs().sum() > 0
    assert batch.phi.grad is not None and batch.phi.grad.abs().sum() > 0
    assert not torch.equal(before[0], batch.logits) and not torch.equal(before[1], batch.phi)
    assert torch.isfinite(stats.loss).all() and stats.phase == "relaxed"


@pytest.mark.parametrize("temperature", ["decoupled", "shared"])
def test_tau_stays_in_range(tiny, temperature):
    config = DlmiConfig(**FAST, temperature=temperature)
    batch = DlmiBatch(tiny, [[5, 6, 7]], config)
    assert batch.tau().shape == (1, config.prompt_length)
    for _ in range(3):
        batch.step()
    with torch.no_grad():
        for value in (-1e4, -3.0, 0.0, 3.0, 1e4):
            batch.phi.fill_(value)
            tau = batch.tau()
            # (eps, eps + 2 tau0] in exact arithmetic; tanh saturates to -1 in float, giving eps itself
            assert (tau >= config.eps).all() and (tau <= config.eps + 2 * config.tau0).all()
    fixed = DlmiBatch(tiny, [[5, 6, 7]], DlmiConfig(**FAST, temperature="fixed", fixed_tau=0.5))
    fixed.step()
    assert torch.all(fixed.tau() == 0.5) and fixed.phi.grad is None


def test_reaches_exact_match_on_reachable_target(tiny):
    target = _reachable_target(tiny, prompt_length=4, length=5)
    config = DlmiConfig(prompt_length=4, num_steps=160, gumbel_samples=4, check_every=4, compute_dtype="float32",
                        refine_fraction=0.5)
    (result,) = invert_outputs(tiny, [target], config)
    assert result.exact_match and result.lcs_ratio == 1.0
    assert result.steps < config.num_steps  # stopped early
    # The returned prompt really produces the target under greedy decoding.
    decoded = greedy_decode(tiny.model, torch.tensor([[BOS] + result.prompt_ids]), len(target))[0].tolist()
    assert decoded == target == result.output_ids


def test_refinement_only_moves_downhill(tiny):
    # The whole target scored (no window growth) and no restarts: each step keeps or lowers the key.
    config = DlmiConfig(prompt_length=4, num_steps=24, check_every=4, compute_dtype="float32", refine_candidates=8,
                        refine_fraction=1.0, search_window=0, refine_patience=0)
    batch = DlmiBatch(tiny, [[9, 10, 11, 12, 13]], config)
    keys = []
    while not batch.finished:
        keys.append(float(batch.step().loss[0]))
    assert all(b <= a + 1e-6 for a, b in zip(keys, keys[1:]))
    assert int(batch.searches[0].tried.sum()) > 0  # verified swaps are remembered, not tried again


def test_best_acceptance_crosses_plateaus_and_keeps_the_best_prompt(tiny):
    # Every step moves to its best candidate, also when that ranks below the current prompt.
    config = DlmiConfig(prompt_length=4, num_steps=24, check_every=4, compute_dtype="float32", refine_candidates=8,
                        search_window=0, refine_accept="best", beam_positions=0)  # a random start: plateaus to cross
    batch = DlmiBatch(tiny, [[9, 10, 11, 12, 13]], config)
    search, keys, moves = batch.searches[0], [float(batch.step().loss[0])], 0  # the first step starts the search
    while not batch.finished:
        before = search.prompt.clone()
        keys.append(float(batch.step().loss[0]))
        moves += int(not torch.equal(before, search.prompt))
        if batch.check_due:
            batch.check()
    assert moves == len(keys) - 1  # every step moved
    assert any(b > a for a, b in zip(keys, keys[1:]))  # some moves were uphill
    assert float(search.best_key) == pytest.approx(min(keys), abs=0.5)  # the best prompt ranked is kept (float32 keys)
    assert torch.equal(batch.checked[0], search.best)  # and is the one the honest check decodes


def _swap_search(tiny, **options):
    from lit_inversion.dlmi.search import PromptScorer, SwapSearch

    scorer = PromptScorer(tiny.model, [BOS])
    return SwapSearch(scorer, torch.tensor([9, 10, 11]), torch.ones(VOCAB, dtype=torch.bool),
                      torch.tensor([20, 21, 22, 23]), swap_options(**options), torch.Generator().manual_seed(0))


def test_greedy_sampling_takes_each_positions_best_untried_swaps(tiny):
    swap = _swap_search(tiny, candidates=8, topk=16, sampling="greedy")
    gain = torch.arange(VOCAB, dtype=torch.float).expand(4, -1)  # the highest token id gains most
    first = swap._propose(lambda positions: gain[: len(positions)], swap.prompt)
    second = swap._propose(lambda positions: gain[: len(positions)], swap.prompt)

    def swapped_in(candidates: torch.Tensor) -> list[int]:
        return sorted(candidates[candidates != swap.prompt].tolist())

    assert swapped_in(first) == sorted([95, 94] * 4)  # 2 per position, the best two
    assert swapped_in(second) == sorted([93, 92] * 4)  # then the next two: tried swaps are not repeated


def test_distance_weight_prefers_swaps_near_the_current_token(tiny):
    swap = _swap_search(tiny, distance_weight=1.0)
    E = tiny.model.get_input_embeddings().weight.detach()
    gain = swap._gain(torch.zeros(4, E.shape[1]), torch.tensor([1]))[0]  # no gradient signal: distance alone
    order = torch.cdist(E[swap.prompt[1]][None], E)[0].argsort()
    assert torch.equal(gain.argsort(descending=True)[:5], order[:5])


@pytest.mark.parametrize("objective", ["hinge", "ce"])
def test_objective_ranks_the_right_prefix_first(tiny, objective):
    batch = DlmiBatch(tiny, [[5, 6, 7, 8]], DlmiConfig(**FAST, refine_objective=objective))
    logits = torch.zeros(3, 4, VOCAB)
    logits[0, [0, 1], [5, 6]] = 3.0  # right prefix of 2, the rest hopeless
    logits[0, [2, 3], [40, 41]] = 30.0
    # right prefix of 1, nearly right elsewhere
    logits[1, [0, 1, 2, 3], [5, 40, 7, 8]] = torch.tensor([9.0, 9.0, 8.9, 9.0])
    logits[2, [0, 1, 2, 3], [5, 6, 7, 8]] = 1.0  # all right, barely
    key, loss = batch._objective(logits, torch.zeros(3, dtype=torch.long))
    assert key[2] < key[0] < key[1]
    assert loss.shape == (3,)


def test_shared_prefix_candidates_equal_full_forwards(tiny):
    from lit_inversion.dlmi.search import PromptScorer

    prompt, target = torch.tensor([7, 8, 9, 10, 11]), torch.tensor([20, 21, 22])
    tokens = torch.tensor([30, 31, 32])
    shared, full = PromptScorer(tiny.model, [BOS], True), PromptScorer(tiny.model, [BOS], False)
    _, _, cache = shared.with_gradient(prompt, target)
    assert cache is not None
    for position in (0, 2, 4):
        a = shared.candidates(prompt, position, tokens, target, cache)
        b = full.candidates(prompt, position, tokens, target, None)
        changed = prompt.repeat(3, 1)
        changed[:, position] = tokens
        batch = DlmiBatch(tiny, [target.tolist()], DlmiConfig(**{**FAST, "prompt_length": 5}))
        with torch.no_grad():
            reference = batch._target_logits(tiny.model.get_input_embeddings().weight[changed], torch.zeros(3).long())
        assert torch.allclose(a, b, atol=1e-4) and torch.allclose(b, reference, atol=1e-4)


def test_swap_search_scores_multi_swaps_like_full_forwards(tiny):
    """Candidates grouped by their first changed position (one cached prefix per group) rank exactly
    as full forwards of each candidate prompt would."""
    from lit_inversion.dlmi.search import PromptScorer, SwapSearch

    prompt, target = torch.tensor([7, 8, 9, 10, 11]), torch.tensor([20, 21, 22])
    scorer = PromptScorer(tiny.model, [BOS], True)
    swap = SwapSearch(scorer, target, torch.ones(VOCAB, dtype=torch.bool), prompt,
                      swap_options(candidates=12, n_replace=2, window=0), torch.Generator().manual_seed(0))
    _, _, cache = scorer.with_gradient(prompt, target)
    gain = torch.randn(5, VOCAB, generator=torch.Generator().manual_seed(1))
    candidates = swap._propose(lambda rows: gain[rows], prompt)
    assert len(candidates) == 12 and ((candidates != prompt).sum(1) == 2).all()
    swap.window = len(target)  # what the gradient pass sets: the whole target (window 0)
    keys, leads, preds = swap._score(candidates, prompt, cache)
    full = PromptScorer(tiny.model, [BOS], False)
    with torch.no_grad():
        reference = swap.rank(torch.cat([full.prompts(c[None], 0, target, None) for c in candidates]), target)[0]
    assert torch.allclose(keys, reference.key, atol=1e-3) and torch.equal(leads, reference.lead)
    assert torch.equal(preds, reference.pred)


SEARCH = dict(prompt_length=4, num_steps=60, check_every=4, compute_dtype="float32", refine_candidates=32,
              refine_topk=32)


def test_time_budget_stops_each_target_after_max_seconds(tiny):
    """max_seconds ends a target by wall time long before num_steps, with a final honest check."""
    target = [9, 10, 11, 12, 13, 14, 15, 16]
    config = DlmiConfig(**{**SEARCH, "num_steps": 10**6}, max_seconds=0.5)
    started = time.perf_counter()
    batch = DlmiBatch(tiny, [target, target[::-1]], config)
    results = run_batch(batch)
    elapsed = time.perf_counter() - started
    steps = int(batch.steps.max())
    assert not batch.done.any()  # stopped by the clock, not by a match
    for r in results:
        assert 0 < r.steps < 10**6 and 0.5 <= r.seconds <= elapsed
    # It stopped within a step or two of the budget (plus the last honest check), not long after.
    assert elapsed < 0.5 + 2 * elapsed / steps + 0.5
    assert (batch.best_lcs >= 0).all()  # each target was decoded honestly at least once
    assert batch.finished and (batch.checked == batch.discrete_prompts()).all()


def test_acg_schedule_anneals_multi_token_swaps_down_to_one(tiny):
    config = DlmiConfig(**{**SEARCH, "num_steps": 20}, swap_tokens=3)
    batch = DlmiBatch(tiny, [[9, 10, 11, 12]], config)
    schedule = []
    for step in (0, 2, 5, 10, 19):
        batch.steps[0] = step
        schedule.append(batch._swap_tokens(0))
    assert schedule == [3, 3, 2, 1, 1]
    # At the start every candidate of a step changes exactly 3 positions.
    search = batch.searches[0]
    prompt = search.prompt.clone()
    gain = torch.randn(4, VOCAB, generator=torch.Generator().manual_seed(1))
    candidates = search._propose(lambda rows: gain[rows], prompt, n_replace=3)
    assert len(candidates) > 0 and ((candidates != prompt).sum(1) == 3).all()


def test_search_reaches_exact_match_without_copying(tiny):
    target = _reachable_target(tiny, prompt_length=4, length=5)
    (result,) = invert_outputs(tiny, [target], DlmiConfig(**SEARCH))
    assert result.exact_match and result.steps < SEARCH["num_steps"]
    assert result.prompt_target_lcs <= 0.25
    decoded = greedy_decode(tiny.model, torch.tensor([[BOS] + result.prompt_ids]), len(target))[0].tolist()
    assert decoded == target


def test_copy_limit_and_forbidden_tokens_hold_at_every_step(tiny):
    from lit_inversion.dlmi.search import lcs_length

    target = [9, 10, 11, 12, 13, 14, 15, 16]
    config = DlmiConfig(**{**SEARCH, "num_steps": 12}, forbid_target_tokens=True)
    batch = DlmiBatch(tiny, [target], config)
    assert not batch.allowed[0, target].any() and batch.allowed[0, 40]
    while not batch.finished:
        batch.step()
        prompt = batch.current[0].tolist()
        assert not set(prompt) & set(target) and lcs_length(prompt, target) <= 2
    # Without forbidding, the search may use target tokens, but only within the LCS limit.
    copy = DlmiBatch(tiny, [target], DlmiConfig(**{**SEARCH, "num_steps": 12}, max_prompt_target_lcs=0.125))
    while not copy.finished:
        copy.step()
        assert lcs_length(copy.current[0].tolist(), target) <= 1


def test_forbidden_tokens_prefix_match_in_decoded_strings():
    from lit_inversion.dlmi.vocab import forbidden_for_target

    tok = _word_tokenizer_for(["cat", "Cats", "ca", "dog", "c", "x"])
    ids = {w: i for i, w in enumerate(["cat", "Cats", "ca", "dog", "c", "x"], start=3)}
    forbidden = forbidden_for_target(tok, 3 + 6, [ids["cat"]])
    assert {w for w, i in ids.items() if forbidden[i]} == {"cat", "Cats", "ca", "c"}


def _word_tokenizer_for(words):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{w: 3 + i for i, w in enumerate(words)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")


def test_stalled_refinement_restarts_from_the_next_init_prompt(tiny):
    config = DlmiConfig(prompt_length=4, num_steps=12, compute_dtype="float32", refine_candidates=4, refine_patience=2,
                        init="repeat")
    batch = DlmiBatch(tiny, [[9, 10, 11, 12, 13]], config)
    for _ in range(3):
        batch.step()
    search = batch.searches[0]
    search.tried[0, 5] = True
    before = int(search.restarts)
    search.restart()
    K = batch.seeds.shape[1]
    assert int(search.restarts) == before + 1 and int(search.stalled) == 0 and not search.tried.any()
    assert torch.equal(batch.current[0], batch.seeds[0, (before + 1) % K])
    # A plateau of refine_patience steps restarts on its own, from the seed after that.
    from lit_inversion.dlmi.search import Scored

    now = Scored(torch.tensor([0]), torch.tensor([1.0], dtype=torch.float64), torch.zeros(1, 5, dtype=torch.long))
    search._stall(now)
    assert int(search.restarts) == before + 1 and int(search.stalled) == 1
    search._stall(now)
    assert int(search.restarts) == before + 2 and int(search.stalled) == 0
    assert torch.equal(batch.current[0], batch.seeds[0, (before + 2) % K])


def test_random_restart_starts_from_the_best_prompt_with_a_few_positions_redrawn(tiny):
    config = DlmiConfig(prompt_length=6, num_steps=8, compute_dtype="float32", refine_candidates=8, restart_swaps=2)
    batch = DlmiBatch(tiny, [[9, 10, 11, 12, 13]], config)
    for _ in range(3):
        batch.step()
    search = batch.searches[0]
    best = search.best.clone()
    assert float(search.best_key) <= float(search.key)  # the best prompt ranked so far
    search.prompt[:] = 3  # wander off, then restart
    search.restart()
    assert int((search.prompt != best).sum()) <= 2 and int(search.lead) == 0


def test_repeat_prompt_layouts():
    assert repeat_prompt([5, 6, 7, 8, 9], 4, anchor=1) == [1, 5, 6, 1]
    assert repeat_prompt([5, 6], 7, anchor=1) == [1, 5, 6, 1, 5, 6, 1]
    assert repeat_prompt([5, 6], 1, anchor=1) == [1]


def test_repeat_init_starts_from_a_repeat_prompt(tiny):
    target = [9, 10, 11, 12, 13, 14]
    batch = DlmiBatch(tiny, [target], DlmiConfig(prompt_length=6, compute_dtype="float32", init="repeat"))
    prompt = batch.argmax_prompts()[0].tolist()
    assert prompt[1:5] == target[:4] and prompt[0] == prompt[5]
    assert batch.best_prompt[0].tolist() == prompt


def test_lcs_ratio_hand_cases():
    assert lcs_ratio([1, 2, 3], [1, 2, 3]) == 1.0
    assert lcs_ratio([1, 3], [1, 2, 3]) == pytest.approx(2 / 3)
    assert lcs_ratio([3, 2, 1], [1, 2, 3]) == pytest.approx(1 / 3)
    assert lcs_ratio([9, 1, 9, 2, 9, 3, 9], [1, 2, 3]) == 1.0  # a subsequence, not a substring
    assert lcs_ratio([], [1, 2]) == 0.0
    assert lcs_ratio([4, 4], [1, 2]) == 0.0


def test_result_scores_are_honest(tiny):
    target = [7, 8, 9, 10]
    (result,) = invert_outputs(tiny, [target], DlmiConfig(**FAST))
    decoded = greedy_decode(tiny.model, torch.tensor([[BOS] + result.prompt_ids]), len(target))[0].tolist()
    assert result.output_ids == decoded
    assert result.lcs_ratio == pytest.approx(lcs_ratio(decoded, target))
    assert result.exact_match == (decoded == target)
    assert 0.0 <= result.soft_lcs_ratio <= 1.0 and len(result.prompt_ids) == 4 and result.steps == 12


@pytest.mark.parametrize("overrides", [dict(), dict(refine_fraction=0.5, straight_through_from=0.3, anneal_from=0.3),
                                       dict(init="repeat", refine_fraction=1.0)])
def test_batch_equals_one_target_at_a_time(tiny, overrides):
    config = DlmiConfig(**{**FAST, "num_steps": 16, **overrides})
    targets = [[5, 6, 7, 8], [9, 10, 11]]  # different lengths: padding must not leak
    together = DlmiBatch(tiny, targets, config)
    run_batch(together)
    for b, target in enumerate(targets):
        alone = DlmiBatch(tiny, [target], config)
        run_batch(alone)
        # Same noise and same path; only float rounding differs (a padded row is a longer forward).
        assert torch.allclose(alone.logits[0], together.logits[b], atol=1e-4)
        assert torch.equal(alone.best_prompt[0], together.best_prompt[b])
        assert alone.result(0).prompt_ids == together.result(b).prompt_ids


def test_stopped_target_is_frozen_while_others_continue(tiny):
    batch = DlmiBatch(tiny, [[5, 6, 7], [9, 10, 11]], DlmiConfig(**FAST))
    batch.step()
    batch.done[0] = True  # as if target 0 had matched
    frozen = batch.logits[0].detach().clone(), batch.phi[0].detach().clone()
    stats = batch.step()
    assert torch.equal(batch.logits[0], frozen[0]) and torch.equal(batch.phi[0], frozen[1])
    assert torch.isnan(stats.loss[0]) and torch.isfinite(stats.loss[1])
    assert batch.steps.tolist() == [1, 2]


def test_state_dict_resumes_exactly(tiny):
    config = DlmiConfig(**FAST)
    first = DlmiBatch(tiny, [[5, 6, 7]], config)
    for _ in range(3):
        first.step()
    state = {k: v.clone() if torch.is_tensor(v) else v for k, v in first.state_dict().items()}
    torch.save(state, "/dev/null")  # picklable
    second = DlmiBatch(tiny, [[5, 6, 7]], config)
    second.load_state_dict(state)
    for _ in range(3):
        first.step()
        second.step()
    assert torch.equal(first.logits, second.logits) and torch.equal(first.phi, second.phi)
    assert int(second.steps[0]) == 6


@pytest.mark.parametrize("overrides", [dict(teacher_forcing=False), dict(temperature="shared"),
                                       dict(compute_dtype="bfloat16"), dict(relax_topk=8)])
def test_variants_lower_their_loss(tiny, overrides):
    """Each relaxed variant optimises: its loss falls from the random start (seeded noise)."""
    batch = DlmiBatch(tiny, [[5, 6, 7]], DlmiConfig(**{**FAST, **overrides, "num_steps": 40, "check_every": 100}))
    losses = [float(batch.step().loss[0]) for _ in range(40)]
    assert sum(losses[-5:]) / 5 < 0.9 * sum(losses[:5]) / 5, losses


@pytest.mark.parametrize("overrides", [dict(relaxation="straight_through"),
                                       dict(anneal_from=0.5, straight_through_from=0.5)])
def test_straight_through_variants_report_an_honest_result(tiny, overrides):
    # The hard-sample loss is too noisy to fall reliably in a few steps; what must hold is the honest check.
    (result,) = invert_outputs(tiny, [[5, 6, 7]], DlmiConfig(**{**FAST, **overrides}))
    decoded = greedy_decode(tiny.model, torch.tensor([[BOS] + result.prompt_ids]), 3)[0].tolist()
    assert result.output_ids == decoded and result.exact_match == (decoded == [5, 6, 7])
    assert result.lcs_ratio == pytest.approx(lcs_ratio(decoded, [5, 6, 7]))


def test_paper_config_turns_improvements_off():
    paper = DlmiConfig.paper(prompt_length=10)
    assert paper.prompt_length == 10 and paper.refine_steps == 0 and not paper.keep_best
    assert paper.compute_dtype == "float32" and paper.anneal_from == 1.0 and paper.straight_through_from == 1.0
    assert paper.init == "random" and paper.refine_patience == 0
    assert paper.relax_topk == 0  # the published dense relaxation, whatever the vocabulary


@pytest.mark.parametrize("targets, overrides, message", [
    ([[]], {}, "target 0 is empty"),
    ([[5, 6], [VOCAB + 3]], {}, "outside the vocabulary"),
    ([[-1]], {}, "outside the vocabulary"),
    ([[5] * 30], {}, "more than the model context of 32: use a shorter context, prompt_length or target"),
    ([[5, 6]], {"prompt_length": 0}, "prompt_length must be at least 1"),
    ([[5, 6]], {"temperature": "cold"}, "temperature must be one of"),
    ([[5, 6]], {"relaxation": "hard"}, "relaxation must be one of"),
    ([[5, 6]], {"init": "copy"}, "init must be one of random, repeat"),
    ([[5, 6]], {"refine_fraction": 1.5}, "refine_fraction is a fraction in"),
    ([[5, 6]], {"relax_topk": -1}, "relax_topk must be 0 \\(dense\\), a positive number of tokens, or null"),
    ([[5, 6]], {"max_seconds": 0}, "max_seconds must be positive, or null for no time budget"),
    ([[5, 6]], {"swap_tokens": 5}, "swap_tokens must be between 1 and prompt_length \\(4\\)"),
    ([[5, 6]], {"refine_accept": "always"}, "refine_accept must be one of best, improve"),
    ([[5, 6]], {"refine_sampling": "top"}, "refine_sampling must be one of random, greedy"),
    ([[5, 6]], {"refine_distance_weight": -1.0}, "refine_distance_weight must be 0 \\(off\\) or positive"),
    ([], {}, "no targets given"),
])
def test_bad_input_raises_inversion_error(tiny, targets, overrides, message):
    with pytest.raises(InversionError, match=message):
        invert_outputs(tiny, targets, DlmiConfig(**{**FAST, **overrides}))


def test_difficulty_targets(tiny, tmp_path):
    targets = make_difficulty_targets(tiny, ks=[-100, 3], per_k=2, length=6, seed=42)
    assert [t["id"] for t in targets] == ["k-100-0", "k-100-1", "k3-0", "k3-1"]
    assert all(len(t["ids"]) == 6 and not {0, 1, 2} & set(t["ids"]) for t in targets)
    assert targets == make_difficulty_targets(tiny, ks=[-100, 3], per_k=2, length=6, seed=42)
    # k' = 1 everywhere: greedy decoding from BOS with special tokens masked.
    model = tiny.model
    ids = [BOS]
    for _ in range(6):
        logits = model(input_ids=torch.tensor([ids])).logits[0, -1]
        logits[[0, 1, 2]] = -float("inf")
        ids.append(int(logits.argmax()))
    assert targets[0]["ids"] == ids[1:]
    assert perplexity(tiny, targets[0]["ids"]) < perplexity(tiny, targets[2]["ids"])
    path = tmp_path / "t.jsonl"
    write_jsonl(targets, path)
    assert read_jsonl(path) == targets
    assert set(json.loads(path.read_text().splitlines()[0])) == {"id", "k", "ids", "text"}
