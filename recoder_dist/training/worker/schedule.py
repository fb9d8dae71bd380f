"""How many steps an epoch has on every rank, and the batches of one rank's epoch."""

from __future__ import annotations

import itertools
import logging

import numpy as np
import ray
import torch
import torch.distributed as dist

from recoder_dist.data.collator import Collator, SparseBatch, batches_per_group
from recoder_dist.data.epoch_order import RowBlocks, rank_rows, shuffled_groups
from recoder_dist.data.ray_dataset import rows_from_arrow
from recoder_dist.training.config import TrainSettings

logger = logging.getLogger(__name__)


def agreed_steps(settings: TrainSettings, collator: Collator, world: int, device) -> int:
    """Steps every rank runs this epoch, with its ``collator``'s batch geometry. ``rank_rows``
    gives each rank ``rows // world`` rows or one more; the all-reduce (min) makes any
    disagreement impossible."""
    rows = settings.num_train_rows // world
    group = collator.num_sampling_users
    steps = (rows // group) * (group // collator.batch_size)
    steps += batches_per_group(rows % group, collator.batch_size)
    if settings.iters_per_epoch:
        steps = min(steps, settings.iters_per_epoch)
    if world > 1 and dist.is_initialized():
        agreed = torch.tensor([steps], device=device)
        dist.all_reduce(agreed, op=dist.ReduceOp.MIN)
        steps = int(agreed.item())
    if steps < 1:
        raise ValueError(
            f"{settings.num_train_rows} training users over {world} workers leave no batch"
        )
    return steps


def epoch_batches(
    blocks: RowBlocks,
    collator: Collator,
    steps: int,
    seeds: tuple[int, int, int],
    world: int,
    fetch=ray.get,
    note=logger.warning,
):
    """Exactly ``steps`` batches of rank ``seeds[2]``'s rows in epoch ``seeds[1]`` (see
    ``epoch_order``); a rank whose rows run dry pads with empty batches (zero gradient) so
    that the collectives of the other ranks still find a partner, and says so once through
    ``note``."""
    seed, epoch, rank = seeds
    groups = shuffled_groups(
        rank_rows(blocks, seed, epoch, rank, world, fetch),
        collator.num_sampling_users,
        window=max(4 * collator.num_sampling_users, 1024),
        seed=seeds,
    )
    batches = (batch for group in groups for batch in collator(rows_from_arrow(group)))
    empty = SparseBatch(
        users=np.zeros(0, np.int64),
        items=np.zeros(0, np.int64) if collator.negative_sampling else None,
        rows=np.zeros(0, np.int64),
        cols=np.zeros(0, np.int64),
        values=np.zeros(0, np.float32),
        shape=(0, 0 if collator.negative_sampling else collator.num_items),
    )
    for step, batch in enumerate(itertools.chain(batches, [None])):
        if step == steps:
            return
        if batch is None:
            note(f"a worker ran out of rows at step {step} of {steps}: empty batches pad it")
            yield from itertools.repeat(empty, steps - step)
            return
        yield batch
