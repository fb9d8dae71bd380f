"""The 2D layout on 4 gloo ranks (2 groups of 2: shards within a group, replicas across) against
one process that averages the two groups' batch losses (each group sampling its own items)."""

from __future__ import annotations

import numpy as np
import torch

from recoder_dist.data.collator import Collator, UserRows
from recoder_dist.losses import build_loss
from recoder_dist.sharded.autoencoder import ShardedAutoencoder
from recoder_dist.sharded.replicas import average_replicas, layout_groups
from recoder_dist.training.worker.optimizers import build_optimizers
from recoder_dist.training.worker.step import batch_loss
from tests.sharded_harness import interactions, rank_entries, run_ranks, split
from tests.test_sharded_step import NUM_ITEMS, TOUCHED, _close_state, _reference

GROUP_USERS = [np.arange(0, 10), np.arange(10, 20)]  # each group's batch, a step
GROUP_SIZES = [[6, 4], [3, 7]]  # users per rank within each group
# Adam divides out a gradient's scale: SGD with sparse tables checks the average's.
CASES = [
    ("mse", True, "adam", True),
    ("logistic", True, "sgd", True),
    ("logloss", False, "sgd", False),
]


def _two_groups(rank, world):
    shard_group, replica_group = layout_groups(2)
    group, member = divmod(rank, 2)
    matrix = interactions(20, NUM_ITEMS, TOUCHED, seed=5)
    for number, (loss, negative_sampling, optimizer, sparse) in enumerate(CASES):
        reference = _reference([6], False, sparse, seed=number)
        sharded = ShardedAutoencoder(NUM_ITEMS, [6], sparse=sparse, group=shard_group)
        sharded.load_from(reference)
        reference_opt = build_optimizers(reference, optimizer, 0.05, 0.0)
        sharded_opt = build_optimizers(sharded, optimizer, 0.05, 0.0)
        for _ in range(2):
            reference_opt.zero_grad()
            for users in GROUP_USERS:
                collate = Collator(
                    num_items=NUM_ITEMS, batch_size=10, negative_sampling=negative_sampling
                )
                batch = next(collate(UserRows.from_csr(matrix, users)))
                expected = batch_loss(reference, build_loss(loss), batch, torch.device("cpu"))
                (expected / 2).backward()
            reference_opt.step()

            users = GROUP_USERS[group][split(GROUP_SIZES[group], member)]
            rows, items, values, num_users = rank_entries(matrix, users)
            share, _ = sharded.loss(
                rows, items, values, num_users, loss=loss, negative_sampling=negative_sampling
            )
            sharded_opt.zero_grad()
            share.backward()
            sharded.all_reduce_dense_grads()
            average_replicas(sharded, replica_group)
            sharded_opt.step()

        # Each group's copy is the whole model, on the group's first member.
        _close_state(sharded, reference, f"{loss}, group {group}")


def test_two_groups_of_two_ranks():
    run_ranks(4, _two_groups)
