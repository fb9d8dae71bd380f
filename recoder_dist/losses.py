"""Reconstruction losses, summed over the batch (the trainer divides by the number of users).

A loss that sets ``accepts_sparse_target`` also takes the target as a coalesced sparse COO
tensor: the trainer then never builds the dense batch on CPU. Its value is the dense formula's,
with the terms at the target's entries computed from those entries alone (equal up to rounding).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class MSELoss(nn.Module):
    """Squared error, weighted by ``1 + confidence`` on observed interactions (target > 0)."""

    accepts_sparse_target = True

    def __init__(self, confidence: float = 0.0):
        super().__init__()
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


def _at_entries(dense: torch.Tensor, sparse: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The entries of ``dense`` where ``sparse`` has entries, and ``sparse``'s values."""
    sparse = sparse.coalesce()
    rows, cols = sparse.indices()
    # One flat index_select: cheaper than 2-D advanced indexing.
    flat = torch.add(cols, rows, alpha=dense.shape[1])
    return dense.reshape(-1).index_select(0, flat), sparse.values()


def _logistic(**params) -> nn.Module:
    return nn.BCEWithLogitsLoss(reduction="sum", **params)


LOSSES = {"mse": MSELoss, "logistic": _logistic, "logloss": MultinomialNLLLoss}


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
