"""The modulo ownership rule and the sharded tables' initialization and resharding, in one
process (no collective needed), against the full table drawn at once."""

import numpy as np
import pytest
import torch

from recoder_dist.sharded.ownership import Ownership, balance
from recoder_dist.sharded.tables import ShardedTable, reshard_rows


@pytest.mark.parametrize("world", [1, 2, 3, 7])
def test_rows_partition_the_catalog(world):
    rule = Ownership(23, world)
    ids = torch.cat([rule.global_ids(r) for r in range(world)])
    assert sorted(ids.tolist()) == list(range(23))
    assert sum(rule.rows_of(r) for r in range(world)) == 23
    items = torch.arange(23)
    for item, owner, local in zip(items, rule.owner(items), rule.local_index(items)):
        assert rule.global_ids(int(owner), local.view(1)).item() == item


def test_bad_ownership():
    with pytest.raises(ValueError, match="world"):
        Ownership(10, 0)
    with pytest.raises(ValueError, match="rank"):
        Ownership(10, 2).rows_of(2)
    with pytest.raises(ValueError, match="num_items"):
        Ownership(10, 2).check_ids(torch.tensor([3, 10]))


def test_balance_counts_touched_rows():
    steps = [np.array([0, 1, 2, 3, 4, 6]), np.array([1, 3])]
    out = balance(steps, num_items=8, world=2)
    assert out["rows"].tolist() == [4, 4]
    assert out["touched"].tolist() == [2.0, 2.0]  # (4 + 0) / 2, (2 + 2) / 2
    assert out["max_over_mean"] == pytest.approx((4 / 3 + 2 / 1) / 2)


@pytest.mark.parametrize("world", [1, 2, 3])
def test_shards_make_the_single_process_table(world, monkeypatch):
    # Small chunks, so that chunk boundaries fall inside every rank's rows.
    monkeypatch.setattr("recoder_dist.sharded.tables.CHUNK_ROWS", 4)
    full = torch.nn.init.xavier_uniform_(
        torch.empty(23, 5), generator=torch.Generator().manual_seed(7)
    )
    shards = [ShardedTable(23, 5, rank=r, world=world, seed=7) for r in range(world)]
    for rank, shard in enumerate(shards):
        assert torch.equal(shard.weight, full[rank::world])


def test_resharding_three_to_two():
    full = torch.randn(23, 4)
    old = []
    for rank in range(3):
        table = ShardedTable(23, 4, rank=rank, world=3)
        table.load_full(full)
        old.append(table.shard_state())
    for rank in range(2):
        table = ShardedTable(23, 4, rank=rank, world=2, init="zeros")
        table.load_shard_states(iter(old))
        assert torch.equal(table.weight, full[rank::2])
    with pytest.raises(ValueError, match="rows"):
        ShardedTable(23, 4, rank=0, world=2).load_shard_states(old[:2])
    with pytest.raises(ValueError, match="table"):
        ShardedTable(24, 4, rank=0, world=2).load_shard_states(old)


def test_reshard_rows_of_optimizer_moments():
    # Per-item tensors of any shape (Adam's moments as the table): 2 ranks -> 3.
    full = torch.randn(23, 4)
    saved = [(rank, 2, full[rank::2]) for rank in range(2)]
    for rank in range(3):
        assert torch.equal(reshard_rows(iter(saved), Ownership(23, 3), rank), full[rank::3])
    with pytest.raises(ValueError, match="layout"):
        reshard_rows([(0, 2, full[:5])], Ownership(23, 3), 0)
