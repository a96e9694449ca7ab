"""DLMI with a large vocabulary: the sparse (top-k) relaxation, and a step's cost against the model's own
forward-and-backward on a tiny model with a 262,144-token vocabulary (Gemma-3's)."""

from __future__ import annotations

import pytest
import torch

from tests.conftest import swap_options

from lit_inversion.dlmi import relax
from lit_inversion.dlmi import DlmiBatch, DlmiConfig
from lit_inversion.models import LoadedModel

BIG_VOCAB = 262_144
BOS = 1


@pytest.fixture(scope="module")
def big_vocab():
    """A 2-layer, d = 32 Llama whose embedding and LM head have 262,144 rows. Its tokenizer names only
    the first 96 ids (a 262k-entry tokenizer takes ~10 s to build and decode); the relaxation and the
    model's cost do not depend on it."""
    from tests.conftest import TINY_VOCAB, _tokenizer, tiny_model

    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    model = tiny_model("llama", layers=2, vocab_size=BIG_VOCAB).eval().requires_grad_(False)
    yield LoadedModel(model=model, tokenizer=_tokenizer(TINY_VOCAB), name="tiny-262k")
    torch.set_num_threads(threads)


def test_sparse_relaxation_over_the_whole_vocabulary_is_the_dense_one():
    """With a support that covers every token (in top-k order, not id order) the sparse relaxation gives
    the dense one's soft embeddings, hard samples and logit gradients, for the same noise per token."""
    g = torch.Generator().manual_seed(0)
    A, S, N, V, d = 2, 3, 4, 50, 8
    logits = torch.randn(A, N, V, generator=g, requires_grad=True)
    noise = relax.gumbel((A, S, N, V), g, 1e-10)
    tau = torch.rand(A, N, generator=g) + 0.5
    E = torch.randn(V, d, generator=g)
    weights = torch.randn(A * S, N, d, generator=g)

    dense_p = relax.relaxed_one_hot(logits, noise, tau)
    dense = relax.mix(dense_p, E)
    (dense_grad,) = torch.autograd.grad((dense * weights).sum(), logits)

    ids = relax.support(logits, V)
    assert not torch.equal(ids, torch.arange(V).expand(A, N, V))  # a real permutation
    z = logits.gather(-1, ids)
    sparse_p = relax.relaxed_one_hot(z, noise.gather(-1, ids[:, None].expand(-1, S, -1, -1)), tau)
    sparse = relax.mix(sparse_p, E, ids)
    (sparse_grad,) = torch.autograd.grad((sparse * weights).sum(), logits)

    assert torch.allclose(sparse, dense, atol=1e-5)
    assert torch.equal(relax.hard_ids(sparse_p, ids), relax.hard_ids(dense_p))
    assert torch.allclose(sparse_grad, dense_grad, atol=1e-6)


def test_support_keeps_the_best_discrete_token():
    logits = torch.tensor([[[5.0, 4.0, 3.0, 2.0, 1.0], [1.0, 2.0, 3.0, 4.0, 5.0]]])
    ids = relax.support(logits, 2, keep=torch.tensor([[4, 3]]))
    assert ids.tolist() == [[[0, 4], [4, 3]]]  # 4 replaces the 2nd slot at position 0; 3 is already in at 1


@pytest.mark.parametrize("vocab, requested, used", [(BIG_VOCAB, None, relax.AUTO_TOPK), (49_152, None, 0),
                                                    (BIG_VOCAB, 0, 0), (BIG_VOCAB, 64, 64), (96, 200, 0)])
def test_relax_topk_resolution(vocab, requested, used):
    """Auto: sparse from 100k tokens (dense for SmolLM2's 49k); 0 or k >= |V| is the dense relaxation."""
    assert relax.resolve_topk(requested, vocab) == used


def test_a_relaxed_step_at_a_262k_vocabulary_is_sparse_and_finite(big_vocab):
    """At |V| = 262,144 a relaxed step (8 Gumbel samples, N = M = 20) uses the sparse relaxation by
    default. Its cost against the model's own forward-and-backward is a benchmark, not a test:
    `python benchmarks/dlmi.py --step-cost` prints the ratio."""
    N, M, S = 20, 20, 8
    target = torch.randint(3, 96, (M,), generator=torch.Generator().manual_seed(1)).tolist()
    config = DlmiConfig(prompt_length=N, num_steps=100, gumbel_samples=S, refine_fraction=0.0,
                        compute_dtype="float32", check_every=1000)
    batch = DlmiBatch(big_vocab, [target], config)
    assert batch.relax_topk == relax.AUTO_TOPK
    before = batch.logits.detach().clone()
    for _ in range(2):
        batch.step()
    changed = (batch.logits.detach() != before).any(-1)  # only the gathered top-k logits get gradients
    assert int(batch.steps[0]) == 2 and torch.isfinite(batch.logits).all() and changed.all()
    assert int((batch.logits.detach() != before).sum(-1).max()) <= 2 * relax.AUTO_TOPK


def test_swap_gains_are_computed_only_where_the_step_swaps(big_vocab):
    """The one-hot gain is computed at the step's positions only; every candidate's new token is still
    among the top-k of the dense [N, V] gain at its position."""
    from lit_inversion.dlmi.search import PromptScorer, SwapSearch

    g = torch.Generator().manual_seed(0)
    N, E = 6, big_vocab.model.get_input_embeddings().weight
    prompt, target = torch.randint(3, BIG_VOCAB, (N,), generator=g), torch.tensor([5, 6, 7])
    swap = SwapSearch(PromptScorer(big_vocab.model, [BOS]), target, torch.ones(BIG_VOCAB, dtype=torch.bool), prompt,
                      swap_options(candidates=16, topk=32, positions=2), g)
    grad = torch.randn(N, E.shape[1], generator=g)
    asked = []

    def gain(positions):
        asked.append(positions.tolist())
        return swap._gain(grad, positions)

    candidates = swap._propose(gain, prompt)
    dense = -(grad @ E.T)
    dense[torch.arange(N), prompt] = -torch.inf  # a swap must change the token
    assert len(asked) == 1 and len(asked[0]) == 2 and len(candidates) == 16
    for cand in candidates:
        (p,) = torch.nonzero(cand != prompt).flatten().tolist()
        assert p in asked[0] and int(cand[p]) in dense[p].topk(32).indices.tolist()
