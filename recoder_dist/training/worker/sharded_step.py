"""The training step of a model whose item tables are sharded over the ranks (hybrid
parallelism, ``recoder_dist.sharded``): a rank's batch as the sharded model reads it.

The batch is the same ``SparseBatch`` that the replicated step reads; its entries go to the
items' owners, so its columns become global item ids, and with negative sampling its sampled
items (those of its sampling group) are scored as well.
"""

from __future__ import annotations

import numpy as np
import torch

from recoder_dist.data.collator import SparseBatch
from recoder_dist.nn.base import sharded_class
from recoder_dist.sharded.decoder import computes
from recoder_dist.sharded.model import ShardedModel
from recoder_dist.training.batch import to_device
from recoder_dist.training.worker.step import DEBUG

TABLES = ("sharded", "replicated")


def check_tables(tables: str) -> None:
    if tables not in TABLES:
        raise ValueError(f"tables must be one of {TABLES}, got {tables!r}")


def shards_tables(model, loss_fn, tables: str, world: int, precision: str = "fp32") -> bool:
    """Whether a run of ``world`` ranks trains ``model`` with sharded tables: asked for, more
    than one rank (one rank holds every row either way), a model whose class has a sharded
    form (``nn.base.sharded_class``; the others replicate their tables), a loss
    that the sharded decoder computes (mse, logistic, logloss; a loss module of the user's
    reads the whole output) and float32 steps (bf16 autocast runs on the replicated path)."""
    return (
        tables == "sharded"
        and world > 1
        and sharded_class(model) is not None
        and computes(loss_fn)
        and precision == "fp32"
    )


def rank_batch(batch_size: int, num_sampling_users: int, world: int) -> tuple[int, int]:
    """Each rank's users a step and sampling group with sharded tables, where ``batch_size``
    and ``num_sampling_users`` are the step's global batch and sampling group, split evenly
    over the ranks: the settings of one process give the model of one process, whatever the
    number of workers. (Uneven shares would end an epoch when the rank of the larger share
    runs out of rows, leaving the others' last users untrained.)

    Raises:
        ValueError: a global batch that does not split evenly over the workers.
    """
    if batch_size % world:
        raise ValueError(
            f"batch_size={batch_size} does not split over {world} workers: with sharded tables "
            "it is the step's global batch, an equal share a worker (or tables='replicated')"
        )
    return batch_size // world, num_sampling_users // world


def sharded_batch_loss(
    model: ShardedModel,
    batch: SparseBatch,
    device: torch.device,
    loss,
    loss_params: dict,
    negative_sampling: bool,
    groups_exceed_batches: bool,
    epoch: int = 1,
    step: int = 0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(share, total)`` of this rank's ``batch`` (see ``ShardedModel.loss``): call
    ``backward`` on the share; ``total`` is the global batch's mean loss. A collective.

    ``groups_exceed_batches``: sampling groups hold more users than a batch
    (``num_sampling_users > batch_size``), so a batch scores items beyond its entries', which
    travel to their owners too (the same on every rank). ``epoch``, ``step``: as
    ``batch_loss``'s.
    """
    if DEBUG:
        batch.check()
    items = batch.cols if batch.items is None else batch.items[batch.cols]
    sampled = None
    if negative_sampling and groups_exceed_batches:
        sampled = to_device(np.ascontiguousarray(batch.items, dtype=np.int64), device)
    return model.loss(
        to_device(batch.rows, device),
        to_device(np.ascontiguousarray(items, dtype=np.int64), device),
        to_device(batch.values, device),
        batch.shape[0],
        users=to_device(np.ascontiguousarray(batch.users, dtype=np.int64), device),
        loss=loss,
        loss_params=loss_params,
        negative_sampling=negative_sampling,
        sampled=sampled,
        epoch=epoch,
        step=step,
    )
