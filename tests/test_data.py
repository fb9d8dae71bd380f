"""RecommendationDataset and the Arrow user-row tables, against naive references."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest
import scipy.sparse as sp

from recoder_dist.data.collator import UserRows
from recoder_dist.data.dataset import RecommendationDataset
from recoder_dist.data.ray_dataset import rows_from_arrow, user_rows_table

# (row, col, value) triplets of a 6 x 5 matrix: (0, 1) repeated, (3, 3) an explicit zero,
# (4, 0) entries that cancel out; rows 2 and 5 and column 4 are empty.
TRIPLETS = [
    (0, 1, 1.0),
    (0, 1, 2.0),
    (0, 3, 4.0),
    (1, 0, 1.0),
    (3, 2, 5.0),
    (3, 3, 0.0),
    (4, 0, 1.0),
    (4, 0, -1.0),
    (1, 2, 0.5),
]
SHAPE = (6, 5)


def naive_dense(triplets, shape):
    """Dense matrix by summing the triplets in a loop."""
    dense = np.zeros(shape)
    for r, c, v in triplets:
        dense[r, c] += v
    return dense


def coo(triplets, shape, dtype=np.float64):
    """A COO matrix holding the triplets as they are (duplicates and zeros kept)."""
    rows, cols, values = zip(*triplets)
    return sp.coo_matrix((np.array(values, dtype=dtype), (rows, cols)), shape=shape)


FORMATS = {
    "coo": lambda m: m,
    "csr": lambda m: m.tocsr(),
    "csc": lambda m: m.tocsc(),
    "lil": lambda m: m.tolil(),
    "dok": lambda m: m.todok(),
    "bsr": lambda m: m.tobsr(),
    "dia": lambda m: m.todia(),
    "coo_array": sp.coo_array,
    "csr_array": sp.csr_array,
}


@pytest.mark.parametrize("dtype", [np.float64, np.float32, np.int64])
@pytest.mark.parametrize("fmt", FORMATS)
def test_any_sparse_format(fmt, dtype):
    """Any scipy format becomes a canonical float32 CSR equal to the summed triplets."""
    triplets = [(r, c, int(v) if dtype is np.int64 else v) for r, c, v in TRIPLETS]
    data = RecommendationDataset(FORMATS[fmt](coo(triplets, SHAPE, dtype)))
    matrix = data.interactions
    assert isinstance(matrix, sp.csr_matrix) and matrix.dtype == np.float32
    assert matrix.has_canonical_format and np.all(matrix.data != 0)
    np.testing.assert_array_equal(matrix.toarray(), naive_dense(triplets, SHAPE))


def test_users_items_and_len():
    """users/items are the rows/columns with a nonzero sum; len counts those users."""
    data = RecommendationDataset(coo(TRIPLETS, SHAPE))
    dense = naive_dense(TRIPLETS, SHAPE)
    users = [r for r in range(SHAPE[0]) if any(dense[r] != 0)]
    items = [c for c in range(SHAPE[1]) if any(dense[:, c] != 0)]
    assert users == [0, 1, 3]  # row 4 cancels out, row 3's zero is dropped
    assert items == [0, 1, 2, 3]
    np.testing.assert_array_equal(data.users, users)
    np.testing.assert_array_equal(data.items, items)
    assert len(data) == 3
    assert (data.num_users, data.num_items) == SHAPE


def test_random_users_items():
    """On a random matrix, users and items match a loop over the dense matrix."""
    rng = np.random.default_rng(0)
    dense = np.where(rng.random((50, 30)) < 0.05, 1.0, 0.0)
    data = RecommendationDataset(sp.csc_matrix(dense))
    np.testing.assert_array_equal(data.users, [r for r in range(50) if dense[r].any()])
    np.testing.assert_array_equal(data.items, [c for c in range(30) if dense[:, c].any()])
    assert len(data) == sum(1 for r in range(50) if dense[r].any())


def test_target():
    """A target of the same shape is converted the same way."""
    target = coo([(2, 4, 1.0), (2, 4, 1.0), (5, 0, 3.0)], SHAPE)
    data = RecommendationDataset(coo(TRIPLETS, SHAPE).tocsc(), target.todok())
    assert isinstance(data.target, sp.csr_matrix) and data.target.dtype == np.float32
    np.testing.assert_array_equal(data.target.toarray(), naive_dense([(2, 4, 2), (5, 0, 3)], SHAPE))
    assert RecommendationDataset(coo(TRIPLETS, SHAPE)).target is None


@pytest.mark.parametrize("bad", [np.ones((3, 3)), [[1, 0], [0, 1]], None, "matrix"])
def test_not_sparse(bad):
    """A dense array, list, None or string is a TypeError naming the argument."""
    with pytest.raises(TypeError, match="interactions must be a scipy sparse matrix"):
        RecommendationDataset(bad)
    if bad is not None:
        with pytest.raises(TypeError, match="target must be a scipy sparse matrix"):
            RecommendationDataset(sp.csr_matrix(np.eye(3)), bad)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_values(bad):
    """NaN or infinite values in either matrix are a ValueError naming the matrix."""
    with pytest.raises(ValueError, match="interactions holds NaN or infinite values"):
        RecommendationDataset(coo([*TRIPLETS, (5, 4, bad)], SHAPE))
    with pytest.raises(ValueError, match="target holds NaN or infinite values"):
        RecommendationDataset(coo(TRIPLETS, SHAPE), coo([(1, 1, bad)], SHAPE))


def test_values_that_float32_cannot_hold_are_not_called_nan():
    """Finite float64 values beyond float32's range would become infinite in the cast: the
    error says so rather than blaming NaN; complex values are refused, not cut to their real
    part."""
    with pytest.raises(ValueError, match="interactions holds values beyond float32's range"):
        RecommendationDataset(coo([*TRIPLETS, (5, 4, 1e300)], SHAPE))
    with pytest.raises(TypeError, match="interactions holds complex values"):
        RecommendationDataset(sp.csr_matrix(np.eye(3, dtype=complex)))


@pytest.mark.parametrize("target_shape", [(6, 4), (5, 5), (7, 6)])
def test_target_shape_mismatch(target_shape):
    """A target of another shape is a ValueError quoting both shapes."""
    target = sp.csr_matrix(target_shape)
    with pytest.raises(ValueError, match=rf"target shape \({target_shape[0]}, .* differs"):
        RecommendationDataset(coo(TRIPLETS, SHAPE), target)


def test_one_dimensional():
    """A 1-D sparse array is a ValueError."""
    with pytest.raises(ValueError, match="must be 2-D"):
        RecommendationDataset(sp.coo_array(np.array([1.0, 0.0, 2.0])))


def csr_from_parts(values, indices, indptr, dtype):
    """A CSR matrix built straight from its arrays (duplicates, zeros, order kept)."""
    return sp.csr_matrix((np.array(values, dtype=dtype), indices, indptr), shape=(2, 3))


@pytest.mark.parametrize(
    "parts",
    [
        ([1.0, 2.0, 3.0], [1, 1, 0], [0, 3, 3]),  # a repeated column in row 0
        ([0.0, 1.0, 2.0], [0, 1, 2], [0, 2, 3]),  # an explicit zero
        ([1.0, 2.0, 3.0], [2, 0, 1], [0, 2, 3]),  # unsorted column indices
    ],
    ids=["duplicates", "explicit-zero", "unsorted"],
)
@pytest.mark.parametrize("dtype", [np.float64, np.float32], ids=["float64", "float32"])
def test_input_matrix_left_intact(parts, dtype):
    """Building a dataset does not change the matrix the caller passed in."""
    matrix = csr_from_parts(*parts, dtype)
    before = matrix.toarray()
    data = RecommendationDataset(matrix)
    np.testing.assert_array_equal(data.interactions.toarray(), before)
    np.testing.assert_array_equal(matrix.toarray(), before)


def test_dataset_does_not_alias_input():
    """Changing the caller's matrix afterwards leaves the dataset as it was."""
    matrix = sp.csr_matrix(np.eye(3, dtype=np.float32))
    data = RecommendationDataset(matrix)
    matrix.data[:] = 5.0
    np.testing.assert_array_equal(data.interactions.toarray(), np.eye(3))


