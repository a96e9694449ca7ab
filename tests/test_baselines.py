"""The published baselines on tiny random models: GBDA, REINFORCE, GCG (output -> prompt), PEZ (states -> prompt)."""

from __future__ import annotations

import subprocess
from dataclasses import asdict, fields

import pytest
import torch

from lit_inversion import invert_hidden_states, invert_output
from lit_inversion.dlmi import DlmiBatch, DlmiConfig, greedy_decode
from tests.conftest import step_to_end as run_batch
from lit_inversion.dlmi import make_batch, method_config
from lit_inversion.dlmi.gcg import GcgBatch
from lit_inversion.dlmi.search import map_with_backoff
from lit_inversion.dlmi.vocab import allowed_tokens, retokenization_mask
from lit_inversion.dlmi.reinforce import ReinforceBatch, ema_update
from lit_inversion.errors import InversionError
from lit_inversion.metrics import lcs_ratio
from lit_inversion.results import read_results
from lit_inversion.sipit.pez import PezConfig
from lit_inversion.states import LayerProbe
from tests.conftest import cli_command
from tests.test_cli import _dlmi_config, _env, _prompts, _write_config, run_dlmi_cli

BOS = 1


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny ops: extra threads only add overhead
    yield
    torch.set_num_threads(threads)


def _reachable_target(loaded, prompt_length: int, length: int, seed: int) -> list[int]:
    """A target that some prompt is known to produce: greedy decode from a random prompt."""
    prompt = torch.randint(3, loaded.vocab_size, (1, prompt_length), generator=torch.Generator().manual_seed(seed))
    return greedy_decode(loaded.model, torch.cat([torch.tensor([[BOS]]), prompt], 1), length)[0].tolist()


