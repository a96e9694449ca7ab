"""SIP-It on tiny random models: exact recovery, the never-twice rule, brute force, noisy states."""

from __future__ import annotations

import pytest
import torch

from lit_inversion import invert_hidden_states, load_model
from lit_inversion.sipit.algorithm import GrowingRows, PositionSearch, SipItConfig, invert
from lit_inversion.sipit.policies import TokenIndex
from lit_inversion.states import LayerProbe
from lit_inversion.tokens import context_prefix


def _prompt(vocab: int, length: int, seed: int) -> list[int]:
    return torch.randint(3, vocab, (length,), generator=torch.Generator().manual_seed(seed)).tolist()


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
@pytest.mark.parametrize("layer", [0, 1, 2, 4, -1])
def test_exact_recovery_on_tiny_models(arch, layer, tiny_llama_dir, tiny_gpt2_dir):
    loaded = load_model(str(tiny_llama_dir if arch == "llama" else tiny_gpt2_dir))
    ids = _prompt(loaded.vocab_size, 12, seed=layer + 10)
    with LayerProbe(loaded, layer) as probe:
        states = probe.states(ids, context_prefix(loaded.bos_id, True))
    result = invert_hidden_states(states, model=loaded, layer=layer, true_ids=ids)
    assert result.recovered_ids == ids
    assert result.exact_match and result.token_accuracy == 1.0
    assert all(result.verified)
    assert result.recovered_text == loaded.tokenizer.decode(ids)


def test_recovery_without_bos_and_without_table(tiny_llama):
    ids = _prompt(tiny_llama.vocab_size, 10, seed=3)
    with LayerProbe(tiny_llama, 3) as probe:
        states = probe.states(ids, [])
    result = invert_hidden_states(states, model=tiny_llama, layer=3, prepend_bos=False, use_table=False)
    assert result.recovered_ids == ids


@pytest.mark.parametrize("policy", ["gradient", "random"])
def test_a_token_is_never_tested_twice_at_a_position(policy, tiny_llama, monkeypatch):
    seen: dict[int, list[int]] = {}
    original = PositionSearch.verify

    def recording_verify(self, ids):
        seen.setdefault(self.position, []).extend(ids.tolist())
        return original(self, ids)

    monkeypatch.setattr(PositionSearch, "verify", recording_verify)
    ids = _prompt(tiny_llama.vocab_size, 4, seed=5)
    with LayerProbe(tiny_llama, 4) as probe:
        states = probe.states(ids, [1])
        # Noise makes every position search the whole vocabulary, the worst case for repeats.
        noisy = states + 5.0 * torch.randn_like(states)
        result = invert(probe, noisy, [1], SipItConfig(policy=policy, batch_size=13, use_table=False))
    for position, tested in seen.items():
        assert len(tested) == len(set(tested)), f"position {position} tested a token twice"
        assert len(tested) <= tiny_llama.vocab_size
    assert result.candidates_tested == [tiny_llama.vocab_size] * len(ids)


def test_verifier_rejects_a_repeated_proposal(tiny_llama):
    with LayerProbe(tiny_llama, 2) as probe:
        cache = probe.prefix_cache([1])
        index = TokenIndex(probe.embedding.weight, None)
        search = PositionSearch(probe, cache, 1, torch.zeros(32), SipItConfig(), index, torch.Generator())
        search.verify(torch.tensor([5, 6]))
        with pytest.raises(RuntimeError, match="already tested"):
            search.verify(torch.tensor([6]))


def test_brute_force_policy_recovers_exactly_within_vocab_budget(tiny_llama):
    ids = _prompt(tiny_llama.vocab_size, 8, seed=7)
    with LayerProbe(tiny_llama, 4) as probe:
        states = probe.states(ids, [1])
    result = invert_hidden_states(states, model=tiny_llama, layer=4, policy="random", batch_size=16, true_ids=ids)
    assert result.recovered_ids == ids
    assert all(1 <= n <= tiny_llama.vocab_size for n in result.candidates_tested)
    # A random order needs about half the vocabulary on average; the guided policy needs far fewer.
    guided = invert_hidden_states(states, model=tiny_llama, layer=4, batch_size=16)
    assert sum(guided.candidates_tested) < sum(result.candidates_tested)


