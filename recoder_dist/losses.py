"""Reconstruction losses, summed over the batch (the trainer divides by the number of users).

A loss that sets ``accepts_sparse_target`` also takes the target as a coalesced sparse COO
tensor: the trainer then never builds the dense batch on CPU. Its value is the dense formula's,
with the terms at the target's entries computed from those entries alone (equal up to rounding).
"""

from __future__ import annotations

import math
import numbers

import torch
import torch.nn.functional as F
from torch import nn


class MSELoss(nn.Module):
    """Squared error, weighted by ``1 + confidence`` on observed interactions (target > 0)."""

    accepts_sparse_target = True

    def __init__(self, confidence: float = 0.0):
        super().__init__()
        # Below -1 an observed entry's weight is negative: the loss falls without bound.
        if (
            isinstance(confidence, bool)
            or not isinstance(confidence, numbers.Real)
            or not (-1 <= confidence < math.inf)
        ):
            raise ValueError(f"confidence must be a finite number >= -1, got {confidence!r}")
        self.confidence = confidence

    def forward(self, input: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        if target.is_sparse:
            # Every entry costs input**2 as if its target were 0; the non-zeros are corrected.
            scores, values = _at_entries(input, target)
            weights = 1 + self.confidence * (values > 0).to(input.dtype)
            correction = weights * (scores - values) ** 2 - scores**2
            return (input**2).sum() + correction.sum()
        weights = 1 + self.confidence * (target > 0).to(input.dtype)
        return (weights * (input - target) ** 2).sum()


class MultinomialNLLLoss(nn.Module):
    """Multinomial log-likelihood of the row (Mult-DAE/Mult-VAE): ``-sum(target * log_softmax)``."""

    accepts_sparse_target = True

    def forward(self, input: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        log_probabilities = F.log_softmax(input, dim=1)
        if target.is_sparse:
            entries, values = _at_entries(log_probabilities, target)
            return -(values * entries).sum()
        return -(target * log_probabilities).sum()


class BPRLoss(nn.Module):
    """Bayesian personalized ranking (Rendle et al., 2009): for each observed entry ``(u, i)``
    of the target, ``negatives`` columns ``j`` drawn uniformly from the scored ones, and
    ``-log sigmoid(s_ui - s_uj)`` summed (a drawn ``j`` that the user has is left out; values
    count as 1). Scoring every item (no negative sampling), ``j`` is uniform over the catalog,
    BPR's own; with negative sampling, over the items of the sampling group, which favours
    popular items.

    Args:
        negatives: items drawn for each observed entry.
    """

    accepts_sparse_target = True

    def __init__(self, negatives: int = 1):
        super().__init__()
        if int(negatives) < 1:
            raise ValueError(f"negatives must be >= 1, got {negatives}")
        self.negatives = int(negatives)

    def forward(self, input: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        if target.is_sparse:
            rows, cols = target.coalesce().indices()
        else:
            rows, cols = target.nonzero(as_tuple=True)
        width = input.shape[1]
        drawn = torch.randint(0, width, (len(rows), self.negatives), device=input.device)
        # Whether a drawn column is one of the row's entries: the entries' flat positions,
        # sorted, looked up (row-major entries come sorted).
        flat = (rows * width + cols).sort().values
        keys = rows.unsqueeze(1) * width + drawn
        found = torch.searchsorted(flat, keys).clamp_max(max(len(flat) - 1, 0))
        negative = flat[found] != keys if len(flat) else torch.ones_like(keys, dtype=torch.bool)
        positive_scores = input[rows, cols].unsqueeze(1)
        drawn_scores = input[rows.unsqueeze(1), drawn]
        return (F.softplus(drawn_scores - positive_scores) * negative).sum()


def _at_entries(dense: torch.Tensor, sparse: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The entries of ``dense`` where ``sparse`` has entries, and ``sparse``'s values."""
    sparse = sparse.coalesce()
    rows, cols = sparse.indices()
    # One flat index_select: cheaper than 2-D advanced indexing.
    flat = torch.add(cols, rows, alpha=dense.shape[1])
    return dense.reshape(-1).index_select(0, flat), sparse.values()


def _logistic(**params) -> nn.Module:
    return nn.BCEWithLogitsLoss(reduction="sum", **params)


LOSSES = {"mse": MSELoss, "logistic": _logistic, "logloss": MultinomialNLLLoss, "bpr": BPRLoss}


def build_loss(loss: str | nn.Module, loss_params: dict | None = None) -> nn.Module:
    """The loss module for a name in :data:`LOSSES`, or ``loss`` itself if it is a Module.

    A custom Module must reduce by sum: the trainer divides by the number of users.
    """
    if isinstance(loss, nn.Module):
        return loss
    if not isinstance(loss, str):
        raise TypeError(f"loss must be a name or a torch.nn.Module, got {type(loss).__name__}")
    if loss not in LOSSES:
        raise ValueError(f"unknown loss {loss!r}; choose one of {sorted(LOSSES)} or pass a Module")
    try:
        return LOSSES[loss](**(loss_params or {}))
    except TypeError as e:
        raise ValueError(f"bad loss_params {loss_params} for loss {loss!r}: {e}") from None
