"""Moving a sparse batch to the device and computing its loss."""

from __future__ import annotations

import os

import numpy as np
import torch
from torch.nn.parallel import DistributedDataParallel

from recoder_dist.data.collator import SparseBatch

# RECODER_DIST_DEBUG=1: check every batch's promises (SparseBatch.check) before the step.
DEBUG = os.environ.get("RECODER_DIST_DEBUG") == "1"


def to_device(array: np.ndarray, device: torch.device) -> torch.Tensor:
    tensor = torch.from_numpy(array)
    if device.type == "cuda":
        return tensor.pin_memory().to(device, non_blocking=True)
    return tensor


def densify(batch: SparseBatch, device: torch.device) -> torch.Tensor:
    """The batch as a dense tensor, built on ``device``: only the non-zeros cross the bus."""
    dense = torch.zeros(batch.shape, dtype=torch.float32, device=device)
    rows, cols = to_device(batch.rows, device), to_device(batch.cols, device)
    dense[rows, cols] = to_device(batch.values, device)
    return dense


def sparse_tensor(batch: SparseBatch) -> torch.Tensor:
    """The batch as a CPU sparse COO tensor, flagged coalesced: its entries are row-major and
    distinct (the collator's order), so nothing is sorted again."""
    indices = torch.from_numpy(np.stack([batch.rows, batch.cols]))
    values = torch.from_numpy(batch.values).to(torch.float32)  # no copy when already float32
    return torch.sparse_coo_tensor(
        indices, values, batch.shape, is_coalesced=True, check_invariants=False
    )


def unwrapped(model):
    """The model inside a DistributedDataParallel wrapper, or ``model`` itself."""
    return model.module if isinstance(model, DistributedDataParallel) else model


def model_input(
    model, batch: SparseBatch, device: torch.device, *, compiled: bool = True
) -> torch.Tensor:
    """The batch as ``model`` reads it: sparse on CPU when the model takes a sparse input
    (building the dense batch costs more than the encoder itself there), otherwise dense.
    ``compiled=False`` (the references): always dense."""
    sparse_ok = getattr(unwrapped(model), "accepts_sparse_input", False)
    if compiled and device.type == "cpu" and sparse_ok:
        return sparse_tensor(batch)
    return densify(batch, device)


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
    loss = loss_fn(output.float(), target)
    terms = unwrapped(model).loss_terms(epoch, step) if model.training else None
    if terms is not None:
        loss = loss + terms.float()
    return loss / max(batch.shape[0], 1)
