"""A collated batch on the device, as a model reads it: the training step's input and the
evaluation's alike."""

from __future__ import annotations

import numpy as np
import torch
from torch.nn.parallel import DistributedDataParallel

from recoder_dist.data.collator import SparseBatch


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


def checked_output(model, output, shape: tuple[int, int]) -> torch.Tensor:
    """``model``'s forward ``output``, refused unless it is a tensor of ``shape``: the batch's
    users x the items it scores (a model of one's own may return anything)."""
    if isinstance(output, torch.Tensor) and tuple(output.shape) == tuple(shape):
        return output  # every step: nothing more is computed
    name = type(unwrapped(model)).__name__
    if not isinstance(output, torch.Tensor):
        raise TypeError(
            f"{name}.forward returned {type(output).__name__}; expected a tensor of scores, "
            "users x target items"
        )
    raise ValueError(
        f"{name}.forward returned shape {tuple(output.shape)}; expected {tuple(shape)} "
        "(users x target items: the given target_items, or every item)"
    )
