"""Exact top-k over every item for a batch of users.

On CPU the top k of float32 rows is taken by ``top_k_kernel`` (compiled); its reference, and
the way everywhere else, is ``torch.topk``.
"""

from __future__ import annotations

import torch

from recoder_dist.training.evaluation import top_k_kernel


def top_k(
    scores: torch.Tensor, k: int, *, compiled: bool = True
) -> tuple[torch.Tensor, torch.Tensor]:
    """``torch.topk(scores, k, dim=1)`` (values sorted, largest first) for a 2-D matrix;
    ``compiled``: through ``top_k_kernel`` where it applies."""
    if compiled and top_k_kernel.applies(scores, k):
        return top_k_kernel.top_k_rows(scores, k)
    return torch.topk(scores, k, dim=1)