def test_noisy_states_return_best_candidate_flagged(tiny_llama):
    ids = _prompt(tiny_llama.vocab_size, 6, seed=9)
    with LayerProbe(tiny_llama, 4) as probe:
        states = probe.states(ids, [1])
    noisy = states + 0.05 * states.norm(dim=-1, keepdim=True) * torch.randn_like(states) / states.shape[-1] ** 0.5
    result = invert_hidden_states(noisy, model=tiny_llama, layer=4, max_candidates=40)
    assert len(result.recovered_ids) == len(ids)
    assert not any(result.verified)  # 5% noise is far outside the float32 tolerance
    assert all(n <= 40 for n in result.candidates_tested)
    assert result.max_distance > 0
    # With the whole vocabulary searched, the nearest state is still the true token at this noise.
    full = invert_hidden_states(noisy, model=tiny_llama, layer=4)
    assert full.recovered_ids == ids and not any(full.verified)
    # Confidence: the nearest state stands out from the runner-up at 5% noise, far less at 100%.
    assert min(full.confidence) > 0.1
    drowned = states + states.norm(dim=-1, keepdim=True) * torch.randn_like(states) / states.shape[-1] ** 0.5
    worse = invert_hidden_states(drowned, model=tiny_llama, layer=4)
    assert sum(worse.confidence) < sum(full.confidence)
    assert all(0.0 <= c <= 1.0 for c in worse.confidence)


def test_mixed_precision_verification_stays_exact(tiny_llama):
    ids = _prompt(tiny_llama.vocab_size, 8, seed=11)
    with LayerProbe(tiny_llama, 4) as probe:
        states = probe.states(ids, [1])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        result = invert_hidden_states(states, model=tiny_llama, layer=4)
    assert result.recovered_ids == ids and all(result.verified)


def test_low_precision_screen_accepts_only_float32_distances(tiny_llama, monkeypatch):
    dtypes: list[torch.dtype] = []
    original = PositionSearch._states

    def recording_states(self, ids, dtype):
        dtypes.append(dtype)
        return original(self, ids, dtype)

    monkeypatch.setattr(PositionSearch, "_states", recording_states)
    ids = _prompt(tiny_llama.vocab_size, 8, seed=13)
    with LayerProbe(tiny_llama, 4) as probe:
        states = probe.states(ids, [1])
        result = invert(probe, states, [1], SipItConfig(screen_dtype="bfloat16"), true_ids=ids)
    assert result.recovered_ids == ids and all(result.verified)
    # Every batch is screened in bf16; every acceptance came from a float32 re-run.
    assert dtypes.count(torch.bfloat16) >= len(ids) and dtypes.count(torch.float32) >= len(ids)
    tolerance = 1e-4 + 1e-4 * states.norm(dim=-1)
    assert all(d <= float(t) for d, t in zip(result.distances, tolerance))


@pytest.mark.parametrize("surrogate_rank", [0, 16])
def test_guided_policy_with_and_without_the_surrogate(surrogate_rank, tiny_llama, monkeypatch):
    proposals: list[list[int]] = []
    from lit_inversion.sipit import policies

    original = policies.surrogate_proposals

    def recording(search, features, k, **kwargs):
        ids = original(search, features, k, **kwargs)
        assert not bool(search.tested[ids].any())
        proposals.append(ids.tolist())
        return ids

    monkeypatch.setattr(policies, "surrogate_proposals", recording)
    ids = _prompt(tiny_llama.vocab_size, 10, seed=17)
    with LayerProbe(tiny_llama, 4) as probe:
        states = probe.states(ids, [1])
        # Small batches so that positions take several rounds and the surrogate gets its turns.
        config = SipItConfig(batch_size=8, max_batch_size=8, surrogate_rank=surrogate_rank, use_table=False)
        result = invert(probe, states, [1], config, true_ids=ids)
        # Noisy states never verify, so every position searches the whole vocabulary.
        invert(probe, states[:3] + 5.0 * torch.randn_like(states[:3]), [1], config)
    assert result.recovered_ids == ids
    assert (len(proposals) > 0) == bool(surrogate_rank)
    assert all(len(p) == len(set(p)) for p in proposals)


def test_verified_rows_survive_buffer_growth():
    rows, batches = GrowingRows(), [torch.randn(n, 3) for n in (200, 100, 5, 700)]
    for batch in batches:
        rows.append(batch)
    assert len(rows) == 1005
    assert torch.equal(rows.all(), torch.cat(batches))


