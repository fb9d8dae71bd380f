"""Exact top-k over every item for a batch of users, fast on CPU.

Two costs dominate evaluation on CPU: the top k of each row, and on a large catalog the score
product written whole, past the caches.

- ``top_k_kernel`` (compiled; its reference is ``torch.topk``) takes the top k of float32 rows.
- ``top_k_of_product`` computes a factored model's scores slice by slice of ``SLICE`` items,
  each slice written while it stays in cache.

Off CPU, ``torch.topk`` runs on the whole matrix.
"""

from __future__ import annotations

import torch

from recoder_dist import kernels
from recoder_dist.training import top_k_kernel

SLICE = 1024  # items per slice of the product: 500 users x 1,024 floats (2 MB) stay cached


def top_k(scores: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``torch.topk(scores, k, dim=1)`` (values sorted, largest first) for a 2-D matrix."""
    if kernels.compiled() and top_k_kernel.applies(scores, k):
        return top_k_kernel.top_k_rows(scores, k)
    return torch.topk(scores, k, dim=1)


def top_k_of_product(
    codes: torch.Tensor,
    vectors: torch.Tensor,
    bias: torch.Tensor,
    k: int,
    excluded_rows: torch.Tensor,
    excluded_cols: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``top_k`` of ``bias + codes @ vectors.T`` with the entries ``(excluded_rows[j],
    excluded_cols[j])`` set to -inf; on CPU, computed in slices of ``SLICE`` items."""
    scores = _scores(codes, vectors, bias)
    scores[excluded_rows, excluded_cols] = -torch.inf
    return top_k(scores, k)


def _scores(codes, vectors, bias) -> torch.Tensor:
    """``bias + codes @ vectors.T``: on CPU slice by slice, each slice's product written while
    it stays in cache; elsewhere whole."""
    if codes.device.type != "cpu":
        return torch.addmm(bias, codes, vectors.t())
    scores = torch.empty((len(codes), len(vectors)), dtype=codes.dtype)
    for lo in range(0, len(vectors), SLICE):
        hi = min(lo + SLICE, len(vectors))
        torch.addmm(bias[lo:hi], codes, vectors[lo:hi].t(), out=scores[:, lo:hi])
    return scores
