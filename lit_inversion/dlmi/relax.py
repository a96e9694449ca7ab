"""The relaxed prompt of the Gumbel/tau phase: p = softmax((Z + g) / tau) per position, embedded as p @ E.

Dense (the paper's): noise, softmax and mix run over the whole vocabulary. With a large vocabulary that
costs more than the model: on Gemma-3-270M (|V| = 262,144) the S x N x V noise, its softmax and
p @ E with its backward made a step 2.2-2.8x the model's own forward-and-backward of the same rows
(sparse: 1.04-1.10x; `benchmarks/dlmi.py --step-cost`, 2-core CPU).

Sparse: each position's relaxation is restricted to a support of k tokens, its top-k logits (plus the
best discrete token found so far), so the noise and softmax are [S, N, k] and the soft embedding is
a mix of k gathered rows of E. Only the gathered logits get gradients; a token outside the support
enters it when a member's logit falls below its own. With k = |V| it is the dense relaxation.
"""

from __future__ import annotations

import torch

# Auto (relax_topk=None) turns the sparse relaxation on from this vocabulary size. Below it the dense
# relaxation is a small share of a step (about a tenth on SmolLM2, |V| = 49,152) and is the published
# method; at Llama-3's 128k and Gemma's 262k it rivals or outgrows the model.
SPARSE_FROM_VOCAB = 100_000
# Tokens per position in the auto setting: as many as the swap search draws from (nanoGCG's top-k).
AUTO_TOPK = 256


def resolve_topk(topk: int | None, vocab_size: int) -> int:
    """The support size a run uses: 0 for the dense relaxation (`topk` 0, or k covering the vocabulary)."""
    if topk is None:
        topk = AUTO_TOPK if vocab_size >= SPARSE_FROM_VOCAB else 0
    return 0 if topk >= vocab_size else topk


@torch.no_grad()
def support(logits: torch.Tensor, k: int, keep: torch.Tensor | None = None) -> torch.Tensor:
    """[A, N, k] token ids: each position's top-k logits of `logits` [A, N, V]. `keep` [A, N] (the best
    discrete prompt) takes the last slot where it is not among them, so the relaxation can always
    represent it."""
    ids = logits.topk(k, -1).indices
    if keep is not None:
        present = (ids == keep[..., None]).any(-1)
        ids[..., -1] = torch.where(present, ids[..., -1], keep)
    return ids


def gumbel(shape: tuple[int, ...], generator: torch.Generator, eps: float) -> torch.Tensor:
    """Gumbel noise -log(-log u), u ~ U(eps, 0.999)."""
    u = torch.rand(shape, generator=generator, device=generator.device)
    return -torch.log(-torch.log(eps + (0.999 - eps) * u))


def relaxed_one_hot(z: torch.Tensor, g: torch.Tensor, tau: torch.Tensor) -> torch.Tensor:
    """[A, S, N, K] p = softmax((z + g) / tau) for logits z [A, N, K], noise g [A, S, N, K], tau [A, N]."""
    return torch.softmax((z[:, None] + g) / tau[:, None, :, None], -1)


def mix(p: torch.Tensor, E: torch.Tensor, ids: torch.Tensor | None = None) -> torch.Tensor:
    """[A*S, N, d] soft embeddings of p [A, S, N, K] over the support `ids` [A, N, K] (None: K = V, the
    whole vocabulary in order)."""
    if ids is None:
        return p.flatten(0, 1).to(E.dtype) @ E  # a half-precision model: its own dtype
    rows = E[ids]  # [A, N, K, d]: k rows per position instead of a [V, d] matmul
    return torch.einsum("asnk,ankd->asnd", p.to(rows.dtype), rows).flatten(0, 1)


def hard_ids(p: torch.Tensor, ids: torch.Tensor | None = None) -> torch.Tensor:
    """[A*S, N] token ids of each sample's argmax."""
    best = p.argmax(-1)
    if ids is not None:
        best = ids[:, None].expand(p.shape).gather(-1, best[..., None])[..., 0]
    return best.flatten(0, 1)


@torch.no_grad()
def adc_project(z: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """ADC's projection of z [A, N, V] onto distributions over each position's top `keep` [A] entries
    (negative entries dropped); a row left empty becomes one-hot at its largest entry."""
    A, N, V = z.shape
    out = torch.zeros_like(z)
    for a in range(A):
        k = int(min(V, keep[a]))
        values, ids = z[a].topk(k, -1)
        values = values.clamp(min=0)
        empty = values.sum(-1) == 0
        values[empty, 0] = 1.0
        out[a].scatter_(-1, ids, values / values.sum(-1, keepdim=True))
    return out
