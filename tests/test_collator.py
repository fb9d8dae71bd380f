"""The negative-sampling collator against a naive scipy reference."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import scipy.sparse as sp

from recoder_dist.data.collator import (
    Collator,
    SparseBatch,
    UserRows,
    _sampled_items,
    batches_per_group,
    resolve_sampling_users,
    row_numbers,
)


def random_matrix(num_users, num_items, density, seed, empty_rows=()):
    """A random CSR matrix with values in [1, 5] (never an explicit zero) and some empty rows."""
    rng = np.random.default_rng(seed)
    dense = np.where(rng.random((num_users, num_items)) < density, rng.integers(1, 6), 0)
    dense = dense.astype(np.float32)
    dense[list(empty_rows)] = 0
    return sp.csr_matrix(dense)


def split_groups(users, group_size):
    """Consecutive groups of ``group_size`` users, the last one possibly shorter."""
    return [users[i : i + group_size] for i in range(0, len(users), group_size)]


def reference_batches(matrix, group, batch_size, negative_sampling):
    """Naive collator: (users, items, dense batch) for each batch_size slice of the group."""
    rows = matrix[group]
    items = np.unique(rows.indices) if negative_sampling else None
    out = []
    for start in range(0, len(group), batch_size):
        users = group[start : start + batch_size]
        block = matrix[users] if items is None else matrix[users][:, items]
        out.append((users, items, block.toarray()))
    return out


def assert_same_batches(batches, expected, num_items):
    """Same number of batches, same users, item sets and dense contents, batch by batch."""
    assert len(batches) == len(expected)
    for batch, (users, items, dense) in zip(batches, expected):
        assert isinstance(batch, SparseBatch)
        batch.check()  # the promises that the step takes on trust
        np.testing.assert_array_equal(batch.users, users)
        if items is None:
            assert batch.items is None
            assert batch.shape == (len(users), num_items)
        else:
            np.testing.assert_array_equal(batch.items, items)
            assert batch.shape == (len(users), len(items))
        np.testing.assert_array_equal(batch.to_dense(), dense)


def run_collator(matrix, users, batch_size, num_sampling_users, negative_sampling):
    """Feeds the collator groups of users; checks every group against the reference."""
    collate = Collator(
        num_items=matrix.shape[1],
        batch_size=batch_size,
        num_sampling_users=num_sampling_users,
        negative_sampling=negative_sampling,
    )
    total = 0
    for group in split_groups(users, collate.num_sampling_users):
        batches = list(collate(UserRows.from_csr(matrix, group)))
        expected = reference_batches(matrix, group, batch_size, negative_sampling)
        assert_same_batches(batches, expected, matrix.shape[1])
        assert len(batches) == batches_per_group(len(group), batch_size)
        total += len(batches)
    return total


SHAPES = [(1, 1), (1, 7), (9, 1), (37, 23), (100, 50)]
DENSITIES = [0.05, 0.3, 1.0]
GEOMETRIES = [(1, 0), (3, 0), (3, 3), (4, 12), (8, 24)]  # (batch_size, num_sampling_users)


@pytest.mark.parametrize("negative_sampling", [True, False])
@pytest.mark.parametrize(("batch_size", "num_sampling_users"), GEOMETRIES)
@pytest.mark.parametrize("density", DENSITIES)
@pytest.mark.parametrize("shape", SHAPES)
def test_matches_reference(shape, density, batch_size, num_sampling_users, negative_sampling):
    """Users, item sets and dense batches equal the scipy reference, for shuffled users."""
    seed = hash((shape, density, batch_size, num_sampling_users)) % 2**32
    matrix = random_matrix(*shape, density, seed)
    users = np.random.default_rng(seed).permutation(shape[0])
    group_size = num_sampling_users or batch_size
    total = run_collator(matrix, users, batch_size, num_sampling_users, negative_sampling)
    groups = -(-shape[0] // group_size)
    last = shape[0] - (groups - 1) * group_size
    assert total == (groups - 1) * (-(-group_size // batch_size)) + -(-last // batch_size)


@pytest.mark.parametrize("negative_sampling", [True, False])
def test_empty_rows(negative_sampling):
    """Users with no items give all-zero rows, and do not add items to the group."""
    matrix = random_matrix(20, 15, 0.3, seed=1, empty_rows=[0, 3, 4, 11, 19])
    users = np.array([3, 0, 7, 4, 19, 2, 11, 5, 1, 6])
    assert run_collator(matrix, users, 3, 6, negative_sampling) == 4


def test_group_of_only_empty_rows_has_no_items():
    """A group whose users have no items yields zero-width batches under negative sampling."""
    matrix = random_matrix(10, 6, 0.5, seed=2, empty_rows=[1, 2, 5])
    collate = Collator(num_items=6, batch_size=2, num_sampling_users=4)
    batches = list(collate(UserRows.from_csr(matrix, [1, 2, 5])))
    assert [b.shape for b in batches] == [(2, 0), (1, 0)]
    assert all(len(b.items) == 0 and len(b.values) == 0 for b in batches)


def test_short_last_batch_hand_worked():
    """A hand-worked group of 3 users in batches of 2: item union {1, 4, 6}, last batch short."""
    matrix = sp.csr_matrix(
        np.array(
            [
                [0, 2, 0, 0, 0, 0, 0],  # user 0: item 1
                [0, 0, 0, 0, 3, 0, 5],  # user 1: items 4, 6
                [0, 0, 0, 0, 0, 0, 0],  # user 2: nothing
                [0, 7, 0, 0, 1, 0, 0],  # user 3: items 1, 4
            ],
            dtype=np.float32,
        )
    )
    collate = Collator(num_items=7, batch_size=2, num_sampling_users=4)
    first, second = collate(UserRows.from_csr(matrix, [3, 1, 2]))
    np.testing.assert_array_equal(first.items, [1, 4, 6])
    np.testing.assert_array_equal(first.users, [3, 1])
    np.testing.assert_array_equal(first.to_dense(), [[7, 1, 0], [0, 3, 5]])
    np.testing.assert_array_equal(second.items, [1, 4, 6])
    np.testing.assert_array_equal(second.users, [2])
    np.testing.assert_array_equal(second.to_dense(), [[0, 0, 0]])


def test_empty_group_yields_nothing():
    """A group with no users gives no batches, as batches_per_group(0, ...) says."""
    matrix = random_matrix(4, 3, 0.5, seed=3)
    collate = Collator(num_items=3, batch_size=2)
    assert list(collate(UserRows.from_csr(matrix, np.array([], dtype=np.int64)))) == []
    assert batches_per_group(0, 2) == 0


@pytest.mark.parametrize("rows", [1, 2, 5, 6, 7, 100])
@pytest.mark.parametrize("batch_size", [1, 2, 3, 7])
def test_batches_per_group_is_ceil(rows, batch_size):
    """batches_per_group is the ceiling of rows / batch_size."""
    expected = rows // batch_size + (1 if rows % batch_size else 0)
    assert batches_per_group(rows, batch_size) == expected


def test_from_csr_all_rows_matches_loop():
    """UserRows.from_csr without users holds every row, as a naive loop over the dense rows."""
    matrix = random_matrix(6, 5, 0.4, seed=4, empty_rows=[2])
    rows = UserRows.from_csr(matrix)
    dense = matrix.toarray()
    assert len(rows) == 6
    np.testing.assert_array_equal(rows.users, np.arange(6))
    for r in range(6):
        cols = rows.indices[rows.indptr[r] : rows.indptr[r + 1]]
        np.testing.assert_array_equal(cols, np.flatnonzero(dense[r]))
        np.testing.assert_array_equal(
            rows.values[rows.indptr[r] : rows.indptr[r + 1]], dense[r, cols]
        )


@pytest.mark.parametrize(
    ("batch_size", "num_sampling_users", "expected"),
    [(1, 0, 1), (4, 0, 4), (4, None, 4), (4, 4, 4), (4, 12, 12), (np.int64(3), 9, 9)],
)
def test_resolve_sampling_users(batch_size, num_sampling_users, expected):
    """0 or None means batch_size; multiples are kept."""
    assert resolve_sampling_users(batch_size, num_sampling_users) == expected


@pytest.mark.parametrize("batch_size", [0, -1, -8])
def test_batch_size_not_positive(batch_size):
    """batch_size below 1 is a ValueError naming batch_size."""
    with pytest.raises(ValueError, match="batch_size must be >= 1"):
        Collator(num_items=3, batch_size=batch_size)


@pytest.mark.parametrize("batch_size", [2.0, 2.5, "2", None, True])
def test_batch_size_not_int(batch_size):
    """A non-int batch_size (bool included) is a TypeError naming batch_size."""
    with pytest.raises(TypeError, match="batch_size must be an int"):
        Collator(num_items=3, batch_size=batch_size)


@pytest.mark.parametrize(("batch_size", "num_sampling_users"), [(4, 6), (4, 2), (3, 10), (4, -4)])
def test_sampling_users_not_multiple(batch_size, num_sampling_users):
    """num_sampling_users that is not a positive multiple of batch_size is a ValueError."""
    with pytest.raises(ValueError, match=f"num_sampling_users={num_sampling_users}"):
        Collator(num_items=3, batch_size=batch_size, num_sampling_users=num_sampling_users)


@pytest.mark.parametrize(
    "num_entries, largest",
    [(1, 0), (50, 10), (5000, 2809), (300, 4799), (40, 2_000_000)],
)
@pytest.mark.parametrize("dtype", [np.int64, np.int32])
def test_sampled_items_is_np_unique_with_inverse(num_entries, largest, dtype):
    """Against ``np.unique``, in int64 also from the Arrow column's read-only int32 ids; the
    largest id always occurs."""
    rng = np.random.default_rng(num_entries)
    indices = rng.integers(0, largest + 1, num_entries).astype(dtype)
    indices[rng.integers(num_entries)] = largest
    indices.flags.writeable = False
    items, positions = _sampled_items(indices, largest + 1)
    expected_items, expected_positions = np.unique(indices, return_inverse=True)
    assert items.dtype == positions.dtype == np.int64
    np.testing.assert_array_equal(items, expected_items)
    np.testing.assert_array_equal(positions, expected_positions.reshape(-1))


@pytest.mark.parametrize("bad", [-1, -(2**31), 1000, 2**31 - 1])
def test_item_id_outside_the_catalog_is_a_value_error(bad):
    """An id below 0 or at num_items and beyond is refused."""
    indices = np.arange(1000, dtype=np.int32)
    indices[500] = bad
    with pytest.raises(ValueError, match=r"item ids must be in \[0, num_items"):
        _sampled_items(indices, 1000)


@pytest.mark.parametrize(
    "lengths",
    [[], [0], [3], [2, 0, 5, 1], [0, 0, 4, 0], list(range(0, 300, 7))],
)
@pytest.mark.parametrize("first", [0, 11])  # a slice of a larger block's indptr
def test_row_numbers_is_np_repeat(lengths, first):
    """The row of each entry, counted from the slice's first offset, as ``np.repeat``."""
    indptr = first + np.concatenate([[0], np.cumsum(lengths, dtype=np.int64)]).astype(np.int64)
    rows = row_numbers(indptr)
    assert rows.dtype == np.int64
    np.testing.assert_array_equal(rows, np.repeat(np.arange(len(lengths)), lengths))


