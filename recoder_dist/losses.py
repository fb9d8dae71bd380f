"""Reconstruction losses, summed over the batch (the trainer divides by the number of users)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class MSELoss(nn.Module):
    """Squared error, weighted by ``1 + confidence`` on observed interactions (target > 0)."""

    def __init__(self, confidence: float = 0.0):
        super().__init__()
        self.confidence = confidence

    def forward(self, input: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        weights = 1 + self.confidence * (target > 0).to(input.dtype)
        return (weights * (input - target) ** 2).sum()


class MultinomialNLLLoss(nn.Module):
    """Multinomial log-likelihood of the row (Mult-DAE/Mult-VAE): ``-sum(target * log_softmax)``."""

    def forward(self, input: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return -(target * F.log_softmax(input, dim=1)).sum()


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