# Arrow user-row tables.


def random_dataset(num_users, num_items, density, seed, empty_users=(2, 6)):
    """A dataset with random interactions and targets; ``empty_users`` have no interactions."""
    rng = np.random.default_rng(seed)

    def dense():
        mask = rng.random((num_users, num_items)) < density
        return np.where(mask, rng.random((num_users, num_items)) + 0.5, 0.0)

    interactions = dense()
    interactions[list(empty_users)] = 0
    return RecommendationDataset(sp.csr_matrix(interactions), sp.csr_matrix(dense()))


def naive_rows(dense, users):
    """UserRows by a loop over dense rows: nonzero columns in order, and their values."""
    indptr, indices, values = [0], [], []
    for u in users:
        cols = np.flatnonzero(dense[u])
        indices.extend(cols)
        values.extend(dense[u, cols])
        indptr.append(len(indices))
    return UserRows(
        users=np.asarray(users, dtype=np.int64),
        indptr=np.array(indptr, dtype=np.int64),
        indices=np.array(indices, dtype=np.int64),
        values=np.array(values, dtype=np.float32),
    )


def assert_rows_equal(got, expected):
    """Same users, indptr, indices and values, with ``rows_from_arrow``'s dtypes (the indices
    stay the Arrow column's int32)."""
    for name, dtype in [
        ("users", np.int64),
        ("indptr", np.int64),
        ("indices", np.int32),
        ("values", np.float32),
    ]:
        array = getattr(got, name)
        assert array.dtype == dtype, name
        np.testing.assert_array_equal(array, getattr(expected, name), err_msg=name)