def test_huge_catalog_small_group_matches_reference():
    """Item ids far beyond the group's entries."""
    matrix = sp.csr_matrix(
        (np.ones(5, np.float32), ([0, 0, 1, 2, 2], [3, 1_999_999, 70_000, 3, 5])),
        shape=(3, 2_000_000),
    )
    assert run_collator(matrix, np.array([2, 0, 1]), 2, 0, True) == 2


# ------------------------------------------------------------------ SparseBatch.check


def good_batch() -> SparseBatch:
    """Rows 0 and 2 of a 3 x 4 batch over items [3, 5, 8, 9]; row 1 is empty."""
    return SparseBatch(
        users=np.array([7, 1, 4]),
        items=np.array([3, 5, 8, 9]),
        rows=np.array([0, 0, 2, 2, 2]),
        cols=np.array([0, 3, 1, 2, 3]),
        values=np.ones(5, np.float32),
        shape=(3, 4),
    )


def test_a_hand_made_batch_keeps_its_promises():
    good_batch().check()


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"rows": np.array([0, 2, 0, 2, 2])}, "sorted"),
        ({"rows": np.array([0, 0, 2, 2, 3])}, "sorted and in"),
        ({"cols": np.array([0, 3, 1, 1, 3])}, "distinct columns"),
        ({"cols": np.array([3, 0, 1, 2, 3])}, "distinct columns"),
        ({"cols": np.array([0, 3, 1, 2, 4])}, "columns must be in"),
        ({"cols": np.array([-1, 3, 1, 2, 3])}, "columns must be in"),
        ({"items": np.array([3, 8, 5, 9])}, "sorted"),
        ({"items": np.array([3, 5, 5, 9])}, "distinct"),
        ({"items": np.array([3, 5, 8])}, "3 items for 4 columns"),
        ({"users": np.array([7, 1])}, "2 users for 3 rows"),
        ({"values": np.array([1, 1, np.nan, 1, 1], np.float32)}, "finite"),
        ({"values": np.ones(4, np.float32)}, "values per entry"),
        ({"rows": np.array([0, 0, 2, 2, 2], np.int32)}, "int64"),
    ],
)
def test_a_broken_promise_is_named(change, message):
    batch = dataclasses.replace(good_batch(), **change)
    with pytest.raises(ValueError, match=message):
        batch.check()
