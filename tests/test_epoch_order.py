"""Each epoch's rows per rank: checked against laying the permuted blocks out by hand."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest

from recoder_dist.data.epoch_order import RowBlocks, rank_rows, shuffled_groups


def numbered_blocks(sizes) -> RowBlocks:
    """Blocks of a table whose rows are numbered 0..N-1, in order."""
    starts = np.concatenate([[0], np.cumsum(sizes)])
    tables = tuple(pa.table({"row": np.arange(a, b)}) for a, b in zip(starts[:-1], starts[1:]))
    return RowBlocks(tables, tuple(sizes))


def rows_of(tables) -> list[int]:
    return [r for t in tables for r in t.column("row").to_pylist()]


def identity(table):
    return table


SIZES = [5, 3, 8, 1, 7, 6]  # 30 rows, uneven blocks


@pytest.mark.parametrize("world", [1, 2, 3, 4, 7])
def test_ranks_take_even_consecutive_shares_of_the_permuted_blocks(world):
    blocks = numbered_blocks(SIZES)
    order = np.random.default_rng([11, 3]).permutation(len(SIZES))
    laid_out = rows_of(blocks.refs[i] for i in order)  # the reference: every row, by hand
    shares = [rows_of(rank_rows(blocks, 11, 3, rank, world, identity)) for rank in range(world)]
    assert sum(shares, []) == laid_out  # every row once, in the epoch's order
    assert max(map(len, shares)) - min(map(len, shares)) <= 1
    assert [len(s) for s in shares] == [
        (r + 1) * 30 // world - r * 30 // world for r in range(world)
    ]


@pytest.mark.parametrize("world", [1, 2, 3])
def test_blocks_that_share_tables_are_the_blocks_cut_out(world):
    """Blocks given as slices (start, rows) of two shared tables read as the same blocks given
    as tables of their own (the reference): the same shares, row for row."""
    own = numbered_blocks(SIZES)
    whole = pa.concat_tables(own.refs)
    first = sum(SIZES[:3])  # the first three blocks in one table, the rest in another
    tables = (whole.slice(0, first), whole.slice(first))
    ends = np.cumsum(SIZES)
    starts = [int(e - n - (0 if i < 3 else first)) for i, (e, n) in enumerate(zip(ends, SIZES))]
    shared = RowBlocks(tuple(tables[i >= 3] for i in range(6)), tuple(SIZES), tuple(starts))
    for rank in range(world):
        assert rows_of(rank_rows(shared, 5, 2, rank, world, identity)) == rows_of(
            rank_rows(own, 5, 2, rank, world, identity)
        )


def test_the_order_depends_on_seed_and_epoch_only():
    blocks = numbered_blocks(SIZES)

    def share(seed, epoch):
        return rows_of(rank_rows(blocks, seed, epoch, 0, 2, identity))

    assert share(1, 4) == share(1, 4)
    assert len({tuple(share(1, epoch)) for epoch in range(1, 7)}) > 1
    assert share(1, 4) != share(2, 4)


def test_only_the_blocks_of_a_rank_are_fetched():
    blocks = numbered_blocks(SIZES)
    fetched = []
    list(rank_rows(blocks, 0, 1, 0, 3, lambda t: fetched.append(t) or t))
    assert sum(t.num_rows for t in fetched) < 30


@pytest.mark.parametrize(("group", "window"), [(4, 8), (4, 10), (5, 5), (7, 100), (3, 1)])
def test_groups_are_full_but_the_last_and_keep_every_row_once(group, window):
    tables = list(rank_rows(numbered_blocks(SIZES), 0, 1, 0, 1, identity))
    groups = list(shuffled_groups(iter(tables), group, window, (0, 1, 0)))
    sizes = [g.num_rows for g in groups]
    assert sizes == [group] * (30 // group) + ([30 % group] if 30 % group else [])
    assert sorted(rows_of(groups)) == list(range(30))
    again = list(shuffled_groups(iter(tables), group, window, (0, 1, 0)))
    assert rows_of(again) == rows_of(groups)


def test_a_window_mixes_rows_of_several_blocks():
    """A window of four groups permutes its rows: a group is not one block's neighbours."""
    blocks = numbered_blocks([10] * 8)
    tables = rank_rows(blocks, 0, 1, 0, 1, identity)
    groups = list(shuffled_groups(tables, 10, 40, (0, 1, 0)))
    blocks_per_group = [len({r // 10 for r in rows_of([g])}) for g in groups]
    assert min(blocks_per_group) >= 2