def check_slices(table, data, users, slicer):
    """Every slice [a, b) of the table gives the rows of users[a:b], for both prefixes."""
    n = len(users)
    for a in range(n + 1):
        for b in range(a, n + 1):
            part = slicer(table, a, b)
            for prefix, matrix in [("", data.interactions), ("target_", data.target)]:
                got = rows_from_arrow(part, prefix=prefix)
                assert_rows_equal(got, naive_rows(matrix.toarray(), users[a:b]))
                assert_rows_equal(got, UserRows.from_csr(matrix, users[a:b]))


def slice_table(table, a, b):
    """A zero-copy slice of a table (its list columns keep the parent's offsets)."""
    return table.slice(a, b - a)


def slice_batch(table, a, b):
    """A slice of the table as one RecordBatch."""
    return table.combine_chunks().to_batches()[0].slice(a, b - a)


def rechunk(table, a, b):
    """A slice of a table made of several chunks, cut at other places than the slice."""
    pieces = [table.slice(0, 2), table.slice(2, 3), table.slice(5)]
    return pa.concat_tables(pieces).slice(a, b - a)


@pytest.mark.parametrize("slicer", [slice_table, slice_batch, rechunk])
def test_table_slices_round_trip(slicer):
    """rows_from_arrow of any slice, including ones not starting at 0, rebuilds the CSR rows."""
    data = random_dataset(12, 9, 0.3, seed=1)
    table = user_rows_table(data)
    users = data.users
    np.testing.assert_array_equal(users, [0, 1, 3, 4, 5, 7, 8, 9, 10, 11])
    check_slices(table, data, users, slicer)


def test_table_columns():
    """One row per user with interactions: user, position 0..n-1, and list columns."""
    data = random_dataset(12, 9, 0.3, seed=2)
    table = user_rows_table(data)
    assert table.column_names == [
        "user",
        "position",
        "items",
        "values",
        "target_items",
        "target_values",
    ]
    np.testing.assert_array_equal(table.column("user").to_numpy(), data.users)
    np.testing.assert_array_equal(table.column("position").to_numpy(), np.arange(len(data.users)))
    assert table.schema.field("items").type == pa.list_(pa.int32())
    assert table.schema.field("values").type == pa.list_(pa.float32())
    dense = data.interactions.toarray()
    assert table.column("items").to_pylist() == [
        np.flatnonzero(dense[u]).tolist() for u in data.users
    ]


def test_given_users():
    """Given users (unordered, one without interactions) keep their order; position is 0..n-1."""
    data = random_dataset(12, 9, 0.3, seed=3)
    users = np.array([7, 6, 0, 11, 3, 5])  # user 6 has no interactions
    table = user_rows_table(data, users)
    np.testing.assert_array_equal(table.column("position").to_numpy(), np.arange(6))
    check_slices(table, data, users, slice_table)


def test_without_target():
    """A dataset without target gives no target columns."""
    data = RecommendationDataset(sp.csr_matrix(np.eye(4)))
    table = user_rows_table(data)
    assert table.column_names == ["user", "position", "items", "values"]
    assert_rows_equal(rows_from_arrow(table.slice(1, 2)), naive_rows(np.eye(4), [1, 2]))


def test_rows_are_writable_copies():
    """The rebuilt values are a writable array that does not write through to the table."""
    data = random_dataset(12, 9, 0.3, seed=4)
    table = user_rows_table(data)
    rows = rows_from_arrow(table.slice(1, 3))
    assert rows.values.flags.writeable
    rows.values[:] = -1.0
    assert_rows_equal(
        rows_from_arrow(table.slice(1, 3)), naive_rows(data.interactions.toarray(), data.users[1:4])
    )


@pytest.mark.parametrize("rows_per_block", [1, 3, 4, 100])
def test_put_blocks_are_ray_datas_blocks(ray_session, rows_per_block):
    """The blocks put straight into the object store are those that Ray Data's from_arrow
    gives for the same table (the reference): the same rows, in the same blocks and order."""
    from recoder_dist.data.ray_dataset import put_blocks, to_ray_dataset

    table = user_rows_table(random_dataset(10, 9, 0.3, seed=2))
    ours = put_blocks(table, rows_per_block)
    expected = ray_session.get(to_ray_dataset(table, rows_per_block).to_arrow_refs())
    got = ray_session.get(list(ours.refs))
    assert list(ours.rows) == [t.num_rows for t in expected]
    assert [t.to_pydict() for t in got] == [t.to_pydict() for t in expected]
    assert pa.concat_tables(got).equals(table)


def test_put_blocks_refuses_no_rows(ray_session):
    from recoder_dist.data.ray_dataset import put_blocks

    table = user_rows_table(random_dataset(10, 9, 0.3, seed=2)).slice(0, 0)
    with pytest.raises(ValueError, match="no user rows"):
        put_blocks(table, 8)