def _word_tokenizer(words: list[str]):
    """A word-level tokenizer over `words` (ids 3..), with <unk> <s> </s> as 0 1 2."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{w: 3 + i for i, w in enumerate(words)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")


SMALL_GCG = dict(search_width=32, topk=16)


# ----- selection and presets -------------------------------------------------------------------------
def test_dlmi_method_keeps_dlmi_defaults_and_baselines_get_their_presets():
    dlmi = method_config("dlmi")
    assert {f.name: getattr(dlmi, f.name) for f in fields(DlmiConfig)} == asdict(DlmiConfig())
    gbda = method_config("gbda")
    assert (gbda.temperature, gbda.fixed_tau, gbda.teacher_forcing, gbda.learning_rate) == ("fixed", 1.0, False, 0.1)
    assert gbda.refine_steps == 0 and gbda.init == "random" and gbda.compute_dtype == "float32"
    assert method_config("gbda", fixed_tau=100.0).fixed_tau == 100.0  # the paper's other setting
    gcg = method_config("gcg")
    nano = (gcg.search_width, gcg.topk, gcg.n_replace, gcg.allow_non_ascii, gcg.filter_ids)
    assert nano == (512, 256, 1, False, True)
    assert gcg.check_every == 1 and gcg.keep_best and gcg.compute_dtype == "float32"
    assert not hasattr(gcg, "refine_fraction") and not hasattr(gcg, "tau0")  # no fake temperatures
    assert method_config("reinforce").baseline_decay == 0.9


@pytest.mark.parametrize("method, overrides, message", [
    ("soda", {}, "method must be one of dlmi, gbda, gcg, reinforce"),
    ("gcg", {"search_width": 0}, "search_width must be at least 1"),
    ("gcg", {"n_replace": 9, "prompt_length": 4}, r"n_replace \(9\) must not exceed prompt_length"),
    ("gcg", {"refine_fraction": 0.5}, r"unknown option\(s\) \['refine_fraction'\] for method gcg: GcgConfig has"),
    ("reinforce", {"gumbel_samples": 2}, "unknown option.*ReinforceConfig has .*samples"),
    ("reinforce", {"baseline_decay": 1.0}, r"baseline_decay must be in \[0, 1\)"),
    ("gcg", {"beam": 3}, "unknown option"),
])
def test_bad_options_raise_inversion_error(method, overrides, message):
    with pytest.raises(InversionError, match=message):
        method_config(method, **overrides)


def test_module_rejects_unknown_methods():
    from lit_inversion.dlmi import DlmiModule
    from lit_inversion.sipit import SipItModule

    with pytest.raises(InversionError, match="method must be a method's config .*GcgConfig"):
        DlmiModule(method="soda")
    with pytest.raises(InversionError, match="method must be SipItConfig .* or PezConfig"):
        SipItModule(method="hardprompt")


@pytest.mark.parametrize("method, options", [("gbda", {"gumbel_samples": 2}), ("reinforce", {"samples": 2}),
                                             ("gcg", SMALL_GCG)])
def test_each_baseline_runs_through_invert_output(tiny_llama, method, options):
    target = [5, 9, 5, 9]  # not reachable by this model: the run uses all its steps
    result = invert_output(target, model=tiny_llama, prompt_length=3, num_steps=6, method=method,
                           check_every=3, **options)
    decoded = greedy_decode(tiny_llama.model, torch.tensor([[BOS] + result.prompt_ids]), len(target))[0].tolist()
    assert len(result.prompt_ids) == 3 and result.output_ids == decoded and result.target_ids == target
    assert result.lcs_ratio == pytest.approx(lcs_ratio(decoded, target)) and result.exact_match == (decoded == target)
    assert 1 <= result.steps <= 6 and 0.0 <= result.soft_lcs_ratio <= 1.0 and result.seconds > 0
    assert type(make_batch(tiny_llama, [target], method_config(method))) is {
        "gbda": DlmiBatch, "reinforce": ReinforceBatch, "gcg": GcgBatch}[method]


# ----- GCG ---------------------------------------------------------------------------------------------
def test_gcg_reaches_exact_match_on_a_reachable_target(tiny_llama):
    target = _reachable_target(tiny_llama, prompt_length=4, length=5, seed=3)
    config = method_config("gcg", prompt_length=4, num_steps=50, search_width=8, topk=8)
    batch = GcgBatch(tiny_llama, [target], config)
    batch.check()
    assert not batch.done[0]  # the random start is not already an answer
    (result,) = run_batch(batch)
    assert result.exact_match and result.lcs_ratio == 1.0 and result.steps < config.num_steps
    decoded = greedy_decode(tiny_llama.model, torch.tensor([[BOS] + result.prompt_ids]), len(target))[0].tolist()
    assert decoded == target == result.output_ids


def test_gcg_keeps_a_prompt_that_already_matches(tiny_llama):
    prompt = torch.tensor([[40, 41, 42]])
    target = greedy_decode(tiny_llama.model, torch.cat([torch.tensor([[BOS]]), prompt], 1), 4)[0].tolist()
    batch = GcgBatch(tiny_llama, [target], method_config("gcg", prompt_length=3, check_every=100, **SMALL_GCG))
    batch.searches[0].prompt.copy_(prompt[0])
    batch.step()  # no check yet: the matching prompt must not be swapped away meanwhile
    assert batch.current[0].tolist() == prompt[0].tolist() and batch.soft_lcs[0] == 1.0
    (result,) = run_batch(batch)
    assert result.exact_match and result.prompt_ids == prompt[0].tolist()


def test_non_ascii_and_special_tokens_are_filtered():
    tok = _word_tokenizer(["hello", "héllo", "日本", "tab\there", "ok"])
    allowed = allowed_tokens(tok, 10, allow_non_ascii=False)
    assert allowed.tolist() == [False, False, False, True, False, False, False, True, False, False]
    # Rows 8, 9 are beyond the tokenizer (padded embeddings): never allowed.
    assert allowed_tokens(tok, 10, allow_non_ascii=True).tolist() == [True] * 8 + [False] * 2


def test_retokenization_filter_drops_prompts_that_change_ids():
    tok = _word_tokenizer(["a", "b", "a b"])  # "a b" decodes to text that encodes as [a, b]
    prompts = torch.tensor([[3, 4], [5, 3], [4, 3]])
    assert retokenization_mask(tok, prompts).tolist() == [True, False, True]


def test_gcg_never_proposes_a_disallowed_token(tiny_llama):
    batch = GcgBatch(tiny_llama, [[5, 6, 7]], method_config("gcg", prompt_length=3, **SMALL_GCG))
    search = batch.searches[0]
    prompt = search.prompt.clone()
    gain = torch.zeros(3, tiny_llama.vocab_size)
    gain[..., :3] = 1e6  # the gradient "wants" the special tokens most
    candidates = search._propose(lambda rows: gain[rows], prompt)
    assert 0 < len(candidates) <= 32 and candidates.shape[1] == 3
    assert not torch.isin(candidates, torch.tensor([0, 1, 2])).any()
    assert ((candidates != prompt).sum(-1) == 1).all()  # n_replace = 1: one changed position each
    two = GcgBatch(tiny_llama, [[5, 6, 7]], method_config("gcg", prompt_length=3, n_replace=2, **SMALL_GCG))
    candidates = two.searches[0]._propose(lambda rows: gain[rows], prompt)
    assert ((candidates != prompt).sum(-1) == 2).all() and not torch.isin(candidates, torch.tensor([0, 1, 2])).any()


def test_gcg_scoring_halves_its_batch_and_retries_on_out_of_memory(tiny_llama, monkeypatch):
    batch = GcgBatch(tiny_llama, [[5, 6, 7]], method_config("gcg", prompt_length=3, batch_size=16,
                                                            search_width=96, topk=32, filter_ids=False))
    sizes = []
    scorer = batch.searches[0].scorer
    original = scorer.prompts

    def flaky(prompts, first, target, cache):
        sizes.append(len(prompts))
        if len(sizes) == 1:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 1.00 GiB (simulated)")
        return original(prompts, first, target, cache)

    monkeypatch.setattr(scorer, "prompts", flaky)
    stats = batch.step()
    # 96 candidates, 32 per position: the failed 16 retried as 8s, and every later slice is 8.
    assert sizes[:3] == [16, 8, 8] and set(sizes[1:]) == {8} and sum(sizes[1:]) == 96
    assert batch.scoring_batch_size == 8 and torch.isfinite(stats.loss[0])


def test_backoff_gives_up_cleanly():
    def always_oom(start, end):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    with pytest.raises(InversionError, match="out of memory scoring a single GCG candidate"):
        map_with_backoff(always_oom, 4, 4)

    def broken(start, end):
        raise ValueError("not memory")

    with pytest.raises(ValueError):  # other errors are not retried
        map_with_backoff(broken, 4, 4)
    assert map_with_backoff(lambda s, e: (s, e), 5, 2) == ([(0, 2), (2, 4), (4, 5)], 2)


def test_gcg_state_dict_resumes_exactly(tiny_llama):
    config = method_config("gcg", prompt_length=3, num_steps=20, **SMALL_GCG)
    first = GcgBatch(tiny_llama, [[5, 9, 5, 9]], config)
    for _ in range(2):
        first.step()
    second = GcgBatch(tiny_llama, [[5, 9, 5, 9]], config)
    second.load_state_dict({k: v.clone() if torch.is_tensor(v) else v for k, v in first.state_dict().items()})
    for _ in range(2):
        first.step()
        second.step()
    assert torch.equal(first.current, second.current) and int(second.steps[0]) == 4


# ----- REINFORCE ---------------------------------------------------------------------------------------
def test_reinforce_baseline_is_an_ema_of_the_reward(tiny_llama):
    assert torch.allclose(ema_update(torch.tensor([2.0]), torch.tensor([-1.0]), 0.9), torch.tensor([1.7]))
    config = method_config("reinforce", prompt_length=3, num_steps=10, samples=4)
    batch = ReinforceBatch(tiny_llama, [[5, 6, 7], [8, 9]], config)
    z = batch.logits.detach().clone()
    first = batch.step().loss  # mean teacher-forced CE = minus the mean reward
    baseline = batch.reward_baseline.clone()
    assert torch.allclose(baseline, -first)  # started at the first mean reward
    second = batch.step().loss
    assert torch.allclose(batch.reward_baseline, 0.9 * baseline + 0.1 * -second)
    assert not torch.equal(z, batch.logits.detach())  # the score-function gradient moved Z


# ----- PEZ (hidden states -> prompt) -------------------------------------------------------------------
def test_pez_recovers_a_short_prompt_at_an_early_layer(tiny_llama):
    ids = torch.randint(3, tiny_llama.vocab_size, (4,), generator=torch.Generator().manual_seed(1)).tolist()
    with LayerProbe(tiny_llama, 1) as probe:
        states = probe.states(ids, [BOS])
    result = invert_hidden_states(states, model=tiny_llama, layer=1, true_ids=ids, method="pez", budget_scale=0.5)
    assert result.exact_match and result.token_accuracy == 1.0 and all(result.verified)
    assert result.recovered_text == tiny_llama.tokenizer.decode(ids)
    steps = result.candidates_tested[0]
    assert 1 < steps < 0.5 * 4 * tiny_llama.vocab_size  # it had to optimise, and stopped on the exact match
    assert result.max_distance == max(result.distances) and len(result.distances) == 4


def test_pez_budget_and_options():
    assert PezConfig().steps_for(20, 100) == 2000  # T * |V|
    assert PezConfig(budget_scale=0.01).steps_for(20, 100) == 20
    assert PezConfig(num_steps=7, budget_scale=0.01).steps_for(20, 100) == 7
    with pytest.raises(InversionError, match="budget_scale must be positive"):
        PezConfig(budget_scale=0)


def test_pez_with_a_small_budget_still_returns_a_full_record(tiny_llama):
    ids = [7, 8, 9, 10, 11]
    with LayerProbe(tiny_llama, 3) as probe:
        states = probe.states(ids, [BOS])
    result = invert_hidden_states(states, model=tiny_llama, layer=3, true_ids=ids, method="pez", num_steps=2)
    assert len(result.recovered_ids) == 5 and result.candidates_tested == [2] * 5
    assert 0.0 <= result.token_accuracy <= 1.0 and result.seconds > 0


# ----- the CLI -----------------------------------------------------------------------------------------
@pytest.mark.slow
def test_cli_runs_gcg_and_writes_records(tmp_path, tiny_llama_dir):
    records, stdout = run_dlmi_cli(_dlmi_config(tmp_path, tiny_llama_dir, num_steps=12), "--model.method", "GcgConfig",
                                   "--model.method.search_width", "16", "--model.method.topk", "8")
    for r in records:
        assert len(r["prompt_ids"]) == 3 and 1 <= r["steps"] <= 12
        assert r["exact_match"] and r["output_ids"] == r["target_ids"]  # reachable targets
    assert "GCG: 4 targets, exact match 4/4" in stdout


@pytest.mark.slow
def test_cli_runs_pez_and_writes_sipit_records(tmp_path, tiny_llama_dir):
    config = _write_config(tmp_path, tiny_llama_dir, _prompts(tmp_path, 2, 4), layer=1)
    run = subprocess.run(cli_command() + ["fit", "--config", str(config), "--model.method", "PezConfig",
                                          "--model.method.budget_scale", "0.5"],
                         capture_output=True, text=True, env=_env(), timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    records = read_results(tmp_path / "results.jsonl")
    assert [r["id"] for r in records] == ["prompts-1", "prompts-2"]
    for r in records:
        assert set(r) >= {"id", "true_ids", "recovered_ids", "recovered_text", "exact_match", "token_accuracy",
                          "seconds", "candidates_tested", "max_distance", "verified", "layer"}
        assert len(r["recovered_ids"]) == 4 and r["layer"] == 1
        assert r["exact_match"] and r["recovered_ids"] == r["true_ids"]  # an easy layer on this model
    assert "PEZ: 2 targets" in run.stdout