def test_policies_and_verifier_do_not_import_the_loop():
    import ast
    from pathlib import Path

    import lit_inversion.sipit as package

    for name in ("policies", "search", "config", "index", "prior"):
        tree = ast.parse((Path(package.__file__).parent / f"{name}.py").read_text())
        imported = {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
        assert "lit_inversion.sipit.algorithm" not in imported, f"{name}.py imports the loop"
        assert name == "policies" or "lit_inversion.sipit.policies" not in imported, f"{name}.py imports the policies"


def _greedy(loaded, length: int) -> list[int]:
    """A prompt the model itself would write after BOS (so the LM prior ranks each true token first)."""
    ids = [1]
    with torch.no_grad():
        for _ in range(length):
            ids.append(int(loaded.model(torch.tensor([ids])).logits[0, -1].argmax()))
    return ids[1:]


def test_lm_prior_proposes_the_models_own_guesses_first(tiny_llama):
    ids = _greedy(tiny_llama, 8)
    with LayerProbe(tiny_llama, 4) as probe:
        states = probe.states(ids, [1])
        config = SipItConfig(batch_size=2, max_batch_size=2, use_table=False, surrogate_rank=0)
        with_prior = invert(probe, states, [1], config, true_ids=ids)
        without = invert(probe, states, [1], SipItConfig(**{**config.__dict__, "lm_prior": False}), true_ids=ids)
    assert with_prior.exact_match and without.exact_match
    assert with_prior.candidates_tested == [2] * len(ids)  # the top guess is in every first batch
    assert sum(without.candidates_tested) > sum(with_prior.candidates_tested)


def test_low_precision_captures_are_verified_in_their_dtype(tiny_llama):
    from lit_inversion.sipit.algorithm import capture_probe

    ids = _prompt(tiny_llama.vocab_size, 8, seed=19)
    with LayerProbe(tiny_llama, 4) as probe, capture_probe(probe, "bfloat16") as low:
        states = low.states(ids, [1])  # one full-sequence forward of the model cast to bf16
        assert float((states - probe.states(ids, [1])).norm()) > 0
        strict = invert(probe, states, [1], SipItConfig(max_candidates=32), true_ids=ids)
        result = invert(probe, states, [1], SipItConfig(), true_ids=ids, capture_dtype="bfloat16", verifier_probe=low)
    assert not any(strict.verified)  # float32 tolerance: rounding noise never verifies
    assert result.exact_match and all(result.verified) and all(result.certified)


def test_unknown_capture_dtype_is_a_clear_error(tiny_llama):
    from lit_inversion.errors import InversionError

    with pytest.raises(InversionError, match="capture_dtype 'int8' is unknown"):
        invert_hidden_states(torch.zeros(2, 32), model=tiny_llama, layer=2, capture_dtype="int8")


def test_last_layer_prior_reads_the_target_states_like_the_models_own_forward(tiny_llama):
    from lit_inversion.sipit.prior import LanguagePrior, LensPrior, final_norm_and_head

    ids = _prompt(tiny_llama.vocab_size, 6, seed=23)
    with LayerProbe(tiny_llama, tiny_llama.num_layers) as probe:
        states = probe.states(ids, [1])
    lens = LensPrior(tiny_llama.model, states, final_norm_and_head(tiny_llama.model), [1])
    forward = LanguagePrior(tiny_llama.model, [1], torch.device("cpu"))
    torch.testing.assert_close(lens.probs(), forward.probs(), rtol=1e-4, atol=1e-6)  # after BOS: a forward
    assert LensPrior(tiny_llama.model, states, final_norm_and_head(tiny_llama.model)).probs() is None  # no BOS
    for token in ids[:-1]:
        lens.append(token)
        forward.append(token)
        torch.testing.assert_close(lens.probs(), forward.probs(), rtol=1e-4, atol=1e-6)


def test_accepted_token_cache_is_sliced_from_the_verified_batch(tiny_llama):
    with LayerProbe(tiny_llama, 3) as probe:
        cache = probe.prefix_cache([1, 7, 8])
        target = probe.states([9], [1, 7, 8])[0]
        search = PositionSearch(probe, cache, 3, target, SipItConfig(), TokenIndex(probe.embedding.weight, None),
                                torch.Generator())
        ids = torch.tensor([4, 9, 11])
        assert search.accepted(ids, search.verify(ids))[0] == 9
        sliced = search.cache_with(9)
        extended = probe.extend(probe.prefix_cache([1, 7, 8]), 9, 3)
        assert search.cache_with(5) is None  # never run at this position
    for (k, v, *_), (k2, v2, *_) in zip(sliced, extended):
        assert k.shape == k2.shape and k.shape[2] == 4
        torch.testing.assert_close(k, k2, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(v, v2, rtol=1e-5, atol=1e-6)


def test_token_map_ranks_a_random_prompts_tokens_and_is_cached(tiny_llama, test_cache):
    from lit_inversion.sipit.token_map import learned_token_map

    ids = _prompt(tiny_llama.vocab_size, 16, seed=29)
    with LayerProbe(tiny_llama, 2) as probe:
        token_map = learned_token_map(probe, [1], samples=2048)
        states = probe.states(ids, [1])
        index = TokenIndex(probe.embedding.weight, None, token_map)
        ranks = [int((index.map_top(s, tiny_llama.vocab_size) == t).nonzero()) for s, t in zip(states, ids)]
        cached = sorted((test_cache / "tables").glob("map2048x32ce*-layer2.pt"))
        again = learned_token_map(probe, [1], samples=2048)
    # Chance would put the median rank near vocab / 2; the map reads the token off the state, mostly first.
    assert sorted(ranks)[len(ranks) // 2] == 0 and max(ranks) < tiny_llama.vocab_size // 10, ranks
    assert len(cached) == 1
    torch.testing.assert_close(again.weight, token_map.weight)


def test_token_map_options_are_validated():
    with pytest.raises(Exception, match="map_share must be in"):
        SipItConfig(map_share=1.5)
