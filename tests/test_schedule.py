"""The steps of an epoch: their count from the batch geometry, and padding a short shard."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse as sp
import torch

from recoder_dist.data import Collator, RecommendationDataset
from recoder_dist.data.epoch_order import RowBlocks
from recoder_dist.data.ray_dataset import user_rows_table
from recoder_dist.losses import build_loss
from recoder_dist.nn import DynamicAutoencoder, MatrixFactorization
from recoder_dist.training.config import TrainSettings
from recoder_dist.training.worker.schedule import agreed_steps, epoch_batches
from recoder_dist.training.worker.step import batch_loss


def blocks_of(table, rows_per_block=4) -> RowBlocks:
    """The table in blocks, each block its own reference (what ``ray.get`` would fetch)."""
    starts = range(0, table.num_rows, rows_per_block)
    slices = tuple(table.slice(start, rows_per_block) for start in starts)
    return RowBlocks(slices, tuple(s.num_rows for s in slices))


def one_rank(blocks, collator, steps, note=None):
    kwargs = {"note": note} if note else {}
    return epoch_batches(blocks, collator, steps, (0, 1, 0), 1, fetch=lambda t: t, **kwargs)


def settings(rows, batch_size, sampling_users=0, iters=None) -> TrainSettings:
    return TrainSettings(
        lr=0.1,
        weight_decay=0.0,
        num_epochs=1,
        batch_size=batch_size,
        num_sampling_users=sampling_users or batch_size,
        negative_sampling=True,
        iters_per_epoch=iters,
        num_train_rows=rows,
    )


@pytest.mark.parametrize(
    ("rows", "world", "batch", "group", "iters", "expected"),
    [
        (100, 1, 10, 10, None, 10),
        (101, 1, 10, 10, None, 11),  # a short last batch
        (100, 2, 10, 10, None, 5),  # 50 rows per rank
        (100, 1, 10, 40, None, 10),  # groups 40, 40, 20 -> 4 + 4 + 2 batches
        (95, 1, 10, 40, None, 10),  # groups 40, 40, 15 -> 4 + 4 + 2
        (100, 1, 10, 10, 3, 3),  # iters_per_epoch caps
    ],
)
def test_steps_follow_the_batch_geometry(rows, world, batch, group, iters, expected):
    collator = Collator(num_items=5, batch_size=batch, num_sampling_users=group)
    assert agreed_steps(settings(rows, batch, group, iters), collator, world, "cpu") == expected


def test_no_batch_at_all_is_an_error():
    collator = Collator(num_items=5, batch_size=10)
    with pytest.raises(ValueError, match="3 training users over 4 workers leave no batch"):
        agreed_steps(settings(3, 10), collator, 4, "cpu")


def data(users=23, items=12):
    matrix = sp.random(users, items, density=0.3, format="csr", random_state=1)
    return RecommendationDataset(matrix)


@pytest.mark.parametrize("negative_sampling", [True, False])
def test_a_short_shard_is_padded_with_empty_batches(negative_sampling):
    dataset = data()
    collator = Collator(num_items=12, batch_size=5, negative_sampling=negative_sampling)
    blocks = blocks_of(user_rows_table(dataset))
    notes = []
    batches = list(one_rank(blocks, collator, 7, notes.append))
    assert len(batches) == 7
    assert [b.shape[0] for b in batches] == [5, 5, 5, 5, 3, 0, 0]
    assert notes == ["a worker ran out of rows at step 5 of 7: empty batches pad it"]
    users = np.concatenate([b.users for b in batches])
    assert sorted(users.tolist()) == dataset.users.tolist()


def test_a_long_shard_is_cut_at_the_agreed_steps():
    collator = Collator(num_items=12, batch_size=5)
    notes = []
    batches = one_rank(blocks_of(user_rows_table(data())), collator, 2, notes.append)
    assert len(list(batches)) == 2
    assert notes == []


@pytest.mark.parametrize("negative_sampling", [True, False])
@pytest.mark.parametrize("model", [DynamicAutoencoder([4], sparse=True), MatrixFactorization(4)])
def test_an_empty_batch_has_zero_loss_and_gradient(model, negative_sampling):
    model.init_model(num_items=12, num_users=23)
    collator = Collator(num_items=12, batch_size=5, negative_sampling=negative_sampling)
    (empty,) = one_rank(blocks_of(user_rows_table(data()).slice(0, 0)), collator, 1)
    loss = batch_loss(model, build_loss("logloss"), empty, torch.device("cpu"))
    loss.backward()
    assert loss.item() == 0.0
    for param in model.parameters():
        if param.grad is not None:
            grad = param.grad.to_dense() if param.grad.is_sparse else param.grad
            assert not grad.any()


def test_a_global_batch_is_split_over_the_ranks():
    from recoder_dist.training.worker.sharded_step import rank_batch

    assert rank_batch(500, 1000, 2) == (250, 500)
    assert rank_batch(600, 600, 3) == (200, 200)
    with pytest.raises(ValueError, match="global batch"):
        rank_batch(500, 1000, 3)
