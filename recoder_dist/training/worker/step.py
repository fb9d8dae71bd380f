"""A batch's loss (the training step's forward)."""

from __future__ import annotations

import os

import numpy as np
import torch

from recoder_dist.data.collator import SparseBatch
from recoder_dist.training.batch import (
    checked_output,
    densify,
    model_input,
    to_device,
    unwrapped,
)

# RECODER_DIST_DEBUG=1: check every batch's promises (SparseBatch.check) before the step.
DEBUG = os.environ.get("RECODER_DIST_DEBUG") == "1"


def batch_loss(
    model,
    loss_fn,
    batch: SparseBatch,
    device: torch.device,
    bf16: bool = False,
    *,
    compiled: bool = True,
    epoch: int = 1,
    step: int = 0,
) -> torch.Tensor:
    """Loss of one batch, averaged over its users: the reconstruction loss plus the model's
    own terms (``loss_terms``, given ``epoch`` and ``step``, the updates before this one).

    The model reads the batch's rows over the sampled items and is scored on the same items.
    With ``bf16`` the model's forward runs under autocast to bfloat16 (its weights and
    gradients stay float32); the loss is computed from its output cast back to float32.
    ``compiled``: the CPU fast paths (see ``model_input``), or their references.
    """
    if DEBUG:
        batch.check()
    input = model_input(model, batch, device, compiled=compiled)
    target = input
    if input.is_sparse and not getattr(loss_fn, "accepts_sparse_target", False):
        target = densify(batch, device)
    users = to_device(batch.users, device)
    items = None if batch.items is None else to_device(batch.items.astype(np.int64), device)
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
        output = model(
            input, input_users=users, input_items=items, target_users=users, target_items=items
        )
    checked_output(model, output, batch.shape)
    loss = loss_fn(output.float(), target)
    terms = unwrapped(model).loss_terms(epoch, step) if model.training else None
    if terms is not None:
        loss = loss + terms.float()
    return loss / max(batch.shape[0], 1)
